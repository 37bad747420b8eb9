"""Suppression is one rule (``profiles.suppression``): opt-outs and opt-ins from any source are consent
decisions with an event on the timeline, a hard bounce makes the address unreachable, and the audience
conditions, the dispatcher's gate and the profile API's reachability all read it. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from audiences import compile_condition
from connectors.base import Effect, EffectKind
from omni.core.channels import SEND_CHANNELS
from profiles.consent import ConsentDecision, consents_of, reachability_of
from profiles.db import session_scope
from profiles.identity import merge_many
from profiles.ingest import ingest_payloads
from profiles.models import Consent, Event, Suppression
from profiles.suppression import (
    customers_with,
    lift_suppression,
    live_customer,
    opt_in,
    opt_out,
    record_consents,
    suppress_address,
)
from sequences.effects import apply_effects
from sequences.gate import DeliveryPolicy, Gate

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def identify(engine, user: str, **traits) -> int:
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": user,
                "messageId": f"id-{user}-{len(traits)}-{sorted(traits.items())}",
                "timestamp": (NOW - timedelta(days=1)).isoformat(),
                "traits": traits,
            }
        ],
        now=NOW - timedelta(days=1),
    )
    with session_scope(engine) as session:
        from profiles.lookup import resolve_customer_key

        return resolve_customer_key(session, user)


def consent_events(engine, customer_id: int) -> list[tuple[str, dict, str]]:
    table = Event.__table__
    with session_scope(engine) as session:
        rows = session.execute(
            select(table.c.name, table.c.properties, table.c.channel)
            .where(table.c.customer_id == customer_id, table.c.name.in_(["Unsubscribed", "Subscribed"]))
            .order_by(table.c.id)
        ).all()
    return [(r.name, r.properties, r.channel) for r in rows]


def test_an_opt_out_is_a_consent_decision_and_one_event_however_often_it_comes(engine):
    ana = identify(engine, "ana", email="ana@example.org", sms_opt_in=True, phone="+14155550100")
    for _ in range(3):
        with session_scope(engine) as session:
            opt_out(session, [ana], "email", source="one_click", now=NOW, touchpoint="email", operator=True)
    with session_scope(engine) as session:
        consent = consents_of(session, ana)["email"]
    assert (consent["status"], consent["source"], consent["allowed"]) == ("opted_out", "one_click", False)
    assert consent_events(engine, ana) == [
        ("Unsubscribed", {"channel": "email", "source": "one_click"}, "email")
    ]
    later = NOW + timedelta(minutes=5)
    with session_scope(engine) as session:
        changed = opt_in(session, [ana], "email", source="preference_centre", now=later, touchpoint="web")
    assert [(d.channel, d.status, d.source) for d in changed] == [("email", "opted_in", "preference_centre")]
    assert consent_events(engine, ana)[-1] == (
        "Subscribed",
        {"channel": "email", "source": "preference_centre"},
        "web",
    )


def test_an_older_decision_changes_nothing_and_writes_no_event(engine):
    ana = identify(engine, "ana", email="ana@example.org")
    with session_scope(engine) as session:
        opt_in(session, [ana], "email", source="preference_centre", now=NOW, touchpoint="web")
        # SendGrid's unsubscribe from before the customer opted back in, delivered late.
        changed = opt_out(
            session,
            [ana],
            "email",
            source="sendgrid:unsubscribe",
            now=NOW,
            at=NOW - timedelta(hours=1),
            touchpoint="email",
        )
    assert changed == []
    assert [name for name, *_ in consent_events(engine, ana)] == ["Subscribed"]


def test_a_decision_on_a_channel_without_consent_is_refused(engine):
    ana = identify(engine, "ana", email="ana@example.org")
    with session_scope(engine) as session, pytest.raises(ValueError, match="carries no consent"):
        record_consents(
            session, [ConsentDecision(ana, "webhook", "opted_out", "x", NOW)], now=NOW, touchpoint="web"
        )


def test_a_hard_bounce_makes_the_address_unreachable_for_every_reader(engine):
    ana = identify(engine, "ana", email="ana@example.org", phone="+14155550100", sms_opt_in=True)
    twin = identify(engine, "twin", email="ana@example.org")  # another profile with the same address
    bob = identify(engine, "bob", email="bob@example.org")
    with session_scope(engine) as session:
        assert suppress_address(
            session,
            "email",
            " Ana@Example.org ",
            source="sendgrid:bounce",
            now=NOW,
            detail="550 5.1.1 user unknown",
        )
        assert not suppress_address(session, "email", "ana@example.org", source="sendgrid:bounce", now=NOW)
    with session_scope(engine) as session:
        reachable = set(session.execute(compile_condition({"reachable": "email"}, now=NOW)).scalars())
        consent = set(session.execute(compile_condition({"consent": "email"}, now=NOW)).scalars())
        sms = set(session.execute(compile_condition({"reachable": "sms"}, now=NOW)).scalars())
        ads = set(session.execute(compile_condition({"reachable": "ads"}, now=NOW)).scalars())
        reasons = reachability_of(session, ana)
        gate = Gate.load(session, [ana, twin, bob], ["email", "sms"], now=NOW, policy=DeliveryPolicy())
        [row] = session.execute(select(Suppression.__table__)).all()
    assert reachable == {bob}
    assert consent == {ana, twin, bob}  # consent is untouched: the address is what cannot receive
    assert sms == {ana} and ads == {ana, twin, bob}  # other channels still reach them
    assert reasons["email"] == "email address suppressed (hard bounce)" and reasons["sms"] is None
    assert set(reasons) == set(SEND_CHANNELS)
    assert gate.unreachable(ana, "email") == "email address suppressed (hard bounce)"
    assert gate.unreachable(twin, "email") == "email address suppressed (hard bounce)"
    assert gate.unreachable(bob, "email") is None and gate.unreachable(ana, "sms") is None
    assert (row.kind, row.address, row.reason, row.source) == (
        "email",
        "ana@example.org",
        "hard_bounce",
        "sendgrid:bounce",
    )
    # A new address is reachable again; lifting the suppression restores the old one.
    identify(engine, "twin", email="twin@example.org")
    with session_scope(engine) as session:
        assert reachability_of(session, twin)["email"] is None
        assert lift_suppression(session, "email", "ana@example.org")
        assert reachability_of(session, ana)["email"] is None


def test_the_connectors_21610_goes_through_the_same_rule(engine):
    ana = identify(engine, "ana", phone="+14155550100", sms_opt_in=True)
    with session_scope(engine) as session:
        counts = apply_effects(
            session, [Effect(EffectKind.SMS_OPTED_OUT, ana, "+14155550100", "twilio:21610")], now=NOW
        )
        assert counts[EffectKind.SMS_OPTED_OUT] == 1
        assert consents_of(session, ana)["sms"]["source"] == "twilio:21610"
        assert reachability_of(session, ana)["sms"] == "no sms consent (opted_out)"
    assert consent_events(engine, ana) == [
        ("Unsubscribed", {"channel": "sms", "source": "twilio:21610"}, "sms")
    ]


def test_customers_are_found_by_address_and_merged_ones_by_their_survivor(engine):
    ana = identify(engine, "ana", email="ana@example.org", phone="+14155550100")
    other = identify(engine, "other", email="other@example.org")
    with session_scope(engine) as session:
        assert customers_with(session, "email", "ana@example.org") == [ana]
        assert customers_with(session, "phone", "+14155550100") == [ana]
        merge_many(session, [(ana, [other])], now=NOW)
    with session_scope(engine) as session:
        assert live_customer(session, other) == ana
        assert customers_with(session, "email", "other@example.org") == [ana]
        assert live_customer(session, 999_999) is None
        rows = session.execute(select(Consent.__table__)).all()
    assert rows == []
