"""Twilio's status callbacks and inbound messages against a live ``omni serve``: real HMAC-SHA1 signatures
(on the request URL, or ``OMNI_PUBLIC_URL`` behind a proxy), out-of-order statuses, 21610, opt-out and
opt-in keywords as whole messages only, unknown numbers and message SIDs. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from feedback_kit import (
    NOW,
    PHONE,
    SMS_KEY,
    SMS_SID,
    TWILIO_TOKEN,
    SendGridKey,
    consent,
    delivery,
    events,
    post_twilio,
    provider_events,
    seed,
    start,
)

from profiles.consent import reachability_of
from profiles.db import session_scope

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


@pytest.fixture
def twilio(engine, live_server):
    ana = seed(engine)
    return start(live_server, engine, SendGridKey()), ana


def status(sid: str, value: str, **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "MessageStatus": value,
        "AccountSid": "AC" + "0" * 32,
        "To": PHONE,
        "From": "+15005550006",
        **extra,
    }


def inbound(body: str, sender: str = PHONE, sid: str = "SMin0001") -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": "AC" + "0" * 32,
        "From": sender,
        "To": "+15005550006",
        "Body": body,
        "NumMedia": "0",
    }


def test_status_callbacks_update_the_delivery_in_order_only(engine, twilio):
    server, _ana = twilio
    for value in ("queued", "sent", "delivered", "sent"):  # the last one arrives late
        answer = post_twilio(server, "/webhooks/twilio/status", status(SMS_SID, value))
        assert answer.status_code == 200 and answer.text == EMPTY_TWIML
    row = delivery(engine, SMS_KEY)
    assert (row.provider_status, row.delivered_at, row.error) == ("delivered", NOW, None)
    # The late "sent" repeats a (MessageSid, status) seen before: processed once.
    assert [e.kind for e in provider_events(engine)] == ["status:queued", "status:sent", "status:delivered"]


def test_a_failed_message_keeps_its_error_code(engine, twilio):
    server, ana = twilio
    post_twilio(server, "/webhooks/twilio/status", status(SMS_SID, "undelivered", ErrorCode="30003"))
    row = delivery(engine, SMS_KEY)
    assert (row.provider_status, row.error) == ("undelivered", "Twilio undelivered (error 30003)")
    assert consent(engine, ana, "sms")["status"] == "opted_in"


def test_21610_opts_the_customer_out_of_sms_as_the_connector_does(engine, twilio):
    server, ana = twilio
    post_twilio(server, "/webhooks/twilio/status", status(SMS_SID, "failed", ErrorCode="21610"))
    state = consent(engine, ana, "sms")
    assert (state["status"], state["source"], state["allowed"]) == ("opted_out", "twilio:21610", False)
    [event] = events(engine, "Unsubscribed")
    assert (event.channel, event.properties) == (
        "sms",
        {"delivery_id": SMS_KEY, "channel": "sms", "source": "twilio:21610"},
    )


def test_a_delivery_id_in_the_callback_url_is_used_and_unknown_sids_are_kept(engine, twilio):
    server, _ana = twilio
    post_twilio(server, f"/webhooks/twilio/status?delivery_id={SMS_KEY}", status("SMother", "delivered"))
    assert delivery(engine, SMS_KEY).provider_status == "delivered"
    post_twilio(server, "/webhooks/twilio/status", status("SMunknown", "failed", ErrorCode="30005"))
    kept = provider_events(engine)
    assert [(e.outcome, e.delivery_id, e.payload["MessageSid"]) for e in kept] == [
        ("applied", SMS_KEY, "SMother"),
        ("unknown_delivery", None, "SMunknown"),
    ]


@pytest.mark.parametrize(
    ("body", "status_after", "keyword"),
    [
        ("STOP", "opted_out", "stop"),
        ("  stop\n", "opted_out", "stop"),
        ("Stop.", "opted_out", "stop"),
        ("unsubscribe", "opted_out", "stop"),
        ("StopAll", "opted_out", "stop"),
        ("cancel", "opted_out", "stop"),
        ("END", "opted_out", "stop"),
        ("quit!", "opted_out", "stop"),
        ("OPTOUT", "opted_out", "stop"),
        ("revoke", "opted_out", "stop"),
        ("please stop sending", "opted_in", None),
        ("STOP it please", "opted_in", None),
        ("stopped", "opted_in", None),
        ("I want to cancel my order", "opted_in", None),
        ("don't stop", "opted_in", None),
        ("HELP", "opted_in", "help"),
        ("info", "opted_in", "help"),
        ("Where is my order?", "opted_in", None),
    ],
)
def test_keywords_are_whole_messages(engine, twilio, body, status_after, keyword):
    server, ana = twilio
    answer = post_twilio(server, "/webhooks/twilio/inbound", inbound(body))
    assert answer.status_code == 200 and answer.text == EMPTY_TWIML
    assert answer.headers["content-type"].startswith("text/xml")
    assert consent(engine, ana, "sms")["status"] == status_after
    [received] = events(engine, "SMS Received")
    assert (received.customer_id, received.channel, received.properties["body"]) == (ana, "sms", body)
    assert received.properties.get("keyword") == keyword


def test_stop_then_start_and_duplicates(engine, twilio):
    server, ana = twilio
    post_twilio(server, "/webhooks/twilio/inbound", inbound("STOP", sid="SM1"))
    post_twilio(server, "/webhooks/twilio/inbound", inbound("STOP", sid="SM1"))  # Twilio retried
    state = consent(engine, ana, "sms")
    assert (state["status"], state["source"]) == ("opted_out", "twilio:STOP")
    with session_scope(engine) as session:
        assert reachability_of(session, ana)["sms"] == "no sms consent (opted_out)"
    post_twilio(server, "/webhooks/twilio/inbound", inbound("Unstop", sid="SM2"))
    state = consent(engine, ana, "sms")
    assert (state["status"], state["source"]) == ("opted_in", "twilio:UNSTOP")
    assert len(events(engine, "SMS Received")) == 2
    assert [(e.name, e.properties["source"]) for e in events(engine, "Unsubscribed", "Subscribed")] == [
        ("Unsubscribed", "twilio:STOP"),
        ("Subscribed", "twilio:UNSTOP"),
    ]


def test_an_unknown_number_is_recorded_not_dropped(engine, twilio):
    server, _ana = twilio
    answer = post_twilio(server, "/webhooks/twilio/inbound", inbound("STOP", sender="+447700900123"))
    assert answer.status_code == 200
    [kept] = provider_events(engine)
    assert (kept.outcome, kept.address, kept.kind, kept.payload["Body"]) == (
        "unknown_number",
        "+447700900123",
        "inbound:stop",
        "STOP",
    )
    assert events(engine, "SMS Received") == []


def test_bad_and_missing_signatures_change_nothing(engine, twilio):
    server, ana = twilio
    params = inbound("STOP")
    url = f"{server.url}/webhooks/twilio/inbound"
    assert post_twilio(server, "/webhooks/twilio/inbound", params, token="another-token").status_code == 403
    assert post_twilio(server, "/webhooks/twilio/inbound", params, signature="").status_code == 403
    assert post_twilio(server, "/webhooks/twilio/inbound", params, signed_url=url + "?x=1").status_code == 403
    from feedback_kit import twilio_signature

    tampered = dict(params, Body="START")
    signature = twilio_signature(TWILIO_TOKEN, url, params)
    assert post_twilio(server, "/webhooks/twilio/inbound", tampered, signature=signature).status_code == 403
    assert (
        post_twilio(server, "/webhooks/twilio/status", status(SMS_SID, "delivered"), token="x").status_code
        == 403
    )
    assert consent(engine, ana, "sms")["status"] == "opted_in"
    assert provider_events(engine) == [] and events(engine, "SMS Received") == []


def test_behind_a_proxy_the_public_url_is_signed(engine, live_server):
    ana = seed(engine)
    server = start(live_server, engine, SendGridKey(), public_url="https://hooks.shop.example/")
    public = "https://hooks.shop.example/webhooks/twilio/inbound"
    local = f"{server.url}/webhooks/twilio/inbound"
    assert (
        post_twilio(server, "/webhooks/twilio/inbound", inbound("STOP"), signed_url=local).status_code == 403
    )
    assert (
        post_twilio(server, "/webhooks/twilio/inbound", inbound("STOP"), signed_url=public).status_code == 200
    )
    # Twilio may sign the URL with the scheme's default port.
    port = "https://hooks.shop.example:443/webhooks/twilio/inbound"
    assert (
        post_twilio(
            server, "/webhooks/twilio/inbound", inbound("START", sid="SM9"), signed_url=port
        ).status_code
        == 200
    )
    assert consent(engine, ana, "sms")["source"] == "twilio:START"
