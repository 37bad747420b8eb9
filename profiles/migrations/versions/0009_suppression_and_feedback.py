"""suppression and provider feedback (webhooks) (placeholder: filled in by the issue that owns it)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 17:00:00.000000
"""

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
