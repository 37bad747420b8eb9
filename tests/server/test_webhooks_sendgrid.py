"""SendGrid's signed Event Webhook against a live ``omni serve``: real ECDSA P-256 signatures, each event
kind, duplicates, bad and missing signatures, replays outside the window, unknown delivery ids. SQLite
and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from feedback_kit import (
    EMAIL_KEY,
    NOW,
    SendGridKey,
    consent,
    delivery,
    events,
    post_sendgrid,
    provider_events,
    seed,
    sg_event,
    start,
)
from sqlalchemy import select

from profiles.consent import reachability_of
from profiles.db import session_scope
from profiles.models import Suppression


@pytest.fixture
def key() -> SendGridKey:
    return SendGridKey()


@pytest.fixture
def sendgrid(engine, live_server, key):
    ana = seed(engine)
    return start(live_server, engine, key), ana


def suppressed(engine) -> list[tuple[str, str, str]]:
    with session_scope(engine) as session:
        return [(r.address, r.source, r.detail) for r in session.execute(select(Suppression.__table__))]


def test_delivery_events_update_the_delivery_and_never_move_it_back(engine, sendgrid, key):
    server, _ana = sendgrid
    delivered_at = NOW - timedelta(minutes=9)
    answer = post_sendgrid(
        server,
        key,
        [
            sg_event("processed", "e1"),
            sg_event("delivered", "e2", timestamp=int(delivered_at.timestamp())),
            sg_event("deferred", "e3", response="try later"),  # late, out of order
        ],
    )
    assert answer.status_code == 200 and answer.json()["outcomes"] == {"applied": 3}
    row = delivery(engine, EMAIL_KEY)
    assert (row.provider_status, row.delivered_at, row.status) == ("delivered", delivered_at, "sent")
    assert row.error is None


def test_a_hard_bounce_suppresses_the_address_and_a_soft_one_does_not(engine, sendgrid, key):
    server, ana = sendgrid
    post_sendgrid(server, key, [sg_event("bounce", "b1", type="blocked", reason="421 try again later")])
    assert delivery(engine, EMAIL_KEY).provider_status == "blocked" and suppressed(engine) == []
    with session_scope(engine) as session:
        assert reachability_of(session, ana)["email"] is None
    post_sendgrid(server, key, [sg_event("bounce", "b2", type="bounce", reason="550 5.1.1 user unknown")])
    assert suppressed(engine) == [("ana@example.org", "sendgrid:bounce", "550 5.1.1 user unknown")]
    with session_scope(engine) as session:
        reasons = reachability_of(session, ana)
    assert reasons["email"] == "email address suppressed (hard bounce)" and reasons["sms"] is None
    # Blocked first (rank of a final answer): the delivery keeps the provider's first final word.
    assert delivery(engine, EMAIL_KEY).error == "SendGrid bounce: 421 try again later"


def test_dropped_marks_the_delivery_and_a_bounced_address_drop_suppresses(engine, sendgrid, key):
    server, _ana = sendgrid
    post_sendgrid(server, key, [sg_event("dropped", "d1", reason="Bounced Address")])
    row = delivery(engine, EMAIL_KEY)
    assert (row.provider_status, row.error) == ("dropped", "SendGrid dropped: Bounced Address")
    assert [address for address, *_ in suppressed(engine)] == ["ana@example.org"]


def test_opens_and_clicks_go_on_the_timeline_once(engine, sendgrid, key):
    server, ana = sendgrid
    batch = [
        sg_event("open", "o1", sg_machine_open=False),
        sg_event("click", "c1", url="https://shop.example.com/cart?utm_source=omni"),
    ]
    assert post_sendgrid(server, key, batch).status_code == 200
    again = post_sendgrid(server, key, [*batch, sg_event("open", "o1")])  # SendGrid posts twice
    assert again.json()["duplicates"] == 3
    found = events(engine, "Email Opened", "Email Link Clicked")
    assert [(e.name, e.customer_id, e.channel) for e in found] == [
        ("Email Opened", ana, "email"),
        ("Email Link Clicked", ana, "email"),
    ]
    assert found[0].properties == {"delivery_id": EMAIL_KEY}
    assert found[1].properties == {
        "delivery_id": EMAIL_KEY,
        "url": "https://shop.example.com/cart?utm_source=omni",
    }
    assert found[0].occurred_at == NOW - timedelta(minutes=10)
    assert len(provider_events(engine)) == 2


@pytest.mark.parametrize("kind", ["spamreport", "unsubscribe", "group_unsubscribe"])
def test_complaints_and_unsubscribes_opt_out_of_email_and_resubscribe_opts_back_in(
    engine, sendgrid, key, kind
):
    server, ana = sendgrid
    post_sendgrid(server, key, [sg_event(kind, f"{kind}-1")])
    state = consent(engine, ana, "email")
    assert (state["status"], state["source"], state["allowed"]) == ("opted_out", f"sendgrid:{kind}", False)
    [event] = events(engine, "Unsubscribed")
    assert event.properties == {"delivery_id": EMAIL_KEY, "channel": "email", "source": f"sendgrid:{kind}"}
    later = int((NOW - timedelta(minutes=1)).timestamp())
    post_sendgrid(server, key, [sg_event("group_resubscribe", "r1", timestamp=later)])
    state = consent(engine, ana, "email")
    assert (state["status"], state["source"]) == ("opted_in", "sendgrid:group_resubscribe")
    assert [e.name for e in events(engine, "Unsubscribed", "Subscribed")] == ["Unsubscribed", "Subscribed"]


def test_unknown_delivery_ids_are_kept_and_address_facts_still_apply(engine, sendgrid, key):
    server, ana = sendgrid
    answer = post_sendgrid(
        server,
        key,
        [
            sg_event("open", "u1", delivery="campaign:gone:7"),
            sg_event("delivered", "u2", delivery=None),
            sg_event("unsubscribe", "u3", delivery=None),  # found by the address
            sg_event("bounce", "u4", delivery=None, email="Stranger@Example.org", type="bounce"),
            "not an event",
        ],
    )
    assert answer.status_code == 200
    assert answer.json()["outcomes"] == {"unknown_delivery": 4, "invalid": 1}
    kept = provider_events(engine)
    assert [(e.kind, e.outcome, e.delivery_id) for e in kept] == [
        ("open", "unknown_delivery", "campaign:gone:7"),
        ("delivered", "unknown_delivery", None),
        ("unsubscribe", "unknown_delivery", None),
        ("bounce", "unknown_delivery", None),
        ("?", "invalid", None),
    ]
    assert kept[0].payload["sg_event_id"] == "u1" and kept[4].payload == {"value": "not an event"}
    assert events(engine, "Email Opened") == []
    assert delivery(engine, EMAIL_KEY).provider_status is None
    assert consent(engine, ana, "email")["status"] == "opted_out"
    assert [address for address, *_ in suppressed(engine)] == ["stranger@example.org"]


def test_bad_and_missing_signatures_change_nothing(engine, sendgrid, key):
    server, ana = sendgrid
    batch = [sg_event("unsubscribe", "x1")]
    body = json.dumps(batch).encode()
    timestamp = str(int(NOW.timestamp()))
    other = SendGridKey()
    cases = {
        "another key": other.sign(body, timestamp),
        "another body": key.sign(body + b" ", timestamp),
        "another timestamp": key.sign(body, str(int(NOW.timestamp()) - 1)),
        "not base64": "%%%",
        "empty": "",
        "garbage": "c2lnbmF0dXJl",
    }
    for label, signature in cases.items():
        answer = post_sendgrid(server, key, batch, signature=signature, raw=body)
        assert answer.status_code == 403, label
    import httpx

    missing = httpx.post(
        f"{server.url}/webhooks/sendgrid", content=body, headers={"Content-Type": "application/json"}
    )
    assert missing.status_code == 403
    # Re-serialised JSON does not verify: the signature covers the raw bytes.
    pretty = json.dumps(batch, indent=2).encode()
    assert (
        post_sendgrid(server, key, batch, signature=key.sign(body, timestamp), raw=pretty).status_code == 403
    )
    assert consent(engine, ana, "email")["status"] == "default"
    assert provider_events(engine) == []


def test_replays_outside_the_window_are_refused(engine, sendgrid, key):
    server, ana = sendgrid
    batch = [sg_event("unsubscribe", "late")]
    assert post_sendgrid(server, key, batch, at=NOW - timedelta(seconds=301)).status_code == 403
    assert post_sendgrid(server, key, batch, at=NOW + timedelta(seconds=301)).status_code == 403
    assert consent(engine, ana, "email")["status"] == "default"
    assert post_sendgrid(server, key, batch, at=NOW - timedelta(seconds=299)).status_code == 200
    assert consent(engine, ana, "email")["status"] == "opted_out"


def test_without_a_key_the_webhook_refuses_everything(engine, live_server, key):
    from feedback_kit import settings_for

    seed(engine)
    settings = settings_for(engine, key).model_copy(update={"sendgrid_webhook_public_key": None})
    server = live_server(engine, settings, background=False)
    server.app.state.clock = lambda: NOW
    assert post_sendgrid(server, key, [sg_event("unsubscribe", "n1")]).status_code == 503
    assert provider_events(engine) == []


def test_the_official_helper_accepts_what_sendgrid_signs(key):
    """The console's key format and SendGrid's signing, checked with the ``sendgrid`` package itself."""
    from sendgrid.helpers.eventwebhook import EventWebhook

    body, timestamp = '[{"event":"open"}]', "1780412400"
    helper = EventWebhook(key.public_b64)
    assert helper.verify_signature(body, key.sign(body.encode(), timestamp), timestamp)
    assert not helper.verify_signature(body + " ", key.sign(body.encode(), timestamp), timestamp)


def test_the_profile_api_reads_what_the_webhook_learned(engine, sendgrid, key, api_key):
    """Suppression is one rule: the profile API reports the bounce and the complaint the webhook got."""
    import httpx

    server, _ana = sendgrid
    post_sendgrid(server, key, [sg_event("bounce", "pb", type="bounce", reason="550 5.1.1 gone")])
    read = api_key(engine, scope="read", source="desk")
    profile = httpx.get(f"{server.url}/v1/profiles/ana@example.org", auth=(read, ""), timeout=30).json()
    email = profile["consents"]["email"]
    assert (email["status"], email["allowed"], email["reachable"]) == ("default", True, False)
    assert email["unreachable_reason"] == "email address suppressed (hard bounce)"
    assert profile["consents"]["sms"]["reachable"] is True
    post_sendgrid(server, key, [sg_event("spamreport", "ps")])
    profile = httpx.get(f"{server.url}/v1/profiles/ana@example.org", auth=(read, ""), timeout=30).json()
    email = profile["consents"]["email"]
    assert (email["status"], email["source"], email["allowed"]) == ("opted_out", "sendgrid:spamreport", False)
    timeline = httpx.get(
        f"{server.url}/v1/profiles/ana@example.org/timeline", auth=(read, ""), timeout=30
    ).json()
    assert "Unsubscribed" in {entry.get("name") for entry in timeline["events"]}
