"""reports: the global control group's record

``global_control``: who was in the global control group (``profiles.control``), under which salt, from
``entered_at`` until ``exited_at`` (null: still in it); at most one open row per customer.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import profiles.db

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN = "exited_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "global_control",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("customer_id", ID, nullable=False),
        sa.Column("salt", sa.String(length=200), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("entered_at", profiles.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("exited_at", profiles.db.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_global_control_customer_id", "global_control", ["customer_id"])
    op.create_index(
        "uq_global_control_open",
        "global_control",
        ["customer_id"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index("uq_global_control_open", table_name="global_control")
    op.drop_index("ix_global_control_customer_id", table_name="global_control")
    op.drop_table("global_control")
