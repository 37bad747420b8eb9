"""The outbox connector (default of every channel) and applying provider effects, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from connectors import (
    AudienceMember,
    ConnectorConfigError,
    Effect,
    Message,
    Status,
    get_connector,
    send_batch,
)
from connectors.outbox import OutboxConnector
from omni.core.settings import Settings
from profiles.consent import consents_of
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Identity
from profiles.outbox import OutboxRecorder, list_outbox
from sequences.effects import apply_effects

NOW = datetime(2026, 6, 2, 10, 0, tzinfo=UTC)


def email(i: int) -> Message:
    return Message(
        delivery_id=f"d{i}",
        channel="email",
        to=f"c{i}@example.org",
        customer_id=i,
        template="email/abandoned_cart",
        subject="You left something",
        html="<p>Hi</p>",
        text="Hi",
        unsubscribe_url="https://u/x",
    )


def test_every_channel_defaults_to_the_outbox(engine):
    writer = OutboxRecorder(engine)
    for channel in ("email", "sms", "push", "ads", "webhook"):
        connector = get_connector(channel, Settings(), outbox=writer)
        assert isinstance(connector, OutboxConnector) and connector.writer is writer


def test_the_outbox_needs_a_writer():
    with pytest.raises(ConnectorConfigError, match="outbox writer"):
        get_connector("email", Settings())


def test_unknown_provider_and_wrong_channel_are_config_errors(engine):
    with pytest.raises(ConnectorConfigError, match="OMNI_EMAIL_CONNECTOR='mailchimp'"):
        get_connector("email", Settings(email_connector="mailchimp"))
    with pytest.raises(ConnectorConfigError, match="does not send sms"):
        get_connector("sms", Settings(sms_connector="sendgrid"))


def test_records_messages_exactly_and_idempotently(engine):
    connector = OutboxConnector(OutboxRecorder(engine, clock=lambda: NOW))
    report = send_batch(connector, [email(i) for i in range(3)])
    assert report.counts()["sent"] == 3
    assert report.results[0].provider_id == "outbox:d0"
    again = connector.send([email(0), email(3)])
    assert [r.status for r in again] == [Status.SENT, Status.SENT]
    assert [r.provider_id for r in again] == ["outbox:d0", "outbox:d3"]
    assert [r.info.get("already_recorded", False) for r in again] == [True, False]
    with session_scope(engine) as session:
        rows = list_outbox(session)
        assert len(rows) == 4
        first = next(r for r in rows if r["delivery_id"] == "d0")
        assert first["to"] == "c0@example.org" and first["subject"] == "You left something"
        assert first["body"] == "Hi" and first["sent_at"] == NOW
        assert (
            first["payload"]["html"] == "<p>Hi</p>" and first["payload"]["unsubscribe_url"] == "https://u/x"
        )
        assert list_outbox(session, channel="sms") == []


def test_the_writer_records_only_new_delivery_ids(engine):
    record = OutboxRecorder(engine, clock=lambda: NOW)
    row = {
        "delivery_id": "d1",
        "channel": "sms",
        "customer_id": 1,
        "recipient": "+14155550100",
        "template": "sms/pickup_reminder",
        "subject": None,
        "body": "Ready",
        "payload": {"delivery_id": "d1"},
    }
    assert record([row]) == {"d1"}
    assert record([{**row, "body": "changed"}, {**row, "delivery_id": "d2"}]) == {"d2"}
    with session_scope(engine) as session:
        assert [r["body"] for r in list_outbox(session, channel="sms")] == ["Ready", "Ready"]
    assert "OutboxRecorder(database=" in repr(OutboxConnector(record))


def test_ads_and_push_go_to_the_outbox_too(engine):
    connector = OutboxConnector(OutboxRecorder(engine, clock=lambda: NOW))
    connector.send(
        [
            Message(
                delivery_id="a1",
                channel="ads",
                to="cart_retargeting",
                customer_id=7,
                action="add",
                member=AudienceMember(customer_id=7, email="x@example.org"),
            ),
            Message(delivery_id="p1", channel="push", to="tok", customer_id=7, title="T", text="B"),
        ]
    )
    with session_scope(engine) as session:
        ads = list_outbox(session, channel="ads")[0]
        push = list_outbox(session, channel="push")[0]
    assert ads["body"] == "add" and ads["payload"]["member"] == {"customer_id": 7}
    assert "x@example.org" not in str(ads)
    assert push["subject"] == "T" and push["body"] == "B"


def test_effects_opt_out_sms_and_remove_device_tokens(engine):
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": "u1",
                "messageId": "m1",
                "timestamp": "2026-06-01T00:00:00Z",
                "traits": {"phone": "+14155550100", "sms_opt_in": True},
                "context": {"device": {"token": "tok-1"}},
            },
        ],
        now=NOW,
    )
    with session_scope(engine) as session:
        customer_id = session.execute(select(Identity.customer_id).where(Identity.value == "u1")).scalar_one()
    effects = [
        Effect("sms_opted_out", customer_id, "+14155550100", "twilio:21610"),
        Effect("device_token_invalid", customer_id, "tok-1", "fcm:UNREGISTERED"),
    ]
    with session_scope(engine) as session:
        counts = apply_effects(session, effects, now=NOW)
    assert counts == {"sms_opted_out": 1, "device_token_invalid": 1}
    with session_scope(engine) as session:
        sms = consents_of(session, customer_id)["sms"]
        assert sms["status"] == "opted_out" and sms["source"] == "twilio:21610" and not sms["allowed"]
        assert session.execute(select(Identity).where(Identity.value == "tok-1")).first() is None
