"""Hand-built histories for the report tests: events and orders through ingest (so merges move rows and
orders are derived exactly as in service), enrollments and deliveries written as the engine writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from sqlalchemy import insert, select

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Delivery, Enrollment, Identity

# The period of every test: May 2026, reported at its end; the previous period is [Mar 31, May 1).
SINCE = datetime(2026, 5, 1, tzinfo=UTC)
UNTIL = NOW = datetime(2026, 6, 1, tzinfo=UTC)
WINDOW = timedelta(days=7)
_ids = count(1)


def day(d: int, hour: int = 12, minute: int = 0, month: int = 5, **extra: int) -> datetime:
    return datetime(2026, month, d, hour, minute, tzinfo=UTC) + timedelta(**extra)


def settings(**overrides: Any) -> Settings:
    return Settings(report_min_control=2, **overrides)


def who(user: str) -> dict[str, str]:
    return {"anonymousId": user} if user.startswith("anon") else {"userId": user}


def track(user: str, name: str, at: datetime, channel: str = "web", **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        **who(user),
        "event": name,
        "messageId": f"m{next(_ids)}",
        "timestamp": at.isoformat(),
        "properties": properties,
        "context": {"channel": channel},
    }


def order(user: str, order_id: str, total: float, at: datetime, channel: str = "web", **props: Any) -> dict:
    """An Order Completed (no cart id: a till in the store sends none)."""
    return track(user, "Order Completed", at, channel, order_id=order_id, total=total, **props)


def identify(user: str, at: datetime, **ids: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": "identify", **who(user), "messageId": f"m{next(_ids)}"}
    payload.update(ids)
    payload["timestamp"] = at.isoformat()
    return payload


def ingest(engine, *payloads: dict[str, Any]) -> None:
    result = ingest_payloads(engine, list(payloads), now=NOW)
    assert not result.rejected, result


def customer_id(engine, user: str) -> int:
    kind = "anonymous_id" if user.startswith("anon") else "user_id"
    with session_scope(engine) as session:
        return session.execute(
            select(Identity.customer_id).where(Identity.kind == kind, Identity.value == user)
        ).scalar_one()


def enroll(
    engine,
    user: str,
    sequence: str,
    at: datetime,
    *,
    status: str = "active",
    exited_at: datetime | None = None,
    exit_reason: str | None = None,
) -> int:
    person = customer_id(engine, user)
    with session_scope(engine) as session:
        return session.execute(
            insert(Enrollment.__table__)
            .values(
                sequence=sequence,
                customer_id=person,
                status=status,
                step_index=0,
                enrolled_at=at,
                exited_at=exited_at,
                exit_reason=exit_reason,
                updated_at=exited_at or at,
            )
            .returning(Enrollment.__table__.c.id)
        ).scalar_one()


def deliver(
    engine,
    user: str,
    channel: str,
    *,
    step: str,
    created: datetime,
    enrollment: int | None = None,
    campaign: str | None = None,
    status: str = "sent",
    delivered_at: datetime | None = None,
) -> str:
    key = (
        f"enrollment:{enrollment}:{step}" if enrollment is not None else f"campaign:{campaign}:{user}:{step}"
    )
    person = customer_id(engine, user)
    values: dict[str, Any] = dict(
        dedupe_key=key,
        enrollment_id=enrollment,
        campaign=campaign,
        step_id=step,
        customer_id=person,
        channel=channel,
        connector="outbox",
        status=status,
        attempts=1,
        marketing=True,
        created_at=created,
        updated_at=created,
        sent_at=created if status == "sent" else None,
    )
    if delivered_at is not None:
        values["delivered_at"] = delivered_at
    with session_scope(engine) as session:
        session.execute(insert(Delivery.__table__).values(**values))
    return key
