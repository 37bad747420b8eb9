"""The one clock. Every time-dependent operation takes a ``now``; this is what the top layers pass when
the user gave none (the CLI's ``--now``, a flow's ``now`` parameter)."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """``value`` with UTC assumed when it carries no timezone (the stores' columns are UTC)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
