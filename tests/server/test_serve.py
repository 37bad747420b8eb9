"""`omni serve` as it runs: the intake processor in a supervised child process (restarted when it dies,
reported by /healthz), `--workers 2` (both workers accept, every event ingested once), and /docs listing
the tracking API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import uuid
from collections import Counter

import httpx
import orjson
from serving import start_server
from sqlalchemy import func, select
from tracking_helpers import (
    event_count,
    free_port,
    processor_pids,
    queued,
    start_omni_serve,
    wait_for,
)

from omni.core.settings import Settings
from omni.server.app import create_app
from omni.server.processor import HEARTBEAT, processor_problem
from profiles.models import Event


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(30)


def _track(url: str, key: str, user: str, n: int) -> httpx.Response:
    body = {"userId": user, "event": "Clicked", "messageId": f"{user}-{n}"}
    return httpx.post(f"{url}/v1/track", content=orjson.dumps(body), auth=(key, ""), timeout=30)


def test_the_processor_runs_in_a_child_that_is_restarted_when_it_dies(engine, api_key, tmp_path):
    key = api_key(engine, source="web")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_omni_serve(engine.url.render_as_string(hide_password=False), port, tmp_path / "serve.log")
    try:
        health = httpx.get(f"{url}/healthz").json()
        assert health == {"ok": True, "store": engine.dialect.name, "processor": "running"}
        (first,) = processor_pids(server.pid)
        assert _track(url, key, "before", 0).status_code == 200
        wait_for(lambda: event_count(engine) == 1, what="the event to be ingested by the child")

        os.kill(first, signal.SIGKILL)
        # Accepted while the processor is down: queued, ingested once the supervisor has started a new one.
        assert _track(url, key, "during", 0).status_code == 200
        wait_for(lambda: processor_pids(server.pid) not in ([], [first]), what="a new processor")
        wait_for(lambda: event_count(engine) == 2 and queued(engine) == 0, what="the queued event")
        assert "the intake processor exited with code -9" in (tmp_path / "serve.log").read_text()
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, what="healthz to be 200 again")
    finally:
        _stop(server)
    assert processor_pids(server.pid) == []
    assert server.returncode == 0


def test_healthz_says_when_the_processor_is_not_running(engine, tmp_path):
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    live = start_server(create_app(settings, engine=engine, processor_dir=tmp_path))
    try:
        answer = httpx.get(f"{live.url}/healthz")
        assert answer.status_code == 503
        assert answer.json() == {"ok": False, "store": engine.dialect.name, "processor": "not running"}

        (tmp_path / HEARTBEAT).write_text(json.dumps({"pid": os.getpid(), "processed": 0, "capacity": None}))
        assert httpx.get(f"{live.url}/healthz").json()["processor"] == "running"

        gone = subprocess.Popen(["true"])
        gone.wait()
        (tmp_path / HEARTBEAT).write_text(json.dumps({"pid": gone.pid}))
        assert httpx.get(f"{live.url}/healthz").json()["processor"] == "not running (its process is gone)"

        (tmp_path / HEARTBEAT).write_text(json.dumps({"pid": os.getpid()}))
        stale = os.stat(tmp_path / HEARTBEAT).st_mtime + 60
        assert processor_problem(tmp_path, now=stale) == "not running (last seen 60 s ago)"
    finally:
        live.stop()


def test_two_workers_both_accept_and_every_event_is_ingested_once(engine, api_key, tmp_path):
    key = api_key(engine, source="web")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = start_omni_serve(engine.url.render_as_string(hide_password=False), port, log, "--workers", "2")
    sent: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def workers_seen() -> Counter:
        lines = re.findall(r"omni\.server\.access\[(\d+)\]: POST /v1/batch 200", log.read_text())
        return Counter(lines)

    def send(sender: int) -> None:
        n = 0
        while not stop.is_set():
            ids = [f"w{sender}-{n}-{i}-{uuid.uuid4().hex[:6]}" for i in range(5)]
            batch = [{"type": "track", "userId": f"w{sender}", "event": "E", "messageId": m} for m in ids]
            # A new connection each time: the kernel hands connections to either worker.
            answer = httpx.post(
                f"{url}/v1/batch", content=orjson.dumps({"batch": batch}), auth=(key, ""), timeout=30
            )
            assert answer.status_code == 200, answer.text
            with lock:
                sent.extend(ids)
            n += 1

    senders = [threading.Thread(target=send, args=(s,)) for s in range(6)]
    try:
        for thread in senders:
            thread.start()
        wait_for(lambda: len(workers_seen()) >= 2 and len(sent) >= 300, timeout=60, what="both workers")
    finally:
        stop.set()
        for thread in senders:
            thread.join(30)
    try:
        wait_for(lambda: queued(engine) == 0 and event_count(engine) == len(sent), timeout=60, what="ingest")
    finally:
        _stop(server)
    assert len(workers_seen()) == 2
    with engine.connect() as conn:
        stored = conn.execute(select(Event.message_id)).scalars().all()
        assert conn.execute(select(func.count(func.distinct(Event.message_id)))).scalar_one() == len(sent)
    assert sorted(stored) == sorted(sent)


def test_docs_list_the_tracking_api(engine, live_server):
    server = live_server(engine, background=False)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    for path in ("/v1/track", "/v1/identify", "/v1/batch", "/v1/import", "/t", "/b"):
        operation = schema["paths"][path]["post"]
        assert operation["tags"] == ["tracking"]
        assert {"200", "401", "413", "429"} <= set(operation["responses"])
        assert operation["security"] == [{"writeKey": []}]
    assert schema["components"]["securitySchemes"]["writeKey"]["scheme"] == "basic"
    assert httpx.get(f"{server.url}/docs").status_code == 200
