"""The dispatcher records a batch (on PostgreSQL in a thread of its own, while the next batch is read and
rendered) and never claims or sends anything of the next batch before that recording is in; a batch that
cannot be recorded stops the dispatch there; the frequency cap reads the same across batches whatever the
timing. On SQLite and PostgreSQL, with batches of 2."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from journey_kit import T0, customer, deliveries, delivery, seed_stores
from sqlalchemy import select

import sequences.dispatch
from connectors import Connector, Result
from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.models import Delivery, Event, OutboxMessage
from profiles.outbox import OutboxRecorder
from sequences.dispatch import Dispatcher, dispatch_due
from sequences.enrollment import is_held_out
from sequences.gate import DeliveryPolicy
from sequences.reports import TickReport
from sequences.tick import run_tick

FLAGSHIP = ["abandoned_cart"]
BATCHES_OF_2 = Settings(sequence_batch_size=2)


def _abandoners(engine, count: int) -> list[int]:
    seed_stores(engine)
    ids = [n for n in range(1, 100) if not is_held_out(n, "abandoned_cart", 10.0)][:count]
    for n in ids:
        customer(engine, n)
    return ids


def _handed(monkeypatch) -> list[str]:
    """The delivery ids handed to the outbox connector, in order."""
    handed: list[str] = []
    original = OutboxRecorder.__call__

    def record(recorder, rows):
        handed.extend(row["delivery_id"] for row in rows)
        return original(recorder, rows)

    monkeypatch.setattr(OutboxRecorder, "__call__", record)
    return handed


def test_each_batch_is_recorded_before_anything_of_the_next_is_claimed(engine, monkeypatch):
    _abandoners(engine, 7)
    handed = _handed(monkeypatch)
    claim = sequences.dispatch.claim
    seen_at_claims: list[int] = []

    def claim_once_the_batch_before_is_in(session, delivery_ids, *, now):
        # The claim's transaction sees what other transactions committed (the recording thread's work
        # only once it is committed).
        deliveries_, outbox_, events = Delivery.__table__, OutboxMessage.__table__, Event.__table__
        status = dict(session.execute(select(deliveries_.c.dedupe_key, deliveries_.c.status)).all())
        recorded = set(session.execute(select(outbox_.c.delivery_id)).scalars())
        timeline = set(session.execute(select(events.c.message_id)).scalars())
        assert [status[key] for key in handed] == ["sent"] * len(handed)
        assert set(handed) <= recorded and {f"omni:{key}" for key in handed} <= timeline
        seen_at_claims.append(len(handed))
        return claim(session, delivery_ids, now=now)

    monkeypatch.setattr(sequences.dispatch, "claim", claim_once_the_batch_before_is_in)
    report = run_tick(engine, now=T0, names=FLAGSHIP, settings=BATCHES_OF_2)
    assert report.sequences["abandoned_cart"].steps["cart_email"].sent == 7
    assert seen_at_claims == [0, 2, 4, 6]
    assert sorted(handed) == sorted(d.dedupe_key for d in deliveries(engine) if d.status == "sent")
    # The journey moved on from every email, whichever thread recorded it.
    report = run_tick(engine, now=T0 + timedelta(days=1, minutes=5), names=FLAGSHIP, settings=BATCHES_OF_2)
    assert report.sequences["abandoned_cart"].steps["retarget"].added == 7


def test_a_batch_that_cannot_be_recorded_stops_the_dispatch_before_the_next_claim(engine, monkeypatch):
    _abandoners(engine, 4)
    handed = _handed(monkeypatch)

    def disk_full(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sequences.dispatch, "insert_rows", disk_full)
    with pytest.raises(RuntimeError, match="disk full"):
        run_tick(engine, now=T0, names=FLAGSHIP, settings=BATCHES_OF_2)
    emails = [d for d in deliveries(engine) if d.channel == "email"]
    # The first batch was claimed and handed to the provider, its recording failed; nothing of the second
    # batch was claimed.
    assert Counter(d.status for d in emails) == {"sending": 2, "pending": 2}
    assert set(handed) == {d.dedupe_key for d in emails if d.status == "sending"}
    monkeypatch.undo()
    handed = _handed(monkeypatch)
    later = T0 + DeliveryPolicy().sending_timeout + timedelta(minutes=1)
    report = run_tick(engine, now=later, names=FLAGSHIP, settings=BATCHES_OF_2)
    counts = report.sequences["abandoned_cart"].steps["cart_email"]
    assert (counts.unknown, counts.sent) == (2, 2)  # at most once: the claimed ones are never resent
    assert len(handed) == 2
    with session_scope(engine) as session:
        rows = session.execute(select(OutboxMessage.__table__.c.delivery_id)).scalars().all()
    assert len(rows) == len(set(rows))


class _Answers(Connector):
    """An email provider that rejects the delivery ids in ``rejects`` for good and takes the others."""

    provider = "answers"
    channel = "email"
    max_batch_size = 1000

    def __init__(self, rejects: set[str]) -> None:
        self.rejects = rejects
        self.sent: list[str] = []

    def send(self, batch):
        self.sent.extend(m.delivery_id for m in batch)
        return [
            Result.failed(m.delivery_id, "mailbox does not exist")
            if m.delivery_id in self.rejects
            else Result.sent(m.delivery_id, f"p-{m.delivery_id}")
            for m in batch
        ]


@pytest.mark.parametrize("first_rejected", [False, True])
def test_the_frequency_cap_counts_the_batch_before_as_it_ended(engine, first_rejected):
    """Customer 1's first email is in the first batch, the second in the next one, with a cap of one
    message a day: the second waits when the first went out, and goes when the provider rejected it."""
    [one, two] = _abandoners(engine, 2)
    rows = [
        delivery("campaign:a:1", one, campaign="a", template="email/abandoned_cart"),
        delivery("campaign:a:2", two, campaign="a", template="email/abandoned_cart"),
        delivery("campaign:b:1", one, campaign="b", template="email/abandoned_cart"),
    ]
    with session_scope(engine) as session:
        session.execute(Delivery.__table__.insert(), rows)
    connector = _Answers({"campaign:a:1"} if first_rejected else set())
    settings = Settings(sequence_batch_size=2, frequency_cap=1)
    dispatcher = Dispatcher(
        engine=engine,
        now=T0,
        settings=settings,
        policy=DeliveryPolicy.from_settings(settings),
        sequences={},
        campaigns={},
        report=TickReport(now=T0),
        connectors={"email": connector},
    )
    try:
        assert dispatch_due(dispatcher) == 3
    finally:
        dispatcher.close()
    status = {d.dedupe_key: (d.status, d.error) for d in deliveries(engine)}
    if first_rejected:
        assert status["campaign:a:1"] == ("failed", "mailbox does not exist")
        assert status["campaign:b:1"][0] == "sent"
    else:
        assert status["campaign:a:1"][0] == "sent"
        assert status["campaign:b:1"] == ("pending", "frequency cap")
    assert connector.sent.count("campaign:b:1") == int(first_rejected)
