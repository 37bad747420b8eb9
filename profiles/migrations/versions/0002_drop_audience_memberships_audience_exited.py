"""audience memberships: drop ix_audience_memberships_audience_exited

Every lookup of an audience's current members (audience builds, the `audience` condition, sequences,
campaigns, `omni audiences members`) filters on ``audience = ? AND exited_at IS NULL``, which the
partial unique index ``uq_audience_memberships_open (audience, customer_id) WHERE exited_at IS NULL``
serves. The (audience, exited_at) index was only one more index to write for every member entering
and leaving.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_audience_memberships_audience_exited", table_name="audience_memberships")


def downgrade() -> None:
    op.create_index(
        "ix_audience_memberships_audience_exited",
        "audience_memberships",
        ["audience", "exited_at"],
        unique=False,
    )
