"""suppression and provider feedback (webhooks)

- ``suppressions``: addresses no message may go to, whoever holds them (a hard bounce), one row per
  (kind, address) (``profiles.suppression``);
- ``provider_events``: every event SendGrid and Twilio posted to the feedback webhooks, kept as it came,
  unique by ``event_key`` so each is processed once (``profiles.feedback``);
- ``deliveries``: ``delivered_at`` and ``provider_status`` (the provider's last word), and an index on
  ``provider_message_id`` (Twilio's status callbacks name the message by its SID).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 17:00:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import profiles.db

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = profiles.db.UTCDateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "suppressions",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=512), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "address", name="uq_suppressions_kind_address"),
    )
    op.create_table(
        "provider_events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("event_key", sa.String(length=300), nullable=False),
        sa.Column("delivery_id", sa.String(length=500), nullable=True),
        sa.Column("address", sa.String(length=512), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("occurred_at", TS, nullable=True),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_key"),
    )
    op.create_index("ix_provider_events_outcome_received", "provider_events", ["outcome", "received_at"])
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.add_column(sa.Column("delivered_at", TS, nullable=True))
        batch_op.add_column(sa.Column("provider_status", sa.String(length=32), nullable=True))
    op.create_index("ix_deliveries_provider_message_id", "deliveries", ["provider_message_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_provider_message_id", table_name="deliveries")
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.drop_column("provider_status")
        batch_op.drop_column("delivered_at")
    op.drop_index("ix_provider_events_outcome_received", table_name="provider_events")
    op.drop_table("provider_events")
    op.drop_table("suppressions")
