"""reports: the global control group (placeholder: filled in by the issue that owns it)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 17:00:00.000000
"""

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
