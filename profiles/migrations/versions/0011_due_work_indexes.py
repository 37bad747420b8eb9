"""deliveries and enrollments: due-work indexes a batch can be read from in order

A tick reads due work a batch at a time, in ``(time, id)`` order, resuming after the last row of the
batch before. The old indexes stopped at the time, so each batch read (and sorted) every row still due,
and the dispatcher joined each of them to ``enrollments`` before taking 1,000: quadratic in the rows a
tick moves (at 100,000 deliveries, over 10 s of server time per tick).

- ``deliveries``: ``ix_deliveries_status_next (status, next_attempt_at)`` becomes
  ``ix_deliveries_due (next_attempt_at, id) WHERE status = 'pending'``: a batch is the next 1,000
  entries, and a claimed or resolved delivery leaves the index (no entry for its new row versions).
  ``ix_deliveries_sending (updated_at) WHERE status = 'sending'`` keeps the recovery of interrupted
  sends a lookup of the few deliveries in flight.
- ``enrollments``: ``ix_enrollments_sequence_status_next (sequence, status, next_run_at)`` gains the id:
  ``ix_enrollments_due (sequence, status, next_run_at, id)``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

PENDING = "status = 'pending'"
SENDING = "status = 'sending'"


def upgrade() -> None:
    op.drop_index("ix_deliveries_status_next", table_name="deliveries")
    op.create_index(
        "ix_deliveries_due",
        "deliveries",
        ["next_attempt_at", "id"],
        postgresql_where=sa.text(PENDING),
        sqlite_where=sa.text(PENDING),
    )
    op.create_index(
        "ix_deliveries_sending",
        "deliveries",
        ["updated_at"],
        postgresql_where=sa.text(SENDING),
        sqlite_where=sa.text(SENDING),
    )
    op.drop_index("ix_enrollments_sequence_status_next", table_name="enrollments")
    op.create_index("ix_enrollments_due", "enrollments", ["sequence", "status", "next_run_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_enrollments_due", table_name="enrollments")
    op.create_index(
        "ix_enrollments_sequence_status_next", "enrollments", ["sequence", "status", "next_run_at"]
    )
    op.drop_index("ix_deliveries_sending", table_name="deliveries")
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.create_index("ix_deliveries_status_next", "deliveries", ["status", "next_attempt_at"])
