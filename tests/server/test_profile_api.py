"""The profile API through a live ``omni serve`` (real HTTP with httpx), on SQLite and PostgreSQL: one
shopper's history across web, app, chat, call centre and a store's till, looked up by any of her keys."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from history import EMAIL, HOSTILE, PHONE, TICK, ingest_history, run_journeys
from sqlalchemy import select

from omni.core.channels import TOUCHPOINTS
from profiles.apikeys import revoke_key
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import PROFILE_VIEWED, VIEWED_CHANNEL
from profiles.models import Event, is_touchpoint
from profiles.timeline import customer_view

VIEWED_AT = datetime(2026, 6, 1, 21, 0, tzinfo=UTC)


@pytest.fixture
def ana(engine, live_server, api_key):
    """A live server over Ana's history (journeys run), and a read key of the source ``desk``."""
    ingest_history(engine)
    run_journeys(engine)
    server = live_server(engine, background=False)
    server.app.state.clock = lambda: VIEWED_AT
    key = api_key(engine, scope="read", source="desk")
    client = httpx.Client(base_url=server.url, auth=(key, ""), timeout=30)
    yield server, client
    client.close()


def views(engine) -> list[Event]:
    with session_scope(engine) as session:
        return (
            session.execute(select(Event).where(Event.name == PROFILE_VIEWED).order_by(Event.id))
            .scalars()
            .all()
        )


def test_a_profile_has_everything_an_agent_needs(ana, engine):
    _server, client = ana
    answer = client.get(f"/v1/profiles/{EMAIL}")
    assert answer.status_code == 200, answer.text
    profile = answer.json()
    assert profile["name"] == "Ana Silva"
    assert profile["email"] == EMAIL and profile["phone"] == PHONE
    assert profile["traits"]["nickname"] == HOSTILE  # JSON carries it as it came; the page escapes it
    assert profile["merged_from"]  # the anonymous web visitor merged into the app's customer
    assert {(i["kind"], i["value"]) for i in profile["identities"]} >= {
        ("user_id", "u-ana"),
        ("anonymous_id", "anon-ana"),
        ("email", EMAIL),
        ("phone", PHONE),
        ("device_token", "tok-ana"),
        ("loyalty_id", "L-7"),
    }
    assert profile["channels_used"] == sorted(["web", "app", "chat", "call_center", "store"])
    consents = profile["consents"]
    assert consents["email"] == {
        "status": "default",
        "source": None,
        "updated_at": None,
        "allowed": True,
        "reachable": True,
        "unreachable_reason": None,
    }
    assert consents["sms"]["status"] == "opted_in" and consents["sms"]["reachable"] is True
    assert consents["push"]["reachable"] is False
    assert consents["push"]["unreachable_reason"] == "no push consent (never opted in)"
    cart = profile["open_cart"]
    assert [(i["name"], i["quantity"], i["price"]) for i in cart["items"]] == [("Rain Jacket", 1, 89.5)]
    assert cart["value"] == 89.5 and cart["currency"] == "EUR"
    [order] = profile["orders"]
    assert order["order_id"] == "pos-1" and order["channel"] == "store"
    assert order["store"] == {"id": "s-chiado", "name": "Omni Chiado", "city": None, "timezone": None}
    assert (order["total"], order["status"], order["fulfillment"]) == (144.0, "placed", "in_store")
    [journey] = profile["journeys"]
    assert journey["sequence"] == "abandoned_cart"
    assert journey["status"] in ("active", "holdout") and journey["open"] is True
    assert journey["next_run_at"] is not None
    if journey["status"] == "active":
        email = profile["last_messages"]["email"]
        assert email["event"] == "Email Sent" and email["template"] == "email/abandoned_cart"
        assert email["sequence"] == "abandoned_cart" and email["delivery_status"] == "sent"
        assert datetime.fromisoformat(email["sent_at"]) == TICK
    else:  # the control group is sent nothing
        assert profile["last_messages"] == {}


