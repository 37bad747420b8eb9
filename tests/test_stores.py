"""Stores: the opening-hours format, loading a file whole or not at all, and the one rule for "which store
is this customer's" (home, last in-store purchase or pickup, nearest, none) — on SQLite and PostgreSQL,
and what messages say at each level."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import resolve_customer_key
from profiles.stores import (
    StoreFileError,
    customer_stores,
    distance_km,
    normalize_hours,
    parse_store,
    parse_stores,
    upsert_stores,
)
from sequences.contexts import render, render_many
from templates.rendering import RenderError

NOW = datetime(2026, 6, 2, 10, 0, tzinfo=UTC)  # Tuesday; 06:00 in New York, 11:00 in Lisbon
SETTINGS = Settings()  # the built-in templates, UTC by default

# --- opening hours -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hours,expected",
    [
        (
            {"mon-sat": "10:00-21:00", "sun": "11:00-19:00"},
            {
                **dict.fromkeys(["mon", "tue", "wed", "thu", "fri", "sat"], "10:00-21:00"),
                "sun": "11:00-19:00",
            },
        ),
        (
            {"sat,sun": "closed", "mon": "9:00-17:30"},
            {"mon": "09:00-17:30", "sat": "closed", "sun": "closed"},
        ),
        (
            {"fri-mon": "10:00-13:00,14:00-19:00"},
            dict.fromkeys(["mon", "fri", "sat", "sun"], "10:00-13:00, 14:00-19:00"),
        ),
        ({"Friday": "18:00-02:00", "SAT": "00:00-24:00"}, {"fri": "18:00-02:00", "sat": "00:00-24:00"}),
        (
            {"mon-wed,fri": ["09:00-12:00", "13:00-17:00"]},
            dict.fromkeys(["mon", "tue", "wed", "fri"], "09:00-12:00, 13:00-17:00"),
        ),
        ({"tue": "Closed"}, {"tue": "closed"}),
        ({}, {}),
    ],
)
def test_hours_are_normalised_per_day(hours, expected):
    assert normalize_hours(hours) == expected
    assert list(normalize_hours(hours)) == [
        d for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") if d in expected
    ]


@pytest.mark.parametrize(
    "hours,reason",
    [
        ({"mon-sat": "10-21"}, "not an interval"),
        ({"funday": "10:00-12:00"}, "'funday' is not a day"),
        ({"mon-sat": "10:00-21:00", "sat": "closed"}, "sat is given twice"),
        ({"mon": "25:00-26:00"}, "not a time of day"),
        ({"mon": "10:00-10:00"}, "same time"),
        ({"mon": "10:00-14:00,13:00-18:00"}, "overlaps"),
        ({"mon": "20:00-02:00,03:00-04:00"}, "overlaps"),
        ({"mon": 10}, "must be text"),
        ({"mon": ""}, "not an interval"),
        ({"": "10:00-12:00"}, "empty day"),
        (["mon"], "must be an object"),
    ],
)
def test_bad_hours_are_refused_with_the_store_and_the_reason(hours, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        parse_store({"id": "nyc-soho", "name": "SoHo", "hours": hours})
    assert str(caught.value).startswith("store 'nyc-soho': hours:")


def test_a_file_with_a_bad_store_is_refused_whole_with_every_reason():
    values = [
        {"id": "a", "name": "A", "hours": {"mon-sat": "10:00-20:00"}},
        {"id": "b", "name": "B", "hours": {"mon": "late"}},
        {"id": "c", "name": "C", "latitude": 40.7},
        {"id": "a", "name": "A again"},
    ]
    with pytest.raises(StoreFileError) as caught:
        parse_stores(values, [f"stores.json [item {i}]" for i in range(4)])
    problems = caught.value.problems
    assert [source for source, _ in problems] == [
        "stores.json [item 1]",
        "stores.json [item 2]",
        "stores.json [item 3]",
    ]
    assert "store 'b'" in problems[0][1] and "'late' is not an interval" in problems[0][1]
    assert "latitude and longitude go together" in problems[1][1]
    assert "already given" in problems[2][1]
    assert "nothing loaded" in str(caught.value)
    assert [r.id for r in parse_stores(values[:1])] == ["a"]


def test_the_example_file_loads_and_is_normalised():
    values = json.loads((Path(__file__).parent.parent / "examples" / "stores.json").read_text())
    records = parse_stores(values)
    assert records and all(r.latitude is not None and r.postal_code for r in records)
    assert all(set(r.hours) == {"mon", "tue", "wed", "thu", "fri", "sat", "sun"} for r in records)


def test_distance():
    assert 4_000 < distance_km((40.7236, -73.9985), (51.5074, -0.1278)) < 6_000
    assert distance_km((40.0, -73.0), (40.0, -73.0)) == 0


# --- the customer's store ------------------------------------------------------------------------------

STORES = [
    {
        "id": "nyc-soho",
        "name": "Omni SoHo",
        "address": "120 Prince St",
        "city": "New York",
        "postal_code": "10012",
        "country": "US",
        "timezone": "America/New_York",
        "hours": {"mon-sat": "10:00-21:00", "sun": "11:00-19:00"},
        "latitude": 40.7246,
        "longitude": -73.9986,
    },
    {
        "id": "chi-loop",
        "name": "Omni Loop",
        "city": "Chicago",
        "postal_code": "60602",
        "country": "US",
        "timezone": "America/Chicago",
        "hours": {"mon-fri": "10:00-20:00"},
        "latitude": 41.8826,
        "longitude": -87.6278,
    },
    {
        "id": "lis-chiado",
        "name": "Omni Chiado",
        "city": "Lisbon",
        "postal_code": "1200-204",
        "country": "PT",
        "timezone": "Europe/Lisbon",
        "hours": {"mon-sat": "09:00-20:00"},
        "latitude": 38.7107,
        "longitude": -9.1421,
    },
]


def _identify(user: str, traits: dict, *, context: dict | None = None) -> dict:
    return {
        "type": "identify",
        "userId": user,
        "messageId": f"{user}-id",
        "timestamp": "2026-05-01T09:00:00Z",
        "traits": {"email": f"{user}@example.org", "first_name": user.title(), **traits},
        "context": context or {},
    }


def _track(user: str, n: int, event: str, properties: dict, *, context: dict | None = None, at: str) -> dict:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "messageId": f"{user}-{n}",
        "timestamp": at,
        "properties": properties,
        "context": context or {},
    }


def _cart(user: str, n: int) -> dict:
    return _track(
        user,
        n,
        "Product Added",
        {"product_id": "p1", "name": "Tee", "price": 20, "quantity": 1},
        at="2026-06-01T08:00:00Z",
    )


@pytest.fixture
def people(engine) -> dict[str, int]:
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=NOW)
    payloads = [
        # 1. home store (and an older in-store purchase elsewhere, which the home store beats)
        _identify("home", {"home_store_id": "chi-loop", "phone": "+14155550101"}),
        _track(
            "home",
            1,
            "Order Completed",
            {"order_id": "o-home", "total": 5, "store_id": "nyc-soho"},
            context={"channel": "store"},
            at="2026-05-20T12:00:00Z",
        ),
        # 2. last in-store purchase or pickup: the latest one wins; an online (shipped) order does not count
        _identify("buyer", {"phone": "+14155550102"}),
        _track(
            "buyer",
            1,
            "Order Completed",
            {"order_id": "o-b1", "total": 5, "store_id": "nyc-soho"},
            context={"channel": "store"},
            at="2026-05-01T12:00:00Z",
        ),
        _track(
            "buyer",
            2,
            "Order Completed",
            {"order_id": "o-b2", "total": 5, "store_id": "lis-chiado", "fulfillment": "pickup"},
            at="2026-05-10T12:00:00Z",
        ),
        _track(
            "buyer",
            3,
            "Order Completed",
            {"order_id": "o-b3", "total": 5, "store_id": "chi-loop", "fulfillment": "ship"},
            at="2026-05-20T12:00:00Z",
        ),
        _track(
            "buyer",
            4,
            "Order Updated",
            {"order_id": "o-b2", "status": "picked_up"},
            at="2026-05-11T12:00:00Z",
        ),
        # 3a. nearest by coordinates in traits (Evanston, near Chicago)
        _identify("coords", {"latitude": 42.0451, "longitude": -87.6877, "phone": "+14155550103"}),
        # 3b. nearest by postal code in traits (10013 is next to SoHo's 10012)
        _identify("postal", {"address": {"postalCode": "10013", "country": "US"}, "phone": "+14155550104"}),
        # 3c. nearest by the location of their latest event (Lisbon), an older one elsewhere
        _identify("located", {"phone": "+14155550105"}),
        _track(
            "located",
            1,
            "Product Viewed",
            {"product_id": "p1"},
            context={"location": {"latitude": 40.73, "longitude": -73.99}},
            at="2026-05-01T12:00:00Z",
        ),
        _track(
            "located",
            2,
            "Product Viewed",
            {"product_id": "p1"},
            context={"location": {"latitude": 38.72, "longitude": -9.14}},
            at="2026-05-02T12:00:00Z",
        ),
        # 4. nothing known; far away from every store; an unknown home store
        _identify("online", {"phone": "+14155550106"}),
        _identify("faraway", {"latitude": -33.87, "longitude": 151.21, "phone": "+14155550107"}),
        _identify("ghost", {"home_store_id": "closed-down", "phone": "+14155550108"}),
    ]
    for user in ("home", "buyer", "coords", "postal", "located", "online", "faraway", "ghost"):
        payloads.append(_cart(user, 9))
    ingest_payloads(engine, payloads, now=NOW)
    with session_scope(engine) as session:
        return {
            u: resolve_customer_key(session, u)
            for u in ("home", "buyer", "coords", "postal", "located", "online", "faraway", "ghost")
        }


EXPECTED = {
    "home": ("chi-loop", "home"),
    "buyer": ("lis-chiado", "purchase"),
    "coords": ("chi-loop", "nearest"),
    "postal": ("nyc-soho", "nearest"),
    "located": ("lis-chiado", "nearest"),
    "online": None,
    "faraway": None,
    "ghost": None,
}


def test_each_level_of_the_customers_store_rule(engine, people):
    with session_scope(engine) as session:
        stores = customer_stores(session, [*people.values(), 999_999])
    assert stores[999_999] is None
    for user, expected in EXPECTED.items():
        store = stores[people[user]]
        got = (store["id"], store["source"]) if store else None
        assert got == expected, user
    assert stores[people["home"]]["hours"]["fri"] == "10:00-20:00"


def test_the_rule_is_set_based(engine, people):
    from sqlalchemy import event

    statements: list[str] = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with session_scope(engine) as session:
            customer_stores(session, list(people.values()) * 3)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 5


def test_every_customer_gets_the_pickup_reminder(engine, people):
    with session_scope(engine) as session:
        sms = render_many(session, "sms/pickup_reminder", list(people.values()), now=NOW, settings=SETTINGS)
        push_title = {
            u: render_many(session, "email/abandoned_cart", [c], now=NOW, settings=SETTINGS)[c]
            for u, c in people.items()
        }
    for user, customer in people.items():
        outcome = sms[customer]
        assert not isinstance(outcome, RenderError), (user, outcome)
        expected = EXPECTED[user]
        if expected is None:
            assert "pick it up in one of our stores" in outcome.text
        else:
            name = next(s["name"] for s in STORES if s["id"] == expected[0])
            assert f"can wait for you at {name}" in outcome.text
        assert not isinstance(push_title[user], RenderError)
    # Tuesday for the customer (Chicago's store's timezone: theirs too): the store is open
    assert "Omni Loop (open today 10:00-20:00)" in sms[people["home"]].text


def test_day_ranges_show_todays_hours_not_closed(engine, people):
    with session_scope(engine) as session:
        email = render(session, "email/abandoned_cart", people["postal"], now=NOW, settings=SETTINGS)
        sunday = render(
            session,
            "email/abandoned_cart",
            people["buyer"],
            now=datetime(2026, 6, 7, 12, tzinfo=UTC),
            settings=SETTINGS,
        )
    assert "Open today: 10:00-21:00" in email.html and "closed" not in email.html.lower()
    assert "Closed today" in sunday.html  # Lisbon's store does not open on Sundays


def test_today_is_the_customers_local_day(engine, people):
    # Tuesday 02:00 UTC: still Monday for a customer in New York, already Tuesday for one in Lisbon.
    with session_scope(engine) as session:
        upsert_stores(
            session,
            [parse_store({**STORES[0], "hours": {"mon": "10:00-18:00", "tue": "12:00-20:00"}})],
            now=NOW,
        )
    at = datetime(2026, 6, 2, 2, 0, tzinfo=UTC)
    for zone, hours in (("America/New_York", "10:00-18:00"), ("Europe/Lisbon", "12:00-20:00")):
        ingest_payloads(
            engine,
            [{**_identify("postal", {"timezone": zone}), "messageId": f"postal-{zone}"}],
            now=NOW,
        )
        with session_scope(engine) as session:
            email = render(session, "email/abandoned_cart", people["postal"], now=at, settings=SETTINGS)
        assert f"Open today: {hours}" in email.html, zone


def test_hours_stored_before_normalisation_still_show(engine, people):
    from sqlalchemy import update

    from profiles.models import Store

    with session_scope(engine) as session:
        session.execute(update(Store).where(Store.id == "nyc-soho").values(hours={"mon-sat": "10:00-21:00"}))
    with session_scope(engine) as session:
        email = render(session, "email/abandoned_cart", people["postal"], now=NOW, settings=SETTINGS)
    assert "Open today: 10:00-21:00" in email.html
