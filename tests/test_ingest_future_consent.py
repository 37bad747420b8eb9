"""Future-dated payloads cannot pin consent: an opt-out from the customer or an operator always takes
effect. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from typer.testing import CliRunner

from omni.cli import app
from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import IngestOptions, ingest_payloads
from profiles.models import Consent, RejectedEvent

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def identify(mid, timestamp, **traits):
    return {"type": "identify", "userId": "u1", "messageId": mid, "timestamp": timestamp, "traits": traits}


def unsubscribed(mid, timestamp, channel="sms"):
    return {
        "type": "track",
        "userId": "u1",
        "event": "Unsubscribed",
        "messageId": mid,
        "timestamp": timestamp,
        "properties": {"channel": channel},
    }


def subscribed(mid, timestamp, channel="sms"):
    return {**unsubscribed(mid, timestamp, channel), "event": "Subscribed"}


def sms(engine):
    with session_scope(engine) as s:
        row = s.execute(select(Consent).where(Consent.channel == "sms")).scalars().one_or_none()
        return None if row is None else (row.status, row.updated_at)


def test_a_payload_dated_far_in_the_future_is_rejected_and_the_customer_can_opt_out(engine):
    result = ingest_payloads(engine, [identify("i", "9999-12-31T00:00:00Z", sms_opt_in=True)], now=NOW)
    assert result.rejected == 1
    with session_scope(engine) as s:
        [reason] = s.execute(select(RejectedEvent.reason)).scalars()
    assert "more than 24 hours after the time of receipt" in reason
    ingest_payloads(engine, [identify("i2", "2026-06-02T11:00:00Z", sms_opt_in=True)], now=NOW)
    ingest_payloads(engine, [unsubscribed("u", "2026-06-02T12:30:00Z")], now=NOW.replace(hour=13))
    assert sms(engine)[0] == "opted_out"


def test_a_tolerated_future_time_counts_from_receipt_for_consent(engine):
    """23 h ahead is within the tolerance (device clocks), but the opt-in counts from when it was
    received: an Unsubscribed an hour later still wins."""
    ingest_payloads(engine, [identify("i", "2026-06-03T11:00:00Z", sms_opt_in=True)], now=NOW)
    assert sms(engine) == ("opted_in", NOW)
    later = NOW.replace(hour=13)
    ingest_payloads(engine, [unsubscribed("u", "2026-06-02T13:00:00Z")], now=later)
    assert sms(engine) == ("opted_out", later)


def test_the_future_limit_is_a_setting(engine):
    hour = IngestOptions.of(Settings(ingest_max_future_hours=1))
    result = ingest_payloads(
        engine,
        [unsubscribed("a", "2026-06-02T12:59:00Z"), unsubscribed("b", "2026-06-02T13:01:00Z", "email")],
        options=hour,
        now=NOW,
    )
    assert result.as_dict() == {"accepted": 1, "duplicates": 0, "rejected": 1}
    no_limit = IngestOptions.of(Settings(ingest_max_future_hours=0))
    far = [unsubscribed("c", "2090-01-01T00:00:00Z")]
    assert ingest_payloads(engine, far, options=no_limit, now=NOW).accepted == 1


def pin_sms_opt_in(engine) -> None:
    """Customer 1's SMS opt-in stored as dated 9999-12-31: what the version before this fix let a
    future-dated payload write."""
    with session_scope(engine) as s:
        s.execute(
            insert(Consent).values(
                customer_id=1,
                channel="sms",
                status="opted_in",
                source="identify:traits.sms_opt_in",
                updated_at=datetime(9999, 12, 31, tzinfo=UTC),
            )
        )


def test_a_consent_pinned_in_the_future_by_an_earlier_version_does_not_block_an_opt_out(engine):
    ingest_payloads(engine, [identify("i", "2026-06-01T00:00:00Z")], now=NOW)
    pin_sms_opt_in(engine)
    ingest_payloads(engine, [unsubscribed("u", "2026-06-02T11:00:00Z")], now=NOW)
    assert sms(engine) == ("opted_out", datetime(2026, 6, 2, 11, 0, tzinfo=UTC))


@pytest.mark.parametrize("same_batch", [True, False])
@pytest.mark.parametrize("opt_out_first", [True, False])
def test_at_the_same_time_an_opt_out_beats_an_opt_in_whatever_the_order(engine, same_batch, opt_out_first):
    at = "2026-06-02T10:00:00Z"
    pair = [unsubscribed("out", at), subscribed("in", at)]
    if not opt_out_first:
        pair.reverse()
    if same_batch:
        ingest_payloads(engine, pair, now=NOW)
    else:
        for payload in pair:
            ingest_payloads(engine, [payload], now=NOW)
    assert sms(engine)[0] == "opted_out"
    # A later opt-in still re-subscribes: the customer can change their mind.
    ingest_payloads(engine, [subscribed("again", "2026-06-02T10:00:01Z")], now=NOW)
    assert sms(engine)[0] == "opted_in"


def test_an_operator_consent_set_always_takes_effect_at_the_time_of_the_command(engine, database_url):
    ingest_payloads(engine, [identify("i", "2026-06-01T00:00:00Z", email="ana@example.org")], now=NOW)
    pin_sms_opt_in(engine)  # by an earlier version, or any later-stamped decision
    result = CliRunner().invoke(
        app,
        ["consent", "set", "ana@example.org", "sms", "opted_out", "--database-url", database_url]
        + ["--now", "2026-06-02T12:00:00Z", "--json"],
    )
    assert result.exit_code == 0, result.output
    assert sms(engine) == ("opted_out", NOW)
    # From then on the feed's later decisions apply as usual.
    ingest_payloads(engine, [subscribed("s", "2026-06-02T12:30:00Z")], now=NOW.replace(hour=13))
    assert sms(engine)[0] == "opted_in"
