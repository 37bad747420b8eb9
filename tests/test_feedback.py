"""Provider feedback in the store (``profiles.feedback``), without HTTP: keywords are whole messages, a
status never moves back, a batch is applied once however often it comes, and events of a merged
customer land on the survivor. SQLite and PostgreSQL. (The webhooks themselves: tests/server.)"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))  # feedback_kit

from feedback_kit import EMAIL_KEY, NOW, SMS_SID, delivery, events, provider_events, seed, sg_event  # noqa: E402

from profiles.db import session_scope  # noqa: E402
from profiles.feedback import (  # noqa: E402
    PROVIDER_RANK,
    apply_sendgrid_events,
    apply_twilio_inbound,
    apply_twilio_status,
    keyword_of,
)
from profiles.identity import merge_many, resolve_customer_key  # noqa: E402
from profiles.ingest import ingest_payloads  # noqa: E402


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("STOP", ("stop", "STOP")),
        ("stop", ("stop", "STOP")),
        (" Stop!\n", ("stop", "STOP")),
        ("...stopall...", ("stop", "STOPALL")),
        ("Unsubscribe", ("stop", "UNSUBSCRIBE")),
        ("optout", ("stop", "OPTOUT")),
        ("REVOKE", ("stop", "REVOKE")),
        ("start", ("start", "START")),
        ("Yes", ("start", "YES")),
        ("unstop", ("start", "UNSTOP")),
        ("help?", ("help", "HELP")),
        ("please stop sending", (None, None)),
        ("stop stop", (None, None)),
        ("STOP2", (None, None)),
        ("s t o p", (None, None)),
        ("", (None, None)),
        (None, (None, None)),
        ("yes please", (None, None)),
    ],
)
def test_keywords_are_the_whole_message(body, expected):
    assert keyword_of(body) == expected


def test_advanced_opt_out_type_wins():
    assert keyword_of("ARRET", "STOP") == ("stop", "ARRET")
    assert keyword_of("hello", "") == (None, None)


def test_ranks_order_every_status_the_providers_send():
    assert PROVIDER_RANK["queued"] < PROVIDER_RANK["sent"] < PROVIDER_RANK["delivered"]
    assert PROVIDER_RANK["deferred"] < PROVIDER_RANK["delivered"] == PROVIDER_RANK["bounced"]


def test_a_batch_of_a_thousand_events_is_applied_once(engine):
    ana = seed(engine)
    batch = [sg_event("open", f"o{n}") for n in range(1000)]
    with session_scope(engine) as session:
        first = apply_sendgrid_events(session, batch, now=NOW)
    with session_scope(engine) as session:
        again = apply_sendgrid_events(session, batch, now=NOW)
    assert first.outcomes == {"applied": 1000} and first.duplicates == 0
    assert again.outcomes == {} and again.duplicates == 1000
    assert len(events(engine, "Email Opened")) == 1000
    assert {e.customer_id for e in events(engine, "Email Opened")} == {ana}


def test_events_without_an_id_are_deduplicated_by_content(engine):
    seed(engine)
    event = sg_event("open", "x")
    del event["sg_event_id"]
    with session_scope(engine) as session:
        apply_sendgrid_events(session, [event, dict(event)], now=NOW)
    assert len(events(engine, "Email Opened")) == 1 and len(provider_events(engine)) == 1


def test_a_future_timestamp_counts_from_receipt(engine):
    seed(engine)
    future = int((NOW + timedelta(days=30)).timestamp())
    with session_scope(engine) as session:
        apply_sendgrid_events(session, [sg_event("delivered", "d", timestamp=future)], now=NOW)
    assert delivery(engine, EMAIL_KEY).delivered_at == NOW


def test_feedback_for_a_merged_customer_lands_on_the_survivor(engine):
    ana = seed(engine)
    ingest_payloads(
        engine,
        [{"type": "identify", "userId": "bo", "messageId": "id-bo", "traits": {"phone": "+14155550199"}}],
        now=NOW,
    )
    with session_scope(engine) as session:
        bo = resolve_customer_key(session, "bo")
        merge_many(session, [(ana, [bo])], now=NOW)
    with session_scope(engine) as session:
        outcome = apply_twilio_inbound(
            session, {"MessageSid": "SMx", "From": "+14155550199", "Body": "STOP"}, now=NOW
        )
        assert outcome == "applied"
        assert (
            apply_twilio_status(session, {"MessageSid": SMS_SID, "MessageStatus": "sent"}, now=NOW)
            == "applied"
        )
        assert (
            apply_twilio_status(session, {"MessageSid": SMS_SID, "MessageStatus": "sent"}, now=NOW)
            == "duplicate"
        )
    [received] = events(engine, "SMS Received")
    assert received.customer_id == ana
