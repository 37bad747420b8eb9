"""audience memberships: drop the foreign key to customers and ix_audience_memberships_customer_id

Memberships are derived data: audience builds write them in bulk, with ids read in ``customers``,
whose rows are never deleted (a merged customer keeps its row, with ``merged_into``). On PostgreSQL
the foreign key's check, a lookup and a row lock in ``customers`` for every row written, was most of
the cost of a first build (every member written at once). Without the foreign key, the index on
``customer_id`` alone served nothing (it was there for deletes of customers): every lookup names the
audience and is served by ``uq_audience_memberships_open``.

On SQLite the table is copied without them (Alembic's batch mode); rows, ids and the partial unique
index are kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "audience_memberships"
INDEX = "ix_audience_memberships_customer_id"
# 0001 created the foreign key unnamed: on SQLite it has no name, and batch mode needs one to drop it by.
SQLITE_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
SQLITE_FK = "fk_audience_memberships_customer_id_customers"


def _customer_fks(bind: sa.Connection) -> list[str | None]:
    # None on SQLite when the constraint was created unnamed (by 0001).
    return [
        fk["name"]
        for fk in sa.inspect(bind).get_foreign_keys(TABLE)
        if fk["referred_table"] == "customers" and fk["constrained_columns"] == ["customer_id"]
    ]


def upgrade() -> None:
    bind = op.get_bind()
    names = _customer_fks(bind)
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table(TABLE, naming_convention=SQLITE_NAMING) as batch_op:
            batch_op.drop_index(INDEX)
            for name in names:
                batch_op.drop_constraint(name or SQLITE_FK, type_="foreignkey")
        return
    op.drop_index(INDEX, table_name=TABLE)
    for name in names:
        op.drop_constraint(name, TABLE, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch_op:
        batch_op.create_foreign_key(
            "audience_memberships_customer_id_fkey", "customers", ["customer_id"], ["id"]
        )
        batch_op.create_index(INDEX, ["customer_id"], unique=False)
