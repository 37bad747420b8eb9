"""A cross-channel history of one shopper, Ana, for the profile API and customer page tests.

Day 2026-06-01 (UTC): she browses the web anonymously (``anon-ana``), signs in to the app (``u-ana``, a
device token, SMS opt-in, and a hostile nickname), identifies on the web with her email (the anonymous
profile merges into the app's), fills a cart in the app, asks a question in chat, calls the call
centre, buys at the till of Omni Chiado (the cart converts), then adds a jacket in the app and leaves it.
:func:`run_journeys` then runs a real sequence tick at 20:00: she enters ``abandoned_cart`` and the
outbox connector sends the cart email.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.stores import parse_stores, upsert_stores

DAY = datetime(2026, 6, 1, tzinfo=UTC)
TICK = datetime(2026, 6, 1, 20, 0, tzinfo=UTC)
HOSTILE = "<script>window.__pwned = 1; alert('pwned')</script>"
EMAIL = "ana@example.org"
PHONE = "+351912345678"


def at(hour: int, minute: int = 0) -> str:
    return f"2026-06-01T{hour:02d}:{minute:02d}:00Z"


def payloads() -> list[dict]:
    web = {"channel": "web"}
    app = {"channel": "app"}
    return [
        {
            "type": "page",
            "anonymousId": "anon-ana",
            "name": "Trail Boots",
            "properties": {"url": "https://shop.example/p/boots"},
            "context": web,
            "messageId": "h-1",
            "timestamp": at(9),
        },
        {
            "type": "track",
            "anonymousId": "anon-ana",
            "event": "Product Viewed",
            "properties": {"product_id": "boots", "name": "Trail Boots", "price": 120},
            "context": web,
            "messageId": "h-2",
            "timestamp": at(9, 1),
        },
        {
            "type": "identify",
            "userId": "u-ana",
            "traits": {
                "email": EMAIL,
                "first_name": "Ana",
                "last_name": "Silva",
                "phone": PHONE,
                "sms_opt_in": True,
                "nickname": HOSTILE,
                "loyalty_id": "L-7",
            },
            "context": {**app, "device": {"token": "tok-ana"}},
            "messageId": "h-3",
            "timestamp": at(9, 5),
        },
        {
            "type": "identify",
            "anonymousId": "anon-ana",
            "traits": {"email": EMAIL},
            "context": web,
            "messageId": "h-4",
            "timestamp": at(9, 10),
        },
        *(
            {
                "type": "track",
                "userId": "u-ana",
                "event": "Product Added",
                "properties": {"cart_id": "c-1", "currency": "EUR", **product},
                "context": app,
                "messageId": f"h-5{index}",
                "timestamp": at(9, 20 + index),
            }
            for index, product in enumerate(
                [
                    {"product_id": "boots", "name": "Trail Boots", "price": 120, "quantity": 1},
                    {"product_id": "socks", "name": "Wool Socks", "price": 12, "quantity": 2},
                ]
            )
        ),
        {
            "type": "track",
            "userId": "u-ana",
            "event": "Chat Started",
            "properties": {"topic": "boot sizing"},
            "context": {"channel": "chat"},
            "messageId": "h-6",
            "timestamp": at(10),
        },
        {
            "type": "track",
            "userId": "u-ana",
            "event": "Call Completed",
            "properties": {"reason": "delivery times"},
            "context": {"channel": "call_center"},
            "messageId": "h-7",
            "timestamp": at(10, 30),
        },
        {
            "type": "track",
            "userId": "u-ana",
            "event": "Order Completed",
            "properties": {
                "order_id": "pos-1",
                "total": 144,
                "currency": "EUR",
                "store_id": "s-chiado",
                "products": [
                    {"product_id": "boots", "name": "Trail Boots", "price": 120, "quantity": 1},
                    {"product_id": "socks", "name": "Wool Socks", "price": 12, "quantity": 2},
                ],
            },
            "context": {"channel": "store"},
            "messageId": "h-8",
            "timestamp": at(12),
        },
        {
            "type": "track",
            "userId": "u-ana",
            "event": "Product Added",
            "properties": {
                "cart_id": "c-2",
                "currency": "EUR",
                "product_id": "jacket",
                "name": "Rain Jacket",
                "price": 89.5,
            },
            "context": app,
            "messageId": "h-9",
            "timestamp": at(18),
        },
    ]


def ingest_history(engine: Engine) -> None:
    with session_scope(engine) as session:
        upsert_stores(
            session,
            parse_stores(
                [{"id": "s-chiado", "name": "Omni Chiado", "city": "Lisbon", "timezone": "Europe/Lisbon"}]
            ),
            now=DAY,
        )
    history = payloads()
    # As the channels send them, live: the anonymous browse, then the app's sign-in, then the rest (the
    # web identify finds both customers and merges the anonymous one into the app's).
    for part in (history[:2], history[2:3], history[3:]):
        result = ingest_payloads(engine, part, now=TICK)
        assert result.rejected == 0, result


def run_journeys(engine: Engine) -> None:
    """A real tick at 20:00: Ana's jacket cart has been idle two hours, so she enters abandoned_cart."""
    from sequences.tick import run_tick

    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    run_tick(engine, now=TICK, settings=settings, names=["abandoned_cart"])
