"""Helpers for sequence tests: a small retailer, customers with carts, and what each channel received."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Delivery, Enrollment, Event, OutboxMessage
from profiles.stores import parse_store, upsert_stores

# 11:00 in New York, 16:00 in Lisbon: outside quiet hours in both.
T0 = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
STORES = [
    {
        "id": "nyc",
        "name": "Omni SoHo",
        "address": "120 Prince St",
        "city": "New York",
        "timezone": "America/New_York",
        "hours": {"mon-sat": "10:00-21:00"},
    },
    {
        "id": "lis",
        "name": "Omni Chiado",
        "address": "Rua Garrett 12",
        "city": "Lisbon",
        "timezone": "Europe/Lisbon",
        "hours": {"mon-sat": "09:00-20:00"},
    },
]


def no_sleep(_seconds: float) -> None:
    """Tests never sleep: the retry layer's waits go here."""


def seed_stores(engine) -> None:
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=T0 - timedelta(days=30))


def customer(
    engine,
    n: int,
    *,
    store: str = "nyc",
    sms: bool = True,
    push: bool = True,
    email: bool = True,
    cart_at: datetime | None = None,
    timezone: str | None = None,
) -> str:
    """Identify customer ``n`` and (by default) leave a cart 2 hours before T0. Returns their user id."""
    user = f"user-{n}"
    traits: dict[str, Any] = {
        "first_name": f"Cust{n}",
        "home_store_id": store,
        "sms_opt_in": sms,
        "push_opt_in": push,
        "phone": f"+1212555{1000 + n}",
    }
    if email:
        traits["email"] = f"cust{n}@example.org"
    if timezone:
        traits["timezone"] = timezone
    at = cart_at or (T0 - timedelta(hours=2))
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": user,
                "messageId": f"id-{n}",
                "timestamp": (at - timedelta(days=1)).isoformat(),
                "traits": traits,
                "context": {"device": {"token": f"token-{n}"}},
            },
            {
                "type": "track",
                "userId": user,
                "event": "Product Added",
                "messageId": f"cart-{n}",
                "timestamp": at.isoformat(),
                "properties": {"product_id": "tee", "name": "Black Tee", "price": 19.5, "quantity": 2},
            },
        ],
        now=at,
    )
    return user


def buy(engine, user: str, at: datetime, *, channel: str = "store", order_id: str = "pos-1") -> None:
    ingest_payloads(
        engine,
        [
            {
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "messageId": f"buy-{order_id}",
                "timestamp": at.isoformat(),
                "context": {"channel": channel},
                "properties": {"order_id": order_id, "total": 39.0},
            }
        ],
        now=at,
    )


def outbox(engine, channel: str | None = None) -> list[Any]:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        query = select(table).order_by(table.c.id)
        if channel:
            query = query.where(table.c.channel == channel)
        return session.execute(query).all()


def deliveries(engine) -> list[Any]:
    table = Delivery.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).order_by(table.c.id)).all()


def enrollments(engine) -> list[Any]:
    table = Enrollment.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).order_by(table.c.id)).all()


def timeline(engine, names: tuple[str, ...]) -> list[Any]:
    table = Event.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).where(table.c.name.in_(names)).order_by(table.c.id)).all()


def cart_campaign(tmp_path, monkeypatch, name: str = "cart_push") -> None:
    """A campaign ``name`` emailing the cart abandoners, in a folder of its own that OMNI_CAMPAIGNS_DIR
    names for the rest of the test."""
    from omni.core.settings import get_settings

    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\naudience: cart_abandoners\nchannel: email\ntemplate: email/abandoned_cart\n"
    )
    monkeypatch.setenv("OMNI_CAMPAIGNS_DIR", str(folder))
    get_settings.cache_clear()


def delivery(key: str, customer_id: int, **values) -> dict:
    """A ``deliveries`` row of a campaign email, due at T0; ``values`` override its columns."""
    row = {
        "dedupe_key": key,
        "enrollment_id": None,
        "campaign": "c",
        "step_id": "send",
        "customer_id": customer_id,
        "channel": "email",
        "connector": "outbox",
        "template": "email/x",
        "ad_audience": None,
        "action": None,
        "status": "pending",
        "attempts": 0,
        "marketing": True,
        "next_attempt_at": T0,
        "created_at": T0,
        "updated_at": T0,
        "sent_at": None,
        "error": None,
    }
    row.update(values)
    return row
