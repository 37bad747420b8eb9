"""Looking customers up by the keys other systems hold (profiles.lookup), and the timeline's keyset pages
(profiles.timeline.timeline_page). Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import (
    BadCursor,
    BadKey,
    CustomerKey,
    decode_cursor,
    encode_cursor,
    find_customer,
    parse_key,
)
from profiles.timeline import timeline_page

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("key", "kind", "value"),
    [
        (" Ana@Example.ORG ", "email", "ana@example.org"),
        ("+1 (415) 555-0123", "phone", "+14155550123"),
        ("+351912345678", "phone", "+351912345678"),
        ("(415) 555-0123", "phone", "+14155550123"),  # national: the default region
        ("phone:+44 20 7946 0958", "phone", "+442079460958"),
        ("email:ANA@example.org", "email", "ana@example.org"),
        ("user_id:u:42", "user_id", "u:42"),  # only the first colon separates the kind
        ("USER_ID: u-42 ", "user_id", "u-42"),
        ("anonymous_id:3f1c-77", "anonymous_id", "3f1c-77"),
        ("device_token:abc", "device_token", "abc"),
        ("loyalty_id:L-7", "loyalty_id", "L-7"),
        ("customer_id:17", "customer_id", "17"),
    ],
)
def test_keys_are_read_as_ingest_stores_identities(key, kind, value):
    assert parse_key(key, default_region="US") == CustomerKey(kind, value)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty customer key"),
        ("u-42", "cannot read customer key 'u-42': expected an email, an E.164 phone"),
        ("+1555", "malformed phone number '+1555'"),
        ("12345", "malformed phone number '12345'"),
        ("phone:abc", "malformed phone number 'abc'"),
        ("email:ana", "malformed email address 'ana'"),
        ("ana@", "malformed email address 'ana@'"),
        ("twitter:ana", "unknown identity kind 'twitter' in key 'twitter:ana' (expected one of user_id,"),
        ("user_id:", "empty user_id"),
        ("customer_id:abc", "malformed customer id 'abc'"),
    ],
)
def test_malformed_keys_name_what_is_wrong(key, reason):
    with pytest.raises(BadKey) as caught:
        parse_key(key, default_region="US")
    assert reason in str(caught.value)


def test_every_identity_finds_the_survivor_of_a_merge(engine):
    ingest_payloads(
        engine,
        [
            {
                "type": "page",
                "anonymousId": "a-1",
                "name": "Home",
                "messageId": "m1",
                "timestamp": "2026-06-01T09:00:00Z",
            }
        ],
        now=NOW,
    )
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": "u-1",
                "traits": {"email": "bo@example.org", "loyalty_id": 7},
                "messageId": "m2",
                "timestamp": "2026-06-01T09:05:00Z",
            }
        ],
        now=NOW,
    )
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "anonymousId": "a-1",
                "traits": {"email": "bo@example.org"},
                "messageId": "m3",
                "timestamp": "2026-06-01T09:10:00Z",
            }
        ],
        now=NOW,
    )
    with session_scope(engine) as session:
        survivor = find_customer(session, parse_key("user_id:u-1", default_region="US"))
        for key in (
            "bo@example.org",
            "anonymous_id:a-1",
            "loyalty_id:7",
            "customer_id:1",
            f"customer_id:{survivor}",
        ):
            assert find_customer(session, parse_key(key, default_region="US")) == survivor, key
        assert survivor != 1  # the anonymous visitor (customer 1) merged into the known one
        assert find_customer(session, parse_key("user_id:a-1", default_region="US")) is None  # kinds differ
        assert find_customer(session, parse_key("nobody@example.org", default_region="US")) is None
        assert find_customer(session, parse_key("customer_id:999", default_region="US")) is None


def test_cursors_are_opaque_and_checked():
    position = (datetime(2026, 6, 1, 9, 0, 0, 123456, tzinfo=UTC), 42)
    cursor = encode_cursor(position)
    assert "2026" not in cursor and "=" not in cursor
    assert decode_cursor(cursor) == position
    for bad in ("", "x", "bm9wZQ", encode_cursor(position)[:-3], "eyJ0IjogIjIwMjYtMDYtMDEiLCAiaSI6IHRydWV9"):
        with pytest.raises(BadCursor):
            decode_cursor(bad)


def test_timeline_pages_are_keyset_pages_newest_first(engine):
    start = datetime(2026, 6, 1, tzinfo=UTC)
    same = start + timedelta(hours=1)
    events = [
        {
            "type": "track",
            "userId": "u-1",
            "event": f"E{n}",
            "context": {"channel": "web" if n % 2 else "app"},
            "messageId": f"e{n}",
            # Three share one instant: the id orders them.
            "timestamp": (same if n in (3, 4, 5) else start + timedelta(minutes=n)).isoformat(),
        }
        for n in range(10)
    ]
    ingest_payloads(engine, events, now=NOW)
    with session_scope(engine) as session:
        customer = find_customer(session, parse_key("user_id:u-1", default_region="US"))
        everything, end = timeline_page(session, customer, limit=100)
        assert end is None and len(everything) == 10
        order = [(e["occurred_at"], e["message_id"]) for e in everything]
        assert [o[0] for o in order] == sorted((o[0] for o in order), reverse=True)
        paged, before = [], None
        while True:
            page, before = timeline_page(session, customer, limit=3, before=before)
            paged += page
            if before is None:
                break
        assert [e["message_id"] for e in paged] == [e["message_id"] for e in everything]
        web, _ = timeline_page(session, customer, limit=100, channels=["web"])
        assert {e["channel"] for e in web} == {"web"} and len(web) == 5
