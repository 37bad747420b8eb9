"""The intake queue below HTTP: append, process in the same transaction as the delete, crash recovery,
processors sharing the queue, and a request that cannot be stored."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import select
from tracking_helpers import event_count, events, queued, rejections, wait_for

import profiles.intake as intake
from profiles.apikeys import create_key, key_hash
from profiles.db import session_scope
from profiles.intake import Accepted, IntakeOptions, IntakeProcessor, append, drain, process_once
from profiles.models import Event

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def write_key(engine) -> str:
    with session_scope(engine) as session:
        _key, plaintext = create_key(session, source="pos-lisbon")
    return plaintext


def queue(engine, key: str, kind: str, body: dict, *, at: datetime = T0) -> list[str | None]:
    text = orjson.dumps(body).decode()
    with engine.begin() as conn:
        return append(conn, [Accepted(key_hash(key), kind, text, len(text), at)])


def test_append_checks_keys_and_processing_uses_each_requests_time_of_receipt(engine, write_key):
    assert queue(engine, "omni_w_unknown", "track", {"userId": "u", "event": "E"}) == [None]
    assert queue(engine, write_key, "track", {"userId": "u", "event": "No Time"}) == ["pos-lisbon"]
    assert queued(engine) == 1
    result = process_once(engine)
    assert (result.requests, result.ingest.accepted) == (1, 1)
    assert queued(engine) == 0
    with engine.connect() as conn:
        occurred, received = conn.execute(select(Event.occurred_at, Event.received_at)).one()
    assert occurred == received == T0  # not the time it was processed
    (stored,) = events(engine)
    assert stored["type"] == "track" and stored["context"]["omni"] == {"source": "pos-lisbon"}


def test_a_crash_mid_transaction_leaves_the_request_queued_and_it_is_ingested_once(
    engine, write_key, monkeypatch
):
    queue(
        engine,
        write_key,
        "batch",
        {
            "batch": [
                {"type": "identify", "userId": "c", "traits": {"email": "c@example.org"}, "messageId": "a"},
                {"type": "track", "userId": "c", "event": "E", "messageId": "b"},
                {"type": "track", "event": "no ids"},
            ]
        },
    )
    real = intake.store_prepared

    def crash(session, batch, *, now):
        real(session, batch, now=now)  # everything written ...
        raise SystemExit("killed")  # ... and the process dies before the commit

    monkeypatch.setattr(intake, "store_prepared", crash)
    with pytest.raises(SystemExit):
        process_once(engine)
    assert (queued(engine), event_count(engine), rejections(engine)) == (1, 0, [])
    monkeypatch.setattr(intake, "store_prepared", real)
    assert process_once(engine).requests == 1
    assert process_once(engine).requests == 0
    assert sorted(e["message_id"] for e in events(engine)) == ["a", "b"]
    assert [r["source"] for r in rejections(engine)] == ["pos-lisbon request 1 [batch item 2]"]


def test_processors_share_the_queue_and_ingest_each_request_once(engine, write_key):
    for n in range(60):
        queue(
            engine,
            write_key,
            "batch",
            {
                "batch": [
                    {"type": "track", "userId": f"p{n % 7}", "event": "E", "messageId": f"r{n}-{i}"}
                    for i in range(10)
                ]
            },
        )
    options = IntakeOptions(claim_rows=3)
    done: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            done.append(drain(engine, options))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == []
    assert sum(done) == 60
    assert event_count(engine) == 600 and queued(engine) == 0


def test_a_request_that_cannot_be_stored_is_quarantined_and_the_rest_flow(engine, write_key, monkeypatch):
    queue(engine, write_key, "track", {"userId": "ok1", "event": "E", "messageId": "ok1"})
    queue(engine, write_key, "track", {"userId": "bad", "event": "Poison", "messageId": "poison"})
    queue(engine, write_key, "track", {"userId": "ok2", "event": "E", "messageId": "ok2"})
    real = intake.store_prepared

    def picky(session, batch, *, now):
        if any(e.message_id == "poison" for e in batch.events):
            raise ValueError("the store refuses this")
        return real(session, batch, now=now)

    monkeypatch.setattr(intake, "store_prepared", picky)
    processor = IntakeProcessor(engine, IntakeOptions(poll_seconds=0.05))
    processor.start()
    try:
        wait_for(lambda: queued(engine) == 0, what="the queue to empty")
    finally:
        processor.stop()
    assert sorted(e["message_id"] for e in events(engine)) == ["ok1", "ok2"]
    (rejected,) = rejections(engine)
    assert rejected["source"] == "pos-lisbon request 2"
    assert rejected["reason"].startswith("could not be stored: ValueError: the store refuses this")
    assert orjson.loads(rejected["raw"])["messageId"] == "poison"


def test_a_batch_over_2500_events_stores_the_first_2500_and_rejects_the_rest_with_the_reason(
    engine, write_key
):
    items = [{"type": "track", "userId": "big", "event": "E", "messageId": f"b{n}"} for n in range(2503)]
    queue(engine, write_key, "batch", {"batch": items})
    result = process_once(engine)
    assert (result.requests, result.ingest.accepted) == (1, 2500)
    stored = {e["message_id"] for e in events(engine)}
    assert stored == {f"b{n}" for n in range(2500)}
    rejected = rejections(engine)
    assert [r["source"] for r in rejected] == [
        f"pos-lisbon request 1 [batch item {n}]" for n in (2500, 2501, 2502)
    ]
    assert {r["reason"] for r in rejected} == {"over Segment's limit of 2,500 events per batch"}
    assert orjson.loads(rejected[0]["raw"])["messageId"] == "b2500"


def _occurred(engine, message_id: str) -> datetime:
    with engine.connect() as conn:
        value = conn.execute(select(Event.occurred_at).where(Event.message_id == message_id)).scalar_one()
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def test_event_times_are_corrected_for_the_senders_clock_by_sent_at_as_segment_does(engine, write_key):
    # The device's clock is 1 hour ahead: its timestamp and sentAt both say 10:xx; received at 09:00.
    ahead = {
        "userId": "skew",
        "event": "E",
        "timestamp": "2026-06-01T09:59:50Z",
        "sentAt": "2026-06-01T10:00:00Z",
    }
    queue(engine, write_key, "track", {**ahead, "messageId": "one"})
    # analytics-python puts sentAt on the batch envelope; an item's own sentAt wins.
    queue(
        engine,
        write_key,
        "batch",
        {
            "sentAt": "2026-06-01T10:00:00Z",
            "batch": [
                {
                    "type": "track",
                    "userId": "skew",
                    "event": "E",
                    "timestamp": "2026-06-01T09:58:00Z",
                    "messageId": "env",
                },
                {
                    "type": "track",
                    "userId": "skew",
                    "event": "E",
                    "timestamp": "2026-06-01T09:58:00Z",
                    "sentAt": "2026-06-01T09:58:30Z",
                    "messageId": "own",
                },
                {"type": "track", "userId": "skew", "event": "E", "messageId": "no-timestamp"},
            ],
        },
    )
    # Without sentAt the timestamp is taken as it is (a backfill).
    queue(
        engine,
        write_key,
        "track",
        {"userId": "skew", "event": "E", "timestamp": "2025-01-01T00:00:00Z", "messageId": "plain"},
    )
    drain(engine)
    assert _occurred(engine, "one") == datetime(2026, 6, 1, 8, 59, 50, tzinfo=UTC)
    assert _occurred(engine, "env") == datetime(2026, 6, 1, 8, 58, tzinfo=UTC)
    assert _occurred(engine, "own") == datetime(2026, 6, 1, 8, 59, 30, tzinfo=UTC)
    assert _occurred(engine, "no-timestamp") == T0  # sent "now": received now
    assert _occurred(engine, "plain") == datetime(2025, 1, 1, tzinfo=UTC)


def test_files_keep_their_timestamps_whatever_their_sent_at(engine, tmp_path):
    from profiles.ingest import ingest_files

    line = {
        "userId": "f",
        "type": "track",
        "event": "E",
        "messageId": "file",
        "timestamp": "2026-06-01T07:00:00Z",
        "sentAt": "2026-06-01T08:00:00Z",
    }
    path = tmp_path / "events.jsonl"
    path.write_bytes(orjson.dumps(line) + b"\n")
    ingest_files(engine, [str(path)], now=T0)
    assert _occurred(engine, "file") == datetime(2026, 6, 1, 7, 0, tzinfo=UTC)
