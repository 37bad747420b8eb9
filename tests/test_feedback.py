"""Provider feedback in the store (``profiles.feedback``), without HTTP: keywords are whole messages, a
status never moves back, a batch is applied once however often it comes, and events of a merged
customer land on the survivor. SQLite and PostgreSQL. (The webhooks themselves: tests/server.)"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))  # feedback_kit

from feedback_kit import (  # noqa: E402
    EMAIL_KEY,
    NOW,
    SMS_SID,
    consent,
    delivery,
    events,
    provider_events,
    seed,
    sg_event,
)

from profiles.db import session_scope  # noqa: E402
from profiles.feedback import (  # noqa: E402
    PROVIDER_RANK,
    apply_sendgrid_events,
    apply_twilio_inbound,
    apply_twilio_status,
    keyword_of,
)
from profiles.identity import merge_many  # noqa: E402
from profiles.ingest import ingest_payloads  # noqa: E402
from profiles.lookup import resolve_customer_key  # noqa: E402


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


# --- a post is applied set-based, with the outcome of applying its events one at a time ---------------

KINDS = [
    "processed",
    "deferred",
    "delivered",
    "bounce",
    "dropped",
    "open",
    "click",
    "spamreport",
    "unsubscribe",
    "group_unsubscribe",
    "group_resubscribe",
]


def _wipe(engine) -> None:
    from sqlalchemy import text

    from profiles.models import SQLModel

    tables = [t.name for t in SQLModel.metadata.sorted_tables]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in reversed(tables):
                conn.execute(text(f'DELETE FROM "{name}"'))


def _world(engine) -> list[tuple[str, str]]:
    """Ana (feedback_kit) and five more customers, each with a sent email: (delivery key, email)."""
    from sqlalchemy import insert

    from profiles.models import Delivery

    seed(engine)
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": f"c{n}",
                "messageId": f"id-c{n}",
                "traits": {"email": f"c{n}@x.org"},
            }
            for n in range(5)
        ],
        now=NOW - timedelta(days=1),
    )
    pairs = [(EMAIL_KEY, "ana@example.org")]
    with session_scope(engine) as session:
        rows = []
        for n in range(5):
            key = f"campaign:eq:{n}"
            rows.append(
                {
                    "dedupe_key": key,
                    "step_id": "send",
                    "campaign": "eq",
                    "customer_id": resolve_customer_key(session, f"c{n}"),
                    "channel": "email",
                    "connector": "sendgrid",
                    "status": "sent",
                    "attempts": 1,
                    "marketing": True,
                    "created_at": NOW - timedelta(hours=1),
                    "updated_at": NOW - timedelta(hours=1),
                }
            )
            pairs.append((key, f"c{n}@x.org"))
        session.execute(insert(Delivery.__table__), rows)
    return pairs


def _post(pairs: list[tuple[str, str]], size: int, seed_: int) -> list:
    import random

    rng = random.Random(seed_)
    events: list = []
    for n in range(size):
        if rng.random() < 0.03:
            events.append(rng.choice(["junk", {"no": "event"}, 7]))
            continue
        kind = rng.choice(KINDS)
        key, email = rng.choice(pairs)
        where = rng.random()
        if where < 0.1:
            key = f"campaign:gone:{n % 4}"
        elif where < 0.2:
            key, email = None, rng.choice([email, "stranger@x.org"])
        fields: dict = {
            "email": email,
            "timestamp": int((NOW - timedelta(minutes=rng.randrange(60))).timestamp()),
        }
        if kind == "bounce":
            fields.update(type=rng.choice(["bounce", "blocked"]), reason=f"5{n:02d} no")
        elif kind == "dropped":
            fields["reason"] = rng.choice(["Bounced Address", "Spam Content"])
        elif kind == "click":
            fields["url"] = f"https://shop.example.com/{n}"
        event_id = f"e{rng.randrange(size * 3 // 4)}"  # some ids twice: SendGrid's duplicates
        events.append(sg_event(kind, event_id, delivery=key, **fields))
    return events


def _state(engine) -> dict:
    import json

    from sqlalchemy import select

    from profiles.models import Consent, Delivery, Event, ProviderEvent, Suppression

    def rows(table, *columns, where=None):
        query = select(*(table.c[c] for c in columns))
        if where is not None:
            query = query.where(where)
        with session_scope(engine) as session:
            found = [
                tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in r)
                for r in session.execute(query)
            ]
        return sorted(found, key=repr)

    events_table = Event.__table__
    return {
        "deliveries": rows(
            Delivery.__table__, "dedupe_key", "provider_status", "delivered_at", "error", "updated_at"
        ),
        "suppressions": rows(
            Suppression.__table__, "kind", "address", "reason", "source", "detail", "created_at"
        ),
        "consents": rows(Consent.__table__, "customer_id", "channel", "status", "source", "updated_at"),
        # Timeline entries exactly; consent changes by customer and name (a run of opt-outs of one
        # customer in one post makes one event naming the newest, where one at a time names the first).
        "timeline": rows(
            events_table,
            "customer_id",
            "name",
            "channel",
            "properties",
            "occurred_at",
            where=events_table.c.name.in_(["Email Opened", "Email Link Clicked"]),
        ),
        "consent_events": rows(
            events_table,
            "customer_id",
            "name",
            "channel",
            where=events_table.c.name.in_(["Unsubscribed", "Subscribed"]),
        ),
        "provider_events": rows(
            ProviderEvent.__table__,
            "event_key",
            "kind",
            "outcome",
            "delivery_id",
            "address",
            "occurred_at",
            "payload",
        ),
    }


@pytest.mark.parametrize("seed_", [1, 2, 3])
def test_a_post_has_the_outcome_of_its_events_one_at_a_time(engine, seed_):
    post = _post(_world(engine), 300, seed_)
    with session_scope(engine) as session:
        together = apply_sendgrid_events(session, post, now=NOW)
    at_once = _state(engine)

    _wipe(engine)
    _world(engine)
    outcomes: dict[str, int] = {}
    duplicates = 0
    for event in post:
        with session_scope(engine) as session:
            report = apply_sendgrid_events(session, [event], now=NOW)
        duplicates += report.duplicates
        for outcome, count in report.outcomes.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
    one_by_one = _state(engine)

    assert (together.outcomes, together.duplicates) == (outcomes, duplicates)
    assert together.duplicates > 0 and set(together.outcomes) == {"applied", "unknown_delivery", "invalid"}
    for part in at_once:
        assert at_once[part] == one_by_one[part], part
    assert (
        at_once["suppressions"] and at_once["consents"] and at_once["timeline"] and at_once["consent_events"]
    )


def test_a_post_unsubscribed_then_resubscribed_keeps_both_on_the_timeline(engine):
    ana = seed(engine)
    t = NOW - timedelta(minutes=20)
    post = [
        sg_event("unsubscribe", "u", timestamp=int(t.timestamp())),
        sg_event("group_resubscribe", "r", timestamp=int((t + timedelta(minutes=5)).timestamp())),
        sg_event("delivered", "d", timestamp=int(t.timestamp())),
        sg_event("processed", "p"),  # later in the post, earlier in the message's life
        sg_event("bounce", "b1", type="bounce", reason="550 first"),  # final too: the first final word stays
        sg_event("bounce", "b2", type="bounce", reason="550 second"),
        sg_event("spamreport", "s", timestamp=int((t + timedelta(minutes=6)).timestamp())),
        sg_event("unsubscribe", "u2", timestamp=int((t + timedelta(minutes=7)).timestamp())),
    ]
    with session_scope(engine) as session:
        apply_sendgrid_events(session, post, now=NOW)
    names = [(e.name, e.properties["source"]) for e in events(engine, "Unsubscribed", "Subscribed")]
    assert names == [
        ("Unsubscribed", "sendgrid:unsubscribe"),
        ("Subscribed", "sendgrid:group_resubscribe"),
        ("Unsubscribed", "sendgrid:unsubscribe"),  # spamreport then unsubscribe: one event, the newest
    ]
    state = consent(engine, ana, "email")
    assert (state["status"], state["source"]) == ("opted_out", "sendgrid:unsubscribe")
    assert {e.customer_id for e in events(engine, "Unsubscribed", "Subscribed")} == {ana}
    row = delivery(engine, EMAIL_KEY)
    assert (row.provider_status, row.delivered_at, row.error) == ("delivered", t, None)
    from sqlalchemy import select

    from profiles.models import Suppression

    with session_scope(engine) as session:
        [suppressed] = session.execute(select(Suppression.__table__)).all()
    assert (suppressed.address, suppressed.detail) == ("ana@example.org", "550 first")


def test_a_post_takes_the_same_few_statements_whatever_its_size(engine):
    from sqlalchemy import event

    counts = []
    for size, start in ((50, 0), (500, 100)):
        _wipe(engine)
        seed(engine)
        post = [
            sg_event(kind, f"s{start + n}", delivery=EMAIL_KEY if n % 5 else f"campaign:gone:{n}")
            for n, kind in enumerate(["delivered", "open", "click", "unsubscribe", "bounce"] * (size // 5))
        ]
        statements = []

        def count(*_args, statements=statements):
            statements.append(1)

        event.listen(engine, "before_cursor_execute", count)
        try:
            with session_scope(engine) as session:
                report = apply_sendgrid_events(session, post, now=NOW)
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert sum(report.outcomes.values()) == size
        counts.append(len(statements))
    assert counts[0] == counts[1] and counts[1] <= 20, counts
