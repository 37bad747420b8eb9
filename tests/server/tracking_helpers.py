"""Helpers of the tracking API tests: polling the store (never sleeping for behaviour) and reading it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, func, select

from profiles.models import Customer, Event, Identity, IntakeRequest, RejectedEvent


def wait_for(predicate: Callable[[], Any], *, timeout: float = 15, what: str = "the condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling the store, not waiting for behaviour


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def customer_of(engine: Engine, kind: str, value: str) -> int | None:
    """The surviving customer holding the identity ``kind``/``value``."""
    with engine.connect() as conn:
        found = conn.execute(
            select(Identity.customer_id).where(Identity.kind == kind, Identity.value == value)
        ).scalar()
        while found is not None:
            merged = conn.execute(select(Customer.merged_into).where(Customer.id == found)).scalar()
            if merged is None:
                return found
            found = merged
    return None


def events(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(Event.message_id, Event.customer_id, Event.type, Event.name, Event.context).order_by(
                Event.id
            )
        ).all()
    return [
        {
            "message_id": r[0],
            "customer_id": r[1],
            "type": r[2],
            "name": r[3],
            "context": r[4] if isinstance(r[4], dict) else orjson.loads(r[4]),
        }
        for r in rows
    ]


def event_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Event)).scalar_one()


def queued(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(IntakeRequest)).scalar_one()


def rejections(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(RejectedEvent.source, RejectedEvent.raw, RejectedEvent.reason).order_by(RejectedEvent.id)
        ).all()
    return [{"source": r[0], "raw": r[1], "reason": r[2]} for r in rows]


OMNI = str(Path(sys.executable).with_name("omni"))
ROOT = Path(__file__).resolve().parents[2]


def start_omni_serve(database_url: str, port: int, log: Path, *args: str) -> subprocess.Popen:
    """A real ``omni serve`` process (its output appended to ``log``), once ``/healthz`` answers 200."""
    # PYTHONPATH: this checkout's packages, whatever the installed distribution lists.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMNI_DATABASE_URL": database_url, "PYTHONPATH": path}
    process = subprocess.Popen(
        [OMNI, "serve", "--port", str(port), *args], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"omni serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=60, what="omni serve to listen, with its processor running")
    return process


def children(pid: int) -> list[int]:
    """The process's descendants (Linux /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = []
        for task in Path(f"/proc/{parent}/task").glob("*"):  # each thread's children
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        found += kids
        todo += kids
    return found


def processor_pids(pid: int) -> list[int]:
    """The intake processor processes under ``omni serve`` ``pid``."""
    found = []
    for child in children(pid):
        try:
            if b"omni.server.processor" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found
