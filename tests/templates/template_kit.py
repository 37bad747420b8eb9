"""A realistic customer in the store: identified, a cart, a pickup order at a store with hours."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import resolve_customer_key
from profiles.stores import parse_store, upsert_stores

NOW = datetime(2026, 6, 2, 10, 0, tzinfo=UTC)  # a Tuesday
SETTINGS = Settings()  # the defaults (the tests' environment has no OMNI_ variables)

STORES = [
    {
        "id": "nyc-01",
        "name": "Omni SoHo",
        "address": "120 Spring St",
        "city": "New York",
        "region": "NY",
        "postal_code": "10012",
        "country": "US",
        "phone": "+12125550100",
        "timezone": "America/New_York",
        "hours": {"mon": "09:00-20:00", "tue": "09:00-20:00", "wed": "09:00-20:00", "sun": "closed"},
    }
]


def payloads(
    user_id: str = "u-ana",
    *,
    first_name: str | None = "Ana",
    token: str | None = "fcm-token-1",
    phone: str = "+14155550100",
) -> list:
    traits = {"email": f"{user_id}@example.org", "phone": phone, "home_store_id": "nyc-01"}
    if first_name is not None:
        traits["first_name"] = first_name
    context = {"device": {"token": token}} if token else {}
    return [
        {
            "type": "identify",
            "userId": user_id,
            "messageId": f"{user_id}-1",
            "timestamp": "2026-06-01T09:00:00Z",
            "traits": traits,
            "context": context,
        },
        {
            "type": "track",
            "userId": user_id,
            "event": "Product Added",
            "messageId": f"{user_id}-2",
            "timestamp": "2026-06-01T09:05:00Z",
            "properties": {
                "product_id": "p1",
                "sku": "TS-BLK-M",
                "name": "Tee",
                "price": 19.5,
                "quantity": 2,
            },
        },
        {
            "type": "track",
            "userId": user_id,
            "event": "Product Added",
            "messageId": f"{user_id}-3",
            "timestamp": "2026-06-01T09:06:00Z",
            "properties": {"product_id": "p2", "name": "Socks", "price": 5, "quantity": 1, "currency": "USD"},
        },
        {
            "type": "track",
            "userId": user_id,
            "event": "Order Completed",
            "messageId": f"{user_id}-4",
            "timestamp": "2026-05-30T15:00:00Z",
            "properties": {
                "order_id": f"o-{user_id}",
                "total": 44.0,
                "currency": "USD",
                "fulfillment": "pickup",
                "store_id": "nyc-01",
                "products": [{"product_id": "p9", "name": "Jacket", "price": 44.0, "quantity": 1}],
            },
        },
        {
            "type": "track",
            "userId": user_id,
            "event": "Order Updated",
            "messageId": f"{user_id}-5",
            "timestamp": "2026-05-31T15:00:00Z",
            "properties": {"order_id": f"o-{user_id}", "status": "ready_for_pickup"},
        },
    ]


def seed(engine: Engine, *, user_id: str = "u-ana", **kwargs) -> int:
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=NOW)
    ingest_payloads(engine, payloads(user_id, **kwargs), now=NOW)
    with session_scope(engine) as session:
        return resolve_customer_key(session, user_id)
