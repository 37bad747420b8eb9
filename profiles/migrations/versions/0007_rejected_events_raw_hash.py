"""rejected_events: ``raw_hash``, so that running the same input again stores no rejection twice

Accepted payloads were deduplicated by ``messageId`` while every rejected one was stored again on each
run of the same file. A rejection is now known by its source (``file:line``) and raw text: ``raw_hash``
is the sha256 (hex) of ``source + "\\n" + raw`` (``profiles.ingest.rejection_hash``), under a unique
index, and ingest inserts with ``ON CONFLICT DO NOTHING``.

Upgrade computes the hash of the rows already stored; of rows with the same source and raw text (the
copies earlier re-runs made) the first keeps it and the others keep a null hash (null is never a
conflict), so nothing is deleted. Downgrade drops the index and the column.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 10:00:00.000000
"""

import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLE = "rejected_events"
INDEX = "uq_rejected_events_raw_hash"
BATCH = 5000


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch_op:
        batch_op.add_column(sa.Column("raw_hash", sa.String(length=64), nullable=True))
    bind = op.get_bind()
    seen: set[str] = set()
    last = 0
    while True:
        rows = bind.execute(
            sa.text(f"SELECT id, source, raw FROM {TABLE} WHERE id > :last ORDER BY id LIMIT {BATCH}"),
            {"last": last},
        ).all()
        if not rows:
            break
        last = rows[-1][0]
        updates = []
        for row_id, source, raw in rows:
            digest = hashlib.sha256(f"{source}\n{raw}".encode("utf-8", "backslashreplace")).hexdigest()
            if digest not in seen:
                seen.add(digest)
                updates.append({"row_id": row_id, "digest": digest})
        if updates:
            bind.execute(sa.text(f"UPDATE {TABLE} SET raw_hash = :digest WHERE id = :row_id"), updates)
    op.create_index(INDEX, TABLE, ["raw_hash"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name=TABLE)
    with op.batch_alter_table(TABLE) as batch_op:
        batch_op.drop_column("raw_hash")