@pytest.mark.parametrize(
    "key",
    [
        EMAIL,
        "  ANA@Example.org ",
        PHONE,
        "phone:+351 912 345 678",
        "email:ana@example.org",
        "user_id:u-ana",
        "anonymous_id:anon-ana",  # the merged-away visitor's identity
        "device_token:tok-ana",
        "loyalty_id:L-7",
        "customer_id:1",  # the merged-away customer's own id
    ],
)
def test_any_identity_answers_with_the_surviving_customer(ana, key):
    _server, client = ana
    answer = client.get(f"/v1/profiles/{key}")
    assert answer.status_code == 200, answer.text
    survivor = client.get(f"/v1/profiles/{EMAIL}").json()["customer_id"]
    assert answer.json()["customer_id"] == survivor
    assert 1 in answer.json()["merged_from"]


@pytest.mark.parametrize(
    ("key", "status", "reason"),
    [
        ("nobody@example.org", 404, "no customer has email 'nobody@example.org'"),
        ("user_id:nobody", 404, "no customer has user_id 'nobody'"),
        ("customer_id:999", 404, "no customer has customer_id '999'"),
        ("+1555", 400, "malformed phone number '+1555'"),
        ("phone:call me", 400, "malformed phone number 'call me'"),
        ("twitter:@ana", 400, "unknown identity kind 'twitter'"),
        ("ana", 400, "cannot read customer key 'ana'"),
        ("email:not-an-email", 400, "malformed email address 'not-an-email'"),
        ("customer_id:x", 400, "malformed customer id 'x'"),
    ],
)
def test_unknown_and_malformed_keys_say_why(ana, key, status, reason):
    _server, client = ana
    answer = client.get(f"/v1/profiles/{key}")
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert reason in answer.json()["detail"]


def test_only_active_read_keys_may_look(ana, engine, api_key):
    server, client = ana
    url = f"{server.url}/v1/profiles/{EMAIL}"
    write = api_key(engine, scope="write", source="web")
    for auth in (None, (write, ""), ("omni_r_not-a-key", "")):
        answer = httpx.get(url, auth=auth)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Basic")
        assert answer.json()["detail"]
    for path in ("", "/timeline"):
        assert httpx.get(url + path, auth=(write, "")).status_code == 401
    read = api_key(engine, scope="read", source="clienteling")
    assert httpx.get(url, auth=(read, "")).status_code == 200
    with session_scope(engine) as session:
        revoke_key(session, read)
    assert httpx.get(url, auth=(read, "")).status_code == 401
    assert [v.properties["source"] for v in views(engine)] == ["clienteling"]  # refused looks leave no trace


def test_each_lookup_is_recorded_on_the_timeline(ana, engine):
    _server, client = ana
    before = client.get(f"/v1/profiles/{EMAIL}").json()
    [view] = views(engine)
    assert view.customer_id == before["customer_id"]
    assert view.channel == VIEWED_CHANNEL and view.channel not in TOUCHPOINTS
    assert view.properties == {"source": "desk", "via": "api"}
    assert view.occurred_at == VIEWED_AT
    # The first page of a timeline is a lookup; its next pages are the same one.
    first = client.get(f"/v1/profiles/{EMAIL}/timeline", params={"limit": 2}).json()
    client.get(f"/v1/profiles/{EMAIL}/timeline", params={"limit": 2, "cursor": first["next_cursor"]})
    assert len(views(engine)) == 2
    newest = client.get(f"/v1/profiles/{EMAIL}/timeline", params={"limit": 1}).json()["events"][0]
    assert (newest["name"], newest["channel"], newest["properties"]["via"]) == (PROFILE_VIEWED, "omni", "api")


def test_looking_a_customer_up_is_no_touchpoint_of_theirs(ana, engine):
    _server, client = ana
    before = client.get(f"/v1/profiles/{EMAIL}").json()
    again = client.get(f"/v1/profiles/{EMAIL}").json()
    assert (
        again["channels_used"]
        == before["channels_used"]
        == sorted(["web", "app", "chat", "call_center", "store"])
    )
    with session_scope(engine) as session:
        assert customer_view(session, before["customer_id"], limit=0)["channels"] == before["channels_used"]
        used = session.execute(
            select(Event.channel)
            .where(Event.customer_id == before["customer_id"], is_touchpoint(Event.name))
            .distinct()
        ).scalars()
        assert VIEWED_CHANNEL not in set(used)


