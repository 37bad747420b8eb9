"""api_keys (and the live intake queue) for ``omni serve``

``api_keys``: keys of the HTTP service, stored as their sha256 with a short prefix to name them; each has a
source (recorded on the events it sends) and a scope (``write`` or ``read``); revoking sets ``revoked_at``.

``intake``: the durable queue of the tracking API: each accepted request's JSON body, committed before the
200 and deleted in the transaction that ingests it (``profiles.intake``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

import profiles.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("created_at", profiles.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", profiles.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "intake",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("received_at", profiles.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("intake")
    op.drop_table("api_keys")
