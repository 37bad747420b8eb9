"""enrollments: at most one open (active or held-out) enrollment per sequence and customer

Two ticks at once on PostgreSQL each ran enrollment's ``INSERT ... SELECT ... WHERE NOT EXISTS`` on
their own snapshot and both enrolled the same entrants, who then got every message twice. The store
now makes a second open enrollment impossible, whatever the isolation level: a unique index on
``(sequence, customer_id)`` over the rows whose status is ``active`` or ``holdout``. Enrollment
inserts with ``ON CONFLICT DO NOTHING``, so the tick that loses the race simply enrolls nobody twice.

A held-out customer keeps one ``holdout`` row per sequence: the holdout is a deterministic bucket of
customer and sequence, so they are never enrolled there anyway.

Upgrade first closes duplicates a store may already hold from that race: of each group the lowest id
stays open; the others become ``exited`` (reason ``duplicate enrollment``) and their pending
deliveries ``skipped``, so nothing is sent twice from here on.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "uq_enrollments_open"
OPEN = "status IN ('active', 'holdout')"


def upgrade() -> None:
    duplicates = (
        f"SELECT id FROM enrollments AS e WHERE {OPEN} AND EXISTS (SELECT 1 FROM enrollments AS f "
        "WHERE f.sequence = e.sequence AND f.customer_id = e.customer_id "
        f"AND f.status IN ('active', 'holdout') AND f.id < e.id)"
    )
    op.execute(
        "UPDATE deliveries SET status = 'skipped', error = 'duplicate enrollment' "
        f"WHERE status = 'pending' AND enrollment_id IN ({duplicates})"
    )
    op.execute(
        "UPDATE enrollments SET status = 'exited', exit_reason = 'duplicate enrollment', "
        "exited_at = updated_at, next_run_at = NULL "
        f"WHERE id IN ({duplicates})"
    )
    op.create_index(
        INDEX,
        "enrollments",
        ["sequence", "customer_id"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="enrollments")