def test_the_timeline_pages_newest_first_across_channels(ana, engine):
    _server, client = ana
    everything = client.get(f"/v1/profiles/{EMAIL}/timeline", params={"limit": 200}).json()
    assert everything["next_cursor"] is None
    times = [e["occurred_at"] for e in everything["events"]]
    assert times == sorted(times, reverse=True)
    customer_events = [e for e in everything["events"] if e["name"] != PROFILE_VIEWED]
    assert {e["channel"] for e in customer_events} >= {"web", "app", "chat", "call_center", "store"}
    order = next(e for e in everything["events"] if e["name"] == "Order Completed")
    assert order["summary"] == "order pos-1 total 144.00 EUR at store s-chiado"
    pages, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/profiles/{EMAIL}/timeline", params=params).json()
        pages.append(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    paged = [e["message_id"] for page in pages for e in page]
    assert all(len(page) == 3 for page in pages[:-1])
    # The first page's own Profile Viewed came after `everything` was read: one more event, first.
    assert paged[1:] == [e["message_id"] for e in everything["events"]]


def test_pages_are_stable_when_events_arrive_meanwhile(ana, engine):
    _server, client = ana
    first = client.get(
        f"/v1/profiles/{EMAIL}/timeline", params={"limit": 4, "channel": ["web", "app"]}
    ).json()
    assert {e["channel"] for e in first["events"]} <= {"web", "app"}
    rest_before = client.get(
        f"/v1/profiles/{EMAIL}/timeline",
        params={"limit": 50, "channel": ["web", "app"], "cursor": first["next_cursor"]},
    ).json()
    # New events, at the same instant as the newest and later, arrive between two pages.
    newest = datetime.fromisoformat(first["events"][0]["occurred_at"])
    arrivals = [
        {
            "type": "track",
            "userId": "u-ana",
            "event": "Product Viewed",
            "properties": {"product_id": f"p{n}"},
            "context": {"channel": "web"},
            "messageId": f"late-{n}",
            "timestamp": (newest + timedelta(minutes=n)).isoformat(),
        }
        for n in range(3)
    ]
    assert ingest_payloads(engine, arrivals, now=TICK + timedelta(hours=1)).accepted == 3
    rest_after = client.get(
        f"/v1/profiles/{EMAIL}/timeline",
        params={"limit": 50, "channel": ["web", "app"], "cursor": first["next_cursor"]},
    ).json()
    assert rest_after == rest_before
    seen = [e["message_id"] for e in first["events"] + rest_after["events"]]
    assert len(seen) == len(set(seen))


def test_the_timeline_filters_by_channel_and_refuses_unknown_ones(ana):
    _server, client = ana
    chat = client.get(f"/v1/profiles/{EMAIL}/timeline", params={"channel": "chat"}).json()
    assert [(e["channel"], e["name"]) for e in chat["events"]] == [("chat", "Chat Started")]
    two = client.get(
        f"/v1/profiles/{EMAIL}/timeline", params=[("channel", "chat"), ("channel", "store")]
    ).json()
    assert [e["name"] for e in two["events"]] == ["Order Completed", "Chat Started"]
    bad = client.get(f"/v1/profiles/{EMAIL}/timeline", params=[("channel", "chat"), ("channel", "fax")])
    assert bad.status_code == 400
    assert bad.json()["detail"].startswith("unknown channel 'fax' (expected one of web, app, store")
    assert client.get(f"/v1/profiles/{EMAIL}/timeline", params={"cursor": "bm9wZQ"}).status_code == 400
    assert client.get(f"/v1/profiles/{EMAIL}/timeline", params={"limit": 1000}).status_code == 422
    assert client.get("/v1/profiles/nobody@example.org/timeline").status_code == 404


def test_the_api_is_typed_in_openapi(ana):
    server, _client = ana
    schema = httpx.get(f"{server.url}/openapi.json").json()
    profile = schema["components"]["schemas"]["Profile"]["properties"]
    assert {"consents", "open_cart", "orders", "journeys", "last_messages", "identities"} <= set(profile)
    timeline = schema["paths"]["/v1/profiles/{key}/timeline"]["get"]
    assert {"200", "400", "401", "404"} <= set(timeline["responses"])
