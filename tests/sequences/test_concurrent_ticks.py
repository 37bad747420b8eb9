"""Two ticks at once never enroll a customer twice, nor send them anything twice: the store's unique index
on open enrollments decides, whatever the isolation level. On PostgreSQL with real parallel connections.
And ticks keep nothing between them: two ticks with different definitions run side by side."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from journey_kit import T0, customer, no_sleep, outbox, seed_stores
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audiences import build_audiences
from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Delivery, Enrollment
from sequences.definitions import load_sequences
from sequences.enrollment import enroll
from sequences.reports import TickReport
from sequences.tick import run_tick

CUSTOMERS = 60


def _shoppers(engine, count: int) -> None:
    """``count`` customers, each with an email address and a cart left two hours before T0."""
    payloads = []
    for n in range(1, count + 1):
        at = T0 - timedelta(hours=2)
        payloads += [
            {
                "type": "identify",
                "userId": f"user-{n}",
                "messageId": f"id-{n}",
                "timestamp": (at - timedelta(days=1)).isoformat(),
                "traits": {"email": f"cust{n}@example.org", "home_store_id": "nyc"},
            },
            {
                "type": "track",
                "userId": f"user-{n}",
                "event": "Product Added",
                "messageId": f"cart-{n}",
                "timestamp": at.isoformat(),
                "properties": {"product_id": "tee", "price": 19.5, "quantity": 2},
            },
        ]
    ingest_payloads(engine, payloads, now=T0 - timedelta(hours=1))


@pytest.fixture
def shoppers(engine):
    seed_stores(engine)
    _shoppers(engine, CUSTOMERS)
    build_audiences(engine, ["cart_abandoners"], now=T0)
    return engine


def _open_enrollments(engine) -> list[tuple[int, int]]:
    table = Enrollment.__table__
    with session_scope(engine) as session:
        return session.execute(
            select(table.c.customer_id, func.count())
            .where(table.c.status.in_(("active", "holdout")))
            .group_by(table.c.customer_id)
        ).all()


@pytest.mark.postgresql
def test_second_enrollment_waits_for_the_first_and_enrolls_nobody_twice(shoppers, wait_until_blocked):
    """The race itself, made deterministic: tick A enrolls and has not committed when tick B enrolls the
    same entrants. Without the unique index B inserts them all again; with it B waits, then adds none."""
    if shoppers.dialect.name != "postgresql":
        pytest.skip("SQLite serializes writers: the second enrollment cannot start before the first commits")
    sequence = load_sequences()["abandoned_cart"]
    first, second = TickReport(now=T0), TickReport(now=T0)
    with Session(shoppers) as a:
        enroll(a, sequence, now=T0, report=first)
        created = first.sequences["abandoned_cart"]
        assert created.enrolled + created.held_out == CUSTOMERS

        with Session(shoppers) as b:
            pid = b.execute(text("SELECT pg_backend_pid()")).scalar()
            errors: list[BaseException] = []

            def run_b() -> None:
                try:
                    enroll(b, sequence, now=T0 + timedelta(seconds=1), report=second)
                    b.commit()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            thread = threading.Thread(target=run_b)
            thread.start()
            try:
                wait_until_blocked(shoppers, pid, "the second enrollment")
            finally:
                a.commit()
                thread.join(timeout=60)
    assert not thread.is_alive()
    assert errors == []
    assert second.sequences["abandoned_cart"].enrolled == 0
    assert second.sequences["abandoned_cart"].held_out == 0
    assert all(count == 1 for _, count in _open_enrollments(shoppers))


def test_the_store_refuses_a_second_open_enrollment(shoppers):
    """The constraint itself, on both databases: a second active (or held-out) row for the same sequence and
    customer cannot be written; a completed one can."""
    table = Enrollment.__table__
    row = {
        "sequence": "abandoned_cart",
        "customer_id": 1,
        "status": "active",
        "step_index": 0,
        "enrolled_at": T0,
        "updated_at": T0,
    }
    with session_scope(shoppers) as session:
        session.execute(table.insert(), [row, {**row, "status": "completed"}, {**row, "status": "exited"}])
    for status in ("active", "holdout"):
        with pytest.raises(IntegrityError), session_scope(shoppers) as session:
            session.execute(table.insert(), [{**row, "status": status}])


def test_ticks_at_once_enroll_and_send_each_customer_once(shoppers):
    """Four whole ticks started together, each on its own connections: every entrant is enrolled once and
    gets exactly one cart email."""
    barrier = threading.Barrier(4)
    reports: list = []
    errors: list[BaseException] = []

    def one_tick() -> None:
        try:
            barrier.wait(timeout=30)
            reports.append(
                run_tick(shoppers, now=T0, settings=Settings(), names=["abandoned_cart"], sleep=no_sleep)
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_tick) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    counts = _open_enrollments(shoppers)
    assert len(counts) == CUSTOMERS
    assert all(count == 1 for _, count in counts)
    enrolled = sum(
        r.sequences["abandoned_cart"].enrolled + r.sequences["abandoned_cart"].held_out for r in reports
    )
    assert enrolled == CUSTOMERS  # each tick counts only the customers it enrolled itself
    emails = [m.customer_id for m in outbox(shoppers, "email")]
    assert len(emails) == len(set(emails))
    with session_scope(shoppers) as session:
        sent = session.execute(
            select(func.count()).select_from(Delivery.__table__).where(Delivery.__table__.c.status == "sent")
        ).scalar()
    assert sent == len(emails)


def _sequence_folder(folder, name: str) -> None:
    """A sequence ``name`` in ``folder``: the cart email, then at once an SMS."""
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\ntrigger: {{audience: cart_abandoners}}\nsteps:\n"
        "  - {id: cart_email, send: {channel: email, template: email/abandoned_cart}}\n"
        "  - {id: text, send: {channel: sms, template: sms/pickup_reminder}}\n"
    )


def test_ticks_with_different_sequence_folders_each_run_on_their_own_definitions(engine, tmp_path):
    """Two ticks in one process, each with its own folder of sequences, both past loading their definitions
    before either dispatches: each moves its own enrollments on from the email to the SMS (a tick that used
    the other's definitions, or none, would leave them parked after the email)."""
    seed_stores(engine)
    for n in (1, 2, 3):
        customer(engine, n)
    settings = {}
    for name in ("welcome_a", "welcome_b"):
        _sequence_folder(tmp_path / name, name)
        # Four messages in a day per customer (two per sequence): over the default cap of two.
        settings[name] = Settings(sequences_dir=tmp_path / name, frequency_cap=4)
    both_ready = threading.Barrier(2, timeout=60)
    first_done = threading.Event()
    reports: dict = {}
    errors: list[BaseException] = []

    def stage(name, fn, *, first):
        if name == "recover-interrupted":
            both_ready.wait()  # both ticks have their definitions, neither has walked nor dispatched
            if not first:
                assert first_done.wait(timeout=60)  # then one tick after the other: no cross-dispatch
        return fn()

    def one_tick(name: str, first: bool) -> None:
        try:
            reports[name] = run_tick(
                engine,
                now=T0,
                settings=settings[name],
                sleep=no_sleep,
                stage=lambda stage_name, fn: stage(stage_name, fn, first=first),
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if first:
                first_done.set()

    threads = [
        threading.Thread(target=one_tick, args=("welcome_a", True)),
        threading.Thread(target=one_tick, args=("welcome_b", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    for name in ("welcome_a", "welcome_b"):
        assert list(reports[name].sequences) == [name]
        steps = reports[name].sequences[name].steps
        assert (steps["cart_email"].sent, steps["text"].sent) == (3, 3)
        assert reports[name].sequences[name].completed == 3
    table = Enrollment.__table__
    with session_scope(engine) as session:
        statuses = session.execute(
            select(table.c.sequence, table.c.status, func.count()).group_by(table.c.sequence, table.c.status)
        ).all()
    assert sorted(statuses) == [("welcome_a", "completed", 3), ("welcome_b", "completed", 3)]
    assert len(outbox(engine, "email")) == len(outbox(engine, "sms")) == 6
