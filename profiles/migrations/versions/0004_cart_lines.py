"""carts: ``lines``, the open cart's whole line state

``items`` holds the lines with a quantity above zero. A line removed down to zero (or below) still
counts when the product is added again, so carrying an open cart forward from its stored row alone
needs every line: ``lines`` holds them, as ``[[key, line], ...]`` in the order they were first seen.
Ingest uses it to apply new product events to the open cart without re-reading the customer's whole
commerce history; a row without it (written before this revision, or a converted cart) is re-derived
from the events as before. Nothing to backfill.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("carts") as batch_op:
        batch_op.add_column(
            sa.Column(
                "lines",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("carts") as batch_op:
        batch_op.drop_column("lines")
