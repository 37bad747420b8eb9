"""A 200 means committed: a real `omni serve` killed with SIGKILL while clients send loses none of the events
it answered 200 for, and ingests none twice once restarted."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import httpx
import orjson
from sqlalchemy import func, select
from tracking_helpers import free_port, queued, start_omni_serve, wait_for

from profiles.models import Event, RejectedEvent

OMNI = str(Path(sys.executable).with_name("omni"))
ROOT = Path(__file__).resolve().parents[2]


def _batch(sender: int, n: int) -> dict:
    """20 events of one customer, and one bad item (rejected: its rejection must be stored once)."""
    items = [
        {"type": "track", "userId": f"kill-{sender}", "event": "Clicked", "messageId": f"s{sender}-r{n}-e{i}"}
        for i in range(20)
    ]
    items.append({"type": "track", "userId": f"kill-{sender}", "messageId": f"s{sender}-r{n}-bad"})
    return {"batch": items}


def test_sigkill_loses_no_acknowledged_event_and_ingests_none_twice(engine, api_key, tmp_path):
    database_url = engine.url.render_as_string(hide_password=False)
    key = api_key(engine, source="web")
    port = free_port()
    log = tmp_path / "serve.log"
    server = start_omni_serve(database_url, port, log, "--no-access-log")
    acknowledged: list[str] = []  # message ids of batches answered 200
    lock = threading.Lock()
    stop = threading.Event()

    def send(sender: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(key, ""), timeout=10) as client:
            n = 0
            while not stop.is_set():
                body = _batch(sender, n)
                try:
                    answer = client.post("/v1/batch", content=orjson.dumps(body))
                except httpx.TransportError:
                    return  # the server is gone: this request's fate is unknown (it may be stored)
                if answer.status_code == 200:
                    with lock:
                        acknowledged.extend(item["messageId"] for item in body["batch"][:-1])
                n += 1

    senders = [threading.Thread(target=send, args=(s,)) for s in range(4)]
    for thread in senders:
        thread.start()
    try:
        # Kill in the middle of the traffic: requests in flight, commits and ingestion under way.
        wait_for(lambda: len(acknowledged) >= 2000, timeout=60, what="2,000 acknowledged events")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        killed_at = len(acknowledged)
    finally:
        stop.set()
        for thread in senders:
            thread.join(30)
    assert len(acknowledged) == killed_at  # nothing was answered after the kill

    server = start_omni_serve(database_url, port, log, "--no-access-log")
    try:
        wait_for(lambda: queued(engine) == 0, timeout=60, what="the restarted server to drain the queue")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    with engine.connect() as conn:
        stored = set(conn.execute(select(Event.message_id)).scalars())
        events = conn.execute(select(func.count()).select_from(Event)).scalar_one()
        rejected = conn.execute(select(RejectedEvent.source)).scalars().all()
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:3]}"
    assert events == len(stored)  # (message ids are unique: a second ingest would have failed loudly)
    # Each stored request's bad item was rejected exactly once: one rejection per 20 events.
    assert len(rejected) == len(set(rejected)) == events // 20
