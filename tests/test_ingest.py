"""Ingestion of Segment payloads: validation, rejections kept with reasons, duplicates, time, channels,
consent. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import IngestOptions, ingest_files, ingest_payloads
from profiles.models import Consent, Customer, Event, RejectedEvent
from profiles.segment import derive_message_id

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def ingest(engine, *payloads, now=NOW, batch_size=None):
    options = IngestOptions() if batch_size is None else IngestOptions(batch_size=batch_size)
    return ingest_payloads(engine, list(payloads), options=options, now=now)


def rows(engine, model, *where):
    with session_scope(engine) as s:
        return s.execute(select(model).where(*where)).scalars().all()


def count(engine, model):
    with session_scope(engine) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def track(event="Page Viewed", user="u1", mid=None, **extra):
    payload = {"type": "track", "userId": user, "event": event, **extra}
    if mid:
        payload["messageId"] = mid
    return payload


BAD_PAYLOADS = [
    ({"type": "bogus", "userId": "u"}, "unknown type 'bogus'"),
    ({"userId": "u", "event": "X"}, "missing 'type'"),
    ({"type": "track", "userId": "u"}, "track without an event name"),
    ({"type": "track", "userId": "u", "event": "  "}, "track without an event name"),
    ({"type": "track", "event": "X"}, "neither userId nor anonymousId"),
    ({"type": "track", "userId": "u", "event": "X", "timestamp": "yesterday"}, "unparseable timestamp"),
    ({"type": "track", "userId": "u", "event": "X", "sentAt": 12}, "unparseable sentAt"),
    ({"type": "alias", "userId": "u"}, "alias without a previousId"),
    ({"type": "alias", "previousId": "a"}, "alias without a userId"),
    ({"type": "group", "userId": "u"}, "group without a groupId"),
    ({"type": "track", "userId": "u", "event": "X", "properties": [1]}, "'properties' must be a JSON object"),
    (
        {"type": "track", "userId": "u", "event": "X", "context": {"channel": "fax"}},
        "unknown context.channel",
    ),
    (
        {"type": "identify", "userId": "u", "traits": {"sms_opt_in": "yes"}},
        "traits.sms_opt_in must be true or false",
    ),
    (
        {"type": "track", "userId": "u", "event": "Unsubscribed", "properties": {}},
        "Unsubscribed: properties.channel",
    ),
    (
        {
            "type": "track",
            "userId": "u",
            "event": "Product Added",
            "properties": {"product_id": "p", "price": "x"},
        },
        "properties.price must be a number",
    ),
    (
        {"type": "track", "userId": "u", "event": "Product Added", "properties": {"price": 1}},
        "without properties.product_id",
    ),
    ({"type": "track", "userId": {"id": 1}, "event": "X"}, "userId must be a string"),
    ({"type": "track", "userId": "u", "event": "X", "messageId": "m" * 300}, "messageId is longer than"),
    ({"batch": [{"type": "batch", "batch": []}]}, "cannot be nested"),
    (42, "expected a JSON object, got a number"),
    ("text", "expected a JSON object, got a string"),
    ({"batch": "nope"}, "'batch' is not an array"),
]


@pytest.mark.parametrize(("payload", "reason"), BAD_PAYLOADS, ids=[r for _, r in BAD_PAYLOADS])
def test_each_kind_of_bad_payload_is_rejected_with_its_reason_and_kept(engine, payload, reason):
    result = ingest(engine, payload, track(mid="good"))
    assert (result.accepted, result.duplicates, result.rejected) == (1, 0, 1)
    [rejected] = rows(engine, RejectedEvent)
    assert reason in rejected.reason
    assert rejected.raw  # the raw text is kept for a person to fix and replay
    assert rejected.received_at == NOW
    assert count(engine, Event) == 1


def test_payload_over_32_kb_is_rejected_with_that_reason(engine):
    big = track(mid="big", properties={"blob": "x" * (33 * 1024)})
    result = ingest(engine, big)
    assert result.rejected == 1
    assert "over the Segment limit of 32 KB" in rows(engine, RejectedEvent)[0].reason


def test_file_counts_add_up_and_sources_name_file_and_line(engine, tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [
        json.dumps(track(mid="m1")),
        "{broken",
        json.dumps(track(mid="m1")),
        json.dumps({"type": "track", "userId": "u1"}),
        "[1,2]",
        "7",
        json.dumps(track(mid="m2")),
    ]
    path.write_text("\n".join(lines) + "\n")
    result = ingest_files(engine, [str(path)], now=NOW)
    assert result.as_dict() == {"accepted": 2, "duplicates": 1, "rejected": 4}
    assert result.read == len(lines)
    sources = {r.source: r.reason for r in rows(engine, RejectedEvent)}
    assert set(sources) == {f"{path}:2", f"{path}:4", f"{path}:5", f"{path}:6"}
    assert sources[f"{path}:4"] == "track without an event name"


def test_stdin_is_read_with_dash(engine):
    data = "\n".join(json.dumps(track(mid=f"s{i}")) for i in range(3)).encode()
    result = ingest_files(engine, ["-"], now=NOW, stdin=io.BytesIO(data))
    assert result.accepted == 3
    assert {e.message_id for e in rows(engine, Event)} == {"s0", "s1", "s2"}


def test_duplicates_within_a_batch_across_batches_and_across_runs(engine):
    first = ingest(engine, track(mid="a"), track(mid="a"), track(mid="b"), batch_size=2)
    assert first.as_dict() == {"accepted": 2, "duplicates": 1, "rejected": 0}
    again = ingest(engine, track(mid="a"), track(mid="c"))
    assert again.as_dict() == {"accepted": 1, "duplicates": 1, "rejected": 0}
    assert count(engine, Event) == 3


def test_payload_without_message_id_gets_a_deterministic_one(engine):
    payload = track(properties={"x": 1}, timestamp="2026-06-01T10:00:00Z")
    assert ingest(engine, payload).accepted == 1
    assert ingest(engine, dict(payload)).duplicates == 1
    [event] = rows(engine, Event)
    assert event.message_id == derive_message_id(payload)
    assert derive_message_id({"b": 1, "a": 2}) == derive_message_id({"a": 2, "b": 1})


def test_event_time_is_timestamp_else_sent_at_else_receive_time_in_utc(engine):
    ingest(
        engine,
        track(mid="ts", timestamp="2026-06-01T12:00:00+02:00", sentAt="2026-06-01T11:00:00Z"),
        track(mid="sent", sentAt="2026-06-01T11:00:00Z"),
        track(mid="none"),
        track(mid="naive", timestamp="2026-06-01T08:00:00"),
    )
    times = {e.message_id: e.occurred_at for e in rows(engine, Event)}
    assert times["ts"] == datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert times["sent"] == datetime(2026, 6, 1, 11, 0, tzinfo=UTC)
    assert times["none"] == NOW
    assert times["naive"] == datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
    assert all(t.tzinfo is not None for t in times.values())


@pytest.mark.parametrize(
    ("context_channel", "stored"),
    [
        (None, "web"),
        ("store", "store"),
        ("call_center", "call_center"),
        ("chat", "chat"),
        ("social", "social"),
        ("browser", "web"),
        ("mobile", "app"),
        ("server", "web"),
        ("APP", "app"),
    ],
)
def test_touchpoint_channel_comes_from_context_channel(engine, context_channel, stored):
    context = {"channel": context_channel} if context_channel else {}
    ingest(engine, track(mid="c", context=context))
    assert rows(engine, Event)[0].channel == stored


def test_every_payload_type_is_stored(engine):
    result = ingest(
        engine,
        {"type": "identify", "userId": "u1", "traits": {"first_name": "Ana"}, "messageId": "1"},
        {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "2"},
        {"type": "page", "anonymousId": "a1", "name": "Home", "messageId": "3"},
        {"type": "screen", "userId": "u1", "name": "Cart", "messageId": "4"},
        {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"plan": "gold"}, "messageId": "5"},
        {"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "6"},
    )
    assert result.accepted == 6
    events = {e.message_id: e for e in rows(engine, Event)}
    assert events["3"].name == "Home"
    assert events["5"].properties == {"plan": "gold", "groupId": "g1"}
    assert events["6"].properties == {"previousId": "a1"}
    # alias linked the anonymous page view to u1
    assert len({e.customer_id for e in events.values()}) == 1


def test_batch_envelope_items_count_one_by_one(engine):
    envelope = {
        "batch": [track(mid="b1"), {"type": "track", "userId": "u1"}, track(mid="b1")],
        "context": {"channel": "mobile"},
    }
    result = ingest(engine, envelope)
    assert result.as_dict() == {"accepted": 1, "duplicates": 1, "rejected": 1}
    assert rows(engine, Event)[0].channel == "app"


def test_identify_traits_fill_the_profile(engine):
    ingest(
        engine,
        {
            "type": "identify",
            "userId": "u1",
            "messageId": "i1",
            "timestamp": "2026-06-01T10:00:00Z",
            "traits": {
                "email": "  Ana@Example.ORG ",
                "phone": "(415) 555-0100",
                "firstName": "Ana",
                "last_name": "Silva",
                "timezone": "Europe/Lisbon",
                "home_store_id": "s-1",
                "tier": "gold",
            },
            "context": {"locale": "pt-PT", "timezone": "Europe/Paris"},
        },
    )
    [customer] = rows(engine, Customer)
    assert customer.email == "ana@example.org"
    assert customer.phone == "+14155550100"
    assert (customer.first_name, customer.last_name, customer.locale) == ("Ana", "Silva", "pt-PT")
    assert customer.timezone == "Europe/Lisbon"
    assert customer.context_timezone == "Europe/Paris"
    assert customer.home_store_id == "s-1"
    assert customer.traits["tier"] == "gold"


def test_older_identify_arriving_late_only_fills_missing_traits(engine):
    newer = {
        "type": "identify",
        "userId": "u1",
        "messageId": "n",
        "timestamp": "2026-06-02T10:00:00Z",
        "traits": {"first_name": "Ana", "tier": "gold"},
    }
    older = {
        "type": "identify",
        "userId": "u1",
        "messageId": "o",
        "timestamp": "2026-06-01T10:00:00Z",
        "traits": {"first_name": "Anna", "tier": "silver", "city": "Porto"},
    }
    ingest(engine, newer)
    ingest(engine, older)
    [customer] = rows(engine, Customer)
    assert customer.first_name == "Ana"
    assert customer.traits == {"first_name": "Ana", "tier": "gold", "city": "Porto"}


def consent_map(engine):
    return {(c.customer_id, c.channel): c.status for c in rows(engine, Consent)}


def test_consent_from_identify_traits(engine):
    ingest(
        engine,
        {
            "type": "identify",
            "userId": "u1",
            "messageId": "i",
            "traits": {"email_opt_out": True, "sms_opt_in": True, "push_opt_in": False, "ads_opt_out": False},
        },
    )
    assert consent_map(engine) == {
        (1, "email"): "opted_out",
        (1, "sms"): "opted_in",
        (1, "push"): "opted_out",
        (1, "ads"): "opted_in",
    }


def test_consent_events_and_newest_decision_wins_whatever_the_arrival_order(engine):
    unsub = track("Unsubscribed", mid="u", timestamp="2026-06-02T10:00:00Z", properties={"channel": "email"})
    sub = track("Subscribed", mid="s", timestamp="2026-06-01T10:00:00Z", properties={"channel": "email"})
    ingest(engine, unsub)
    ingest(engine, sub)  # older: ignored
    [consent] = rows(engine, Consent)
    assert (consent.status, consent.source) == ("opted_out", "track:Unsubscribed")
    ingest(
        engine,
        track("Subscribed", mid="s2", timestamp="2026-06-03T10:00:00Z", properties={"channel": "email"}),
    )
    assert rows(engine, Consent)[0].status == "opted_in"


def test_same_batch_is_committed_together_and_rejections_do_not_stop_it(engine):
    payloads = [track(mid=f"m{i}") if i % 3 else "garbage" for i in range(30)]
    result = ingest(engine, *payloads, batch_size=7)
    assert result.as_dict() == {"accepted": 20, "duplicates": 0, "rejected": 10}
    assert count(engine, Event) == 20
    assert count(engine, RejectedEvent) == 10


def test_ingest_options_come_from_the_settings():
    assert IngestOptions.of(Settings()) == IngestOptions()  # the defaults are the settings' defaults
    settings = Settings(
        ingest_batch_size=7,
        ingest_transaction_size=70,
        ingest_parse_workers=0,
        default_phone_region="GB",
        ingest_max_future_hours=2,
    )
    assert IngestOptions.of(settings) == IngestOptions(
        batch_size=7, transaction_size=70, parse_workers=0, default_region="GB", max_future=timedelta(hours=2)
    )


def test_batches_share_a_transaction_and_an_interrupted_ingest_resumes_without_loss(engine):
    options = IngestOptions(batch_size=2, transaction_size=4)

    def interrupted():
        for i in range(10):
            yield track(mid=f"m{i}")
        raise ConnectionError("feed dropped")

    # Batches of 2 in transactions of 4: m0-m3 and m4-m7 commit; m8-m9 were in the open transaction.
    with pytest.raises(ConnectionError):
        ingest_payloads(engine, interrupted(), options=options, now=NOW)
    assert sorted(e.message_id for e in rows(engine, Event)) == [f"m{i}" for i in range(8)]
    # Running the whole feed again stores the rest; what was stored counts as duplicates.
    again = ingest(engine, *(track(mid=f"m{i}") for i in range(10)), batch_size=2)
    assert again.as_dict() == {"accepted": 2, "duplicates": 8, "rejected": 0}
    assert count(engine, Event) == 10
