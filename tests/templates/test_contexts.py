"""Template contexts: the customer's timezone is the one rule of ``profiles.timezones``, whichever store
the message talks about."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from template_kit import NOW, SETTINGS

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import resolve_customer_key
from profiles.stores import parse_store, upsert_stores
from profiles.timezones import customer_timezones
from sequences.contexts import build_contexts

STORES = [
    {
        "id": "chi",
        "name": "Omni Loop",
        "timezone": "America/Chicago",
        "hours": {"mon": "10:00-18:00", "tue": "12:00-20:00"},
    },
    {
        "id": "lis",
        "name": "Omni Chiado",
        "timezone": "Europe/Lisbon",
        "hours": {"mon": "09:00-17:00", "tue": "11:00-19:00"},
    },
]


def _customer(user: str, traits: dict, *, pickup_at: str | None = None) -> list[dict]:
    payloads = [
        {
            "type": "identify",
            "userId": user,
            "messageId": f"{user}-id",
            "timestamp": "2026-05-01T09:00:00Z",
            "traits": {"email": f"{user}@example.org", **traits},
        }
    ]
    if pickup_at:
        payloads += [
            {
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "messageId": f"{user}-order",
                "timestamp": "2026-05-30T15:00:00Z",
                "properties": {
                    "order_id": f"o-{user}",
                    "total": 10,
                    "fulfillment": "pickup",
                    "store_id": pickup_at,
                },
            },
            {
                "type": "track",
                "userId": user,
                "event": "Order Updated",
                "messageId": f"{user}-ready",
                "timestamp": "2026-05-31T15:00:00Z",
                "properties": {"order_id": f"o-{user}", "status": "ready_for_pickup"},
            },
        ]
    return payloads


@pytest.fixture
def people(engine) -> dict[str, int]:
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=NOW)
    ingest_payloads(
        engine,
        [
            # Home store in Chicago, an order waiting at the Lisbon store.
            *_customer("home", {"home_store_id": "chi"}, pickup_at="lis"),
            # No home store: the store the message talks about is where they pick up (Lisbon), but that
            # store's timezone is not theirs.
            *_customer("pickup", {}, pickup_at="lis"),
            # Their own timezone beats their home store's.
            *_customer("own", {"home_store_id": "chi", "timezone": "Europe/Lisbon"}),
        ],
        now=NOW,
    )
    with session_scope(engine) as session:
        return {u: resolve_customer_key(session, u) for u in ("home", "pickup", "own")}


def _contexts(engine, people: dict[str, int], *, now: datetime, settings: Settings = SETTINGS) -> dict:
    with session_scope(engine) as session:
        contexts = build_contexts(
            session, list(people.values()), now=now, channel="email", template="email/t", settings=settings
        )
        rule = customer_timezones(session, people.values(), settings.default_timezone)
    for user, customer in people.items():
        assert contexts[customer]["customer"]["timezone"] == rule[customer], user
    return {user: contexts[customer] for user, customer in people.items()}


def test_the_customers_timezone_is_the_rules_not_the_store_the_message_talks_about(engine, people):
    contexts = _contexts(engine, people, now=NOW)
    home = contexts["home"]
    assert home["customer"]["timezone"] == "America/Chicago"  # the home store's, not the pickup store's
    assert home["store"]["id"] == "chi" and home["order"]["store"]["id"] == "lis"
    assert home["now"] == NOW and home["now"].tzinfo.key == "America/Chicago"
    pickup = contexts["pickup"]
    assert pickup["store"]["id"] == "lis" and pickup["store"]["source"] == "purchase"
    assert pickup["customer"]["timezone"] == "UTC"  # the default: no timezone of their own, no home store
    assert contexts["own"]["customer"]["timezone"] == "Europe/Lisbon"
    berlin = _contexts(engine, people, now=NOW, settings=Settings(default_timezone="Europe/Berlin"))
    assert berlin["pickup"]["customer"]["timezone"] == "Europe/Berlin"


def test_a_stores_today_is_each_customers_local_day_within_one_batch(engine, people):
    # Tuesday 02:00 UTC: still Monday in Chicago, already Tuesday in Lisbon; "home" and "own" share the
    # Chicago store in one batch.
    contexts = _contexts(engine, people, now=datetime(2026, 6, 2, 2, 0, tzinfo=UTC))
    assert contexts["home"]["store"]["hours_today"] == "10:00-18:00"
    assert contexts["own"]["store"]["hours_today"] == "12:00-20:00"
    assert contexts["home"]["order"]["store"]["hours_today"] == "09:00-17:00"  # Lisbon's Monday hours
