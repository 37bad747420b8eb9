"""One tick over many workers (sequences.shards): on PostgreSQL, shard workers on real parallel connections
send each delivery once, leave nothing due, honour exits, and survive a worker that dies; on SQLite a
sharded tick is the one-writer tick."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from journey_kit import T0, customer, no_sleep, seed_stores
from sqlalchemy import func, select, text

import sequences.dispatch
from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.models import Delivery, Enrollment, Event, OutboxMessage
from profiles.outbox import OutboxRecorder
from sequences.definitions import load_sequences
from sequences.exits import exit_enrollments
from sequences.gate import DeliveryPolicy
from sequences.reports import ShardsFailed, TickReport
from sequences.shards import Shard, ShardBusy, shard_count, shard_lease
from sequences.tick import run_shard, run_tick

CUSTOMERS = 3000
SEQUENCE = "abandoned_cart"
CART_ITEMS = '[{"product_id": "tee", "sku": null, "name": "Black Tee", "price": 19.5, "quantity": 2}]'


def _postgres(engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("shard workers run on PostgreSQL; SQLite keeps one writer")


def _shoppers(engine, count: int = CUSTOMERS) -> None:
    """``count`` customers with an email, a phone with SMS consent, a home store and an open cart idle for
    two hours at T0, written with SQL (ingesting thousands of events would dominate the test)."""
    seed_stores(engine)
    created, cart_at = (T0 - timedelta(days=10)).isoformat(), (T0 - timedelta(hours=2)).isoformat()
    series = f"SELECT i FROM generate_series(1::bigint, {count}) AS g(i)"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, email, phone, first_name, home_store_id, traits, created_at, "
                f"updated_at) SELECT s.i, 'c' || s.i || '@example.org', '+1212' || (2000000 + s.i), "
                f"'Cust' || s.i, CASE WHEN s.i % 3 = 0 THEN 'lis' ELSE 'nyc' END, '{{}}', "
                f"'{created}'::timestamptz, '{created}'::timestamptz FROM ({series}) AS s"
            )
        )
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('customers', 'id'), {count})"))
        conn.execute(
            text(
                "INSERT INTO consents (customer_id, channel, status, source, updated_at) "
                f"SELECT s.i, 'sms', 'opted_in', 'test', '{created}'::timestamptz FROM ({series}) AS s"
            )
        )
        conn.execute(
            text(
                "INSERT INTO carts (customer_id, status, items, item_count, value, currency, started_at, "
                f"updated_at) SELECT s.i, 'open', '{CART_ITEMS}', 2, 39.0, 'USD', "
                f"'{cart_at}'::timestamptz, '{cart_at}'::timestamptz FROM ({series}) AS s"
            )
        )


def _buy(engine, customer_ids, at) -> None:
    """An ``Order Completed`` at the till for each customer, at ``at``."""
    rows = [
        {
            "message_id": f"buy-{n}-{at.isoformat()}",
            "customer_id": n,
            "type": "track",
            "name": "Order Completed",
            "channel": "store",
            "properties": {"order_id": f"pos-{n}", "total": 39.0},
            "context": {},
            "occurred_at": at,
            "received_at": at,
        }
        for n in customer_ids
    ]
    with session_scope(engine) as session:
        session.execute(Event.__table__.insert(), rows)


class Sends:
    """Every message handed to the outbox connector, before its own dedupe by delivery id (which would
    hide a second send): a second send of a delivery shows here."""

    def __init__(self, monkeypatch) -> None:
        self.lock = threading.Lock()
        self.ids: list[str] = []
        original = OutboxRecorder.__call__

        def record(recorder, rows):
            with self.lock:
                self.ids.extend(row["delivery_id"] for row in rows)
            return original(recorder, rows)

        monkeypatch.setattr(OutboxRecorder, "__call__", record)

    def twice(self) -> list[str]:
        return [key for key, count in Counter(self.ids).items() if count > 1]


def _left_behind(engine, now) -> tuple[int, int]:
    """(due pending deliveries, due active enrollments) at ``now``."""
    deliveries, enrollments = Delivery.__table__, Enrollment.__table__
    with session_scope(engine) as session:
        pending = session.execute(
            select(func.count())
            .select_from(deliveries)
            .where(deliveries.c.status.in_(("pending", "sending")), deliveries.c.next_attempt_at <= now)
        ).scalar()
        walking = session.execute(
            select(func.count())
            .select_from(enrollments)
            .where(enrollments.c.status == "active", enrollments.c.next_run_at <= now)
        ).scalar()
    return pending, walking


def _not_sent(engine) -> list[tuple]:
    """(customer, step, status, error) of each delivery that did not go out, so a failure says why."""
    table = Delivery.__table__
    with session_scope(engine) as session:
        return [
            tuple(row)
            for row in session.execute(
                select(table.c.customer_id, table.c.step_id, table.c.status, table.c.error).where(
                    table.c.status != "sent"
                )
            )
        ]


def _outbox_duplicates(engine) -> int:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        rows, distinct = session.execute(
            select(func.count(), func.count(table.c.delivery_id.distinct()))
        ).one()
    return rows - distinct


def _tick(engine, at, *, shards=4, run_shards=None, stage=None) -> TickReport:
    return run_tick(
        engine,
        now=at,
        settings=Settings(),
        names=[SEQUENCE],
        sleep=no_sleep,
        shards=shards,
        run_shards=run_shards,
        stage=stage,
    )


def _competing_workers(engine, at, per_shard: int):
    """A shard runner with ``per_shard`` workers started together on each shard (threads, each on its own
    connections): one holds the lease, the others find it busy or, once it is done, nothing due."""

    def run_shards(shards):
        barrier = threading.Barrier(len(shards) * per_shard, timeout=60)
        outcomes: dict[int, list] = {shard.index: [] for shard in shards}

        def worker(shard):
            try:
                barrier.wait()
                outcomes[shard.index].append(
                    run_shard(
                        engine, shard=shard, now=at, settings=Settings(), names=[SEQUENCE], sleep=no_sleep
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - handed back like the default runner does
                outcomes[shard.index].append(exc)

        threads = [threading.Thread(target=worker, args=(s,)) for s in shards for _ in range(per_shard)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        merged = []
        for shard in shards:
            reports = [o for o in outcomes[shard.index] if isinstance(o, TickReport)]
            errors = [o for o in outcomes[shard.index] if not isinstance(o, TickReport | ShardBusy)]
            assert errors == [], errors
            total = TickReport(now=at)
            for report in reports:
                total.merge(report)
            merged.append(total)
        return merged

    return run_shards


@pytest.mark.postgresql
def test_four_shard_workers_send_each_delivery_once_and_leave_nothing_due(engine, monkeypatch):
    _postgres(engine)
    _shoppers(engine)
    sends = Sends(monkeypatch)
    first = _tick(engine, T0, run_shards=_competing_workers(engine, T0, per_shard=2))
    counts = first.sequences[SEQUENCE]
    assert _not_sent(engine) == []
    assert counts.enrolled + counts.held_out == CUSTOMERS
    assert counts.steps["cart_email"].sent == counts.enrolled == len(sends.ids)
    assert sends.twice() == [] and _outbox_duplicates(engine) == 0
    assert _left_behind(engine, T0) == (0, 0)

    next_day = T0 + timedelta(days=1)
    second = _tick(engine, next_day)  # the default runner: one thread per shard
    assert second.sequences[SEQUENCE].steps["retarget"].added == counts.enrolled
    assert len(sends.ids) == 2 * counts.enrolled
    assert sends.twice() == [] and _outbox_duplicates(engine) == 0
    assert _left_behind(engine, next_day) == (0, 0)


@pytest.mark.postgresql
def test_ticks_with_different_shard_counts_at_once_still_send_each_delivery_once(engine, monkeypatch):
    """Leases of 4 and of 3 shards do not exclude each other: the row claims (enrollments read FOR UPDATE
    SKIP LOCKED, the pending -> sending claim) decide."""
    _postgres(engine)
    _shoppers(engine)
    sends = Sends(monkeypatch)
    barrier = threading.Barrier(2, timeout=60)
    reports: list[TickReport] = []
    errors: list[BaseException] = []

    def one_tick(shards: int) -> None:
        try:
            barrier.wait()
            reports.append(_tick(engine, T0, shards=shards))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_tick, args=(n,)) for n in (4, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    enrolled = sum(r.sequences[SEQUENCE].enrolled for r in reports)
    assert sum(r.sequences[SEQUENCE].steps["cart_email"].sent for r in reports) == len(sends.ids)
    assert sends.twice() == [] and _outbox_duplicates(engine) == 0
    # A row one tick skipped because the other held its lock at that instant (for a statement other than
    # its own walk) may be left to the next tick: it is due, never lost, and still sent once.
    _tick(engine, T0, shards=4)
    assert _not_sent(engine) == []
    assert len(sends.ids) == enrolled
    assert sends.twice() == [] and _outbox_duplicates(engine) == 0
    assert _left_behind(engine, T0) == (0, 0)


@pytest.mark.postgresql
def test_exits_are_honoured_by_shard_workers(engine, monkeypatch):
    """Customers who bought before the tick are exited once, before the shards, and get nothing; customers
    who buy while the shards dispatch are exited at the same time by another connection: whatever was
    claimed before the exit went out once, everything else was dropped, and nothing of theirs is left."""
    _postgres(engine)
    _shoppers(engine)
    _tick(engine, T0)
    sends = Sends(monkeypatch)
    next_day = T0 + timedelta(days=1)
    before = list(range(1, CUSTOMERS + 1, 10))  # bought the evening after the email
    during = list(range(5, CUSTOMERS + 1, 10))  # buy while the next day's shards run
    _buy(engine, before, T0 + timedelta(hours=3))
    sequence = load_sequences()[SEQUENCE]
    exit_report = TickReport(now=next_day)

    def shards_with_buyers(shards):
        started = threading.Barrier(2, timeout=60)

        def buyers() -> None:
            started.wait()
            _buy(engine, during, next_day - timedelta(minutes=1))
            with session_scope(engine) as session:
                exit_enrollments(session, sequence, now=next_day, report=exit_report, settings=Settings())

        thread = threading.Thread(target=buyers)
        thread.start()
        started.wait()
        try:
            return _competing_workers(engine, next_day, per_shard=1)(shards)
        finally:
            thread.join(timeout=120)

    report = _tick(engine, next_day, run_shards=shards_with_buyers)
    assert report.sequences[SEQUENCE].exit_reasons["event: Order Completed"] >= 1
    deliveries, enrollments = Delivery.__table__, Enrollment.__table__
    with session_scope(engine) as session:
        rows = session.execute(
            select(
                deliveries.c.dedupe_key, deliveries.c.customer_id, deliveries.c.status, deliveries.c.step_id
            )
        ).all()
        still_active = session.execute(
            select(func.count())
            .select_from(enrollments)
            .where(enrollments.c.customer_id.in_(before + during), enrollments.c.status == "active")
        ).scalar()
    sent = set(sends.ids)
    retargeted = {r.customer_id for r in rows if r.step_id == "retarget" and r.dedupe_key in sent}
    assert retargeted.isdisjoint(before)  # exited before the shards: nothing
    assert still_active == 0  # every buyer is out of the journey
    for row in rows:
        if row.customer_id in during and row.dedupe_key in sent:
            assert row.status == "sent"  # claimed before the exit, sent once
        if row.status == "skipped":
            assert row.dedupe_key not in sent  # dropped by the exit: never sent
    # Ad-audience removals the concurrent exit queued after the shards were done go out on the next tick.
    after = next_day + timedelta(minutes=5)
    _tick(engine, after)
    assert sends.twice() == [] and _outbox_duplicates(engine) == 0
    assert _left_behind(engine, after) == (0, 0)


class _WorkerDied(RuntimeError):
    """A worker gone between claiming and recording (what a SIGKILL leaves in the store)."""


@pytest.mark.postgresql
def test_a_worker_that_dies_mid_shard_leaves_nothing_sent_twice_and_nothing_behind(engine, monkeypatch):
    _postgres(engine)
    _shoppers(engine, 400)
    sends = Sends(monkeypatch)
    send = sequences.dispatch._send
    dying = Shard(1, 4)

    def dies_in_shard_1(d, to_send):
        if to_send and to_send[0][0].customer_id % 4 == dying.index:
            raise _WorkerDied
        return send(d, to_send)

    monkeypatch.setattr(sequences.dispatch, "_send", dies_in_shard_1)
    with pytest.raises(ShardsFailed, match="shard 1/4"):
        _tick(engine, T0)
    monkeypatch.setattr(sequences.dispatch, "_send", send)
    deliveries = Delivery.__table__
    with session_scope(engine) as session:
        left_sending = set(
            session.execute(select(deliveries.c.dedupe_key).where(deliveries.c.status == "sending")).scalars()
        )
    assert left_sending and left_sending.isdisjoint(sends.ids)  # claimed, never handed to the provider
    # The lease died with the worker: the shard can be taken again at once.
    with shard_lease(engine, dying):
        pass
    # The next tick, past the sending timeout: the claimed emails become unknown (at most once, never
    # resent), the rest of the dead shard's work goes out, nothing is left.
    later = T0 + DeliveryPolicy().sending_timeout + timedelta(minutes=1)
    report = _tick(engine, later)
    assert report.sequences[SEQUENCE].steps["cart_email"].unknown == len(left_sending)
    assert sends.twice() == [] and set(sends.ids).isdisjoint(left_sending)
    assert _left_behind(engine, later) == (0, 0)


@pytest.mark.postgresql
def test_a_shard_is_held_by_one_worker_and_freed_when_its_connection_dies(engine):
    _postgres(engine)
    shard = Shard(2, 4)
    with shard_lease(engine, shard):
        with pytest.raises(ShardBusy, match="shard 2/4"):
            with shard_lease(engine, shard):
                pass
        with shard_lease(engine, Shard(2, 3)):  # another shard count: another lease
            pass
    holder = engine.connect()
    holder.execute(text("SELECT pg_advisory_lock(:a, :b)"), {"a": 0x6F6D0000 + 4, "b": 2})
    with pytest.raises(ShardBusy):
        with shard_lease(engine, shard):
            pass
    pid = holder.execute(text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as admin:
        # With a timeout the call returns once the backend is gone (its locks released), not when it is
        # merely signalled.
        assert admin.execute(text("SELECT pg_terminate_backend(:pid, 30000)"), {"pid": pid}).scalar()
    holder.invalidate()
    with shard_lease(engine, shard):
        pass


def test_on_sqlite_a_sharded_tick_is_the_one_writer_tick(engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
    assert shard_count(engine, 4) == 1
    seed_stores(engine)
    for n in (1, 2, 3):
        customer(engine, n)

    def never(_shards):
        raise AssertionError("SQLite runs no shard workers")

    report = _tick(engine, T0, run_shards=never)
    assert report.sequences[SEQUENCE].steps["cart_email"].sent == report.sequences[SEQUENCE].enrolled


def test_shard_reports_add_up_to_one_tick_report():
    with pytest.raises(ValueError):
        Shard(4, 4)
    assert [str(s) for s in Shard.all(2)] == ["shard 0/2", "shard 1/2"]
    tick = TickReport(now=T0)
    tick.sequences[SEQUENCE].steps["cart_email"]  # noqa: B018 - listed first, as run_tick does
    tick.sequences[SEQUENCE].steps["retarget"]  # noqa: B018
    tick.sequences[SEQUENCE].enrolled = 10
    for sent, reason in ((3, "card declined"), (4, None)):
        shard = TickReport(now=T0)
        shard.sequences[SEQUENCE].steps["retarget"].added = 1
        shard.sequences[SEQUENCE].steps["cart_email"].sent = sent
        shard.sequences[SEQUENCE].completed = 1
        shard.campaigns["sale"].sent = 2
        shard.written["deliveries"] = sent
        if reason:
            shard.halted["sms"] = reason
        tick.merge(TickReport.from_shard_dict(shard.shard_dict()))
    assert list(tick.sequences[SEQUENCE].steps) == ["cart_email", "retarget"]
    assert tick.as_dict()["sequences"][SEQUENCE]["steps"]["cart_email"]["sent"] == 7
    assert tick.sequences[SEQUENCE].steps["retarget"].added == 2
    assert (tick.sequences[SEQUENCE].enrolled, tick.sequences[SEQUENCE].completed) == (10, 2)
    assert tick.campaigns["sale"].sent == 4 and tick.halted == {"sms": "card declined"}
    assert tick.written["deliveries"] == 7
