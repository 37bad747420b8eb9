"""Benchmark: the live intake of `omni serve` (tracking API), batched and single events, SQLite and PG.

    .venv/bin/python benchmarks/collector.py                          # SQLite (a temporary file)
    OMNI_BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        .venv/bin/python benchmarks/collector.py                      # and PostgreSQL, side by side

For each database: a fresh migrated store (SQLite in a temporary directory; PostgreSQL in a scratch
database this script creates on that server and drops), a write key, and a real `omni serve` process
(`--workers`, default 1; its access log on, written to a file), then two phases of ``--seconds`` each,
driven from this process by concurrent keep-alive connections (a minimal HTTP/1.1 client on asyncio,
so that the load generator costs the shared CPU as little as possible; the real SDKs are exercised by
the test suite):

- batched: ``--batch-clients`` connections (default 8) POST ``/v1/batch`` with 100 events a request;
- single: ``--single-clients`` connections (default 32) POST one event a request to ``/v1/track`` etc.

Events: a mix over 20,000 customers (60 % track with properties, 25 % page, 10 % identify with an email,
5 % Product Added with a cart), each with a unique messageId. A client answered 429 waits 50 ms and
sends the next request (the shed one is not counted as accepted). Printed per phase: events/s answered
200 ("accepted") and events/s ingested (accepted events over the phase plus the time the queue took to
drain after it: what the server sustains), requests/s, p50/p99 latency of the 200s, 429s (and their
share of all requests), the time from a 200 to the event being visible in the store (polled every 20 ms
for one sampled event per request in the batched phase and every 10th request in the single phase:
p50/p95 and the share within 2 s), the CPU each part used per 1,000 accepted events (HTTP processes,
the intake processor, PostgreSQL's backends of the benchmark's database) and the cores they used
together (the rest of the machine's load is not Omni's: see the load averages printed), and the
server's peak resident memory (VmHWM, summed over all its processes). Targets (issue 16) on a 2-core
machine: >= 5,000 events/s batched, >= 1,000 single-event requests/s with p99 under 100 ms, 95 % of
events visible within 2 s, memory under 400 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni.core.settings import Settings  # noqa: E402
from profiles.apikeys import create_key  # noqa: E402
from profiles.db import create_store_engine, scratch_database, session_scope, upgrade_schema  # noqa: E402
from profiles.ingest import IngestOptions, ingest_payloads  # noqa: E402

CUSTOMERS = 20_000
VISIBLE_WITHIN = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Events:
    """Payloads with unique message ids, from a fixed seed."""

    def __init__(self, prefix: str, seed: int = 7) -> None:
        self.random = random.Random(seed)
        self.prefix = prefix
        self.n = 0

    def one(self) -> dict[str, Any]:
        self.n += 1
        r = self.random.random()
        c = self.random.randrange(CUSTOMERS)
        ids = {"userId": f"u{c}"} if c % 3 else {"anonymousId": f"a{c}"}
        base = {"messageId": f"{self.prefix}-{self.n}", **ids, "context": {"library": {"name": "bench"}}}
        if r < 0.60:
            return {
                **base,
                "type": "track",
                "event": "Product Viewed",
                "properties": {"product_id": f"p{self.random.randrange(500)}", "price": 19.5},
            }
        if r < 0.85:
            return {**base, "type": "page", "name": "Catalog", "properties": {"path": "/c/shirts"}}
        if r < 0.95:
            return {**base, "type": "identify", "traits": {"email": f"c{c}@example.org", "first_name": "Ana"}}
        return {
            **base,
            "type": "track",
            "event": "Product Added",
            "properties": {"cart_id": f"cart{c}", "product_id": "tee", "price": 20, "quantity": 1},
        }


@dataclass
class Phase:
    name: str
    requests: int = 0
    events: int = 0
    shed: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    visible: list[float] = field(default_factory=list)
    unseen: int = 0
    seconds: float = 0.0
    drained_after: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role, phase and drain


class Watcher(threading.Thread):
    """Polls the store for sampled message ids and records the time from their 200 to being visible."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_store_engine(url)
        self.incoming: deque[tuple[str, float]] = deque()
        self.pending: dict[str, float] = {}
        self.phase: Phase | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from sqlalchemy import select

        from profiles.models import Event

        while not self.stop.is_set():
            while self.incoming:
                mid, acked = self.incoming.popleft()
                self.pending[mid] = acked
            if self.pending:
                ids = list(self.pending)[:2000]
                with self.engine.connect() as conn:
                    found = (
                        conn.execute(select(Event.message_id).where(Event.message_id.in_(ids)))
                        .scalars()
                        .all()
                    )
                    conn.rollback()
                now = time.monotonic()
                for mid in found:
                    acked = self.pending.pop(mid)
                    if self.phase is not None:
                        self.phase.visible.append(now - acked)
            time.sleep(0.02)

    def settle(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while (self.incoming or self.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self.pending) + len(self.incoming)
        self.pending.clear()
        self.incoming.clear()
        return left


async def _client(
    port: int, auth: str, make, deadline: float, phase: Phase, watcher: Watcher, sample_every: int
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"Host: bench\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
    count = 0
    try:
        while time.monotonic() < deadline:
            path, body, sample, events = make()
            started = time.monotonic()
            writer.write(f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.monotonic()
            phase.requests += 1
            if status == 200:
                phase.latencies.append(done - started)
                phase.events += events
                count += 1
                if count % sample_every == 0:
                    watcher.incoming.append((sample, done))
            elif status == 429:
                phase.shed += 1
                await asyncio.sleep(0.05)
            else:
                phase.errors += 1
    finally:
        writer.close()


def run_phase(port: int, key: str, watcher: Watcher, *, batched: bool, clients: int, seconds: float) -> Phase:
    phase = Phase("batched" if batched else "single")
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    events = Events(phase.name)

    def make_batch():
        items = [events.one() for _ in range(100)]
        return "/v1/batch", orjson.dumps({"batch": items}), items[-1]["messageId"], 100

    def make_single():  # each call on its own path, as Segment's HTTP API takes it
        item = events.one()
        return f"/v1/{item['type']}", orjson.dumps(item), item["messageId"], 1

    async def main() -> None:
        deadline = time.monotonic() + seconds
        make, every = (make_batch, 1) if batched else (make_single, 10)
        await asyncio.gather(
            *(_client(port, auth, make, deadline, phase, watcher, every) for _ in range(clients))
        )

    watcher.phase = phase
    started = time.monotonic()
    asyncio.run(main())
    phase.seconds = time.monotonic() - started
    ended = time.monotonic()
    phase.unseen = watcher.settle()
    phase.drained_after = time.monotonic() - ended
    watcher.phase = None
    return phase


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn workers, the intake processor)."""
    pids = [pid]
    for parent in pids:
        for task in Path(f"/proc/{parent}/task").glob("*"):  # each thread's children
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return pids


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_role(pid: int, database: str | None) -> dict[str, float]:
    """CPU seconds used so far by the server's HTTP processes, its intake processor and (PostgreSQL) the
    server's backends of ``database``."""
    used = {"http": 0.0, "processor": 0.0, "postgres": 0.0}
    roles = [
        (p, "processor" if b"omni.server.processor" in _cmdline(p) else "http") for p in process_tree(pid)
    ]
    if database:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and f" {database} ".encode() in _cmdline(int(entry.name)):
                roles.append((int(entry.name), "postgres"))
    for p, role in roles:
        try:
            used[role] += _cpu_seconds(p)
        except (OSError, IndexError, ValueError):
            pass
    return used


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process and its descendants (uvicorn workers, the intake processor), in MB."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


@contextmanager
def serve(url: str, workers: int, log: Path):
    port = free_port()
    env = {**os.environ, "OMNI_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    omni = str(Path(sys.executable).with_name("omni"))
    process = subprocess.Popen(
        [omni, "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"omni serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    try:
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def bench(url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    engine = create_store_engine(url)
    upgrade_schema(engine)
    with session_scope(engine) as session:
        _key, key = create_key(session, source="bench")
    engine.dispose()
    watcher = Watcher(url)
    watcher.start()
    try:
        database = url.rsplit("/", 1)[1] if url.startswith("postgresql") else None
        with serve(url, args.workers, workdir / f"serve-{url.split(':')[0]}.log") as (process, port):
            phases = []
            for batched, clients in ((True, args.batch_clients), (False, args.single_clients)):
                before = cpu_by_role(process.pid, database)
                phase = run_phase(port, key, watcher, batched=batched, clients=clients, seconds=args.seconds)
                after = cpu_by_role(process.pid, database)
                phase.cpu = {role: after[role] - before[role] for role in after}
                phases.append(phase)
            batched, single = phases
            rss = peak_rss_mb(process.pid)
    finally:
        watcher.stop.set()
    return {"batched": batched, "single": single, "rss": rss, "baseline": baseline(url, batched.events)}


def baseline(url: str, events: int) -> float:
    """The same-run baseline: as many events of the same mix as the batched phase ingested (at most
    50,000), in batches of 100, stored in the same store by the file pipeline in-process
    (``ingest_payloads``, what ``omni ingest`` runs) — no HTTP, no queue. Events/s."""
    count = max(100, min(events, 50_000))
    maker = Events("baseline", seed=11)
    batches = [{"batch": [maker.one() for _ in range(100)]} for _ in range(count // 100)]
    engine = create_store_engine(url)
    try:
        started = time.perf_counter()
        ingest_payloads(engine, batches, options=IngestOptions.of(Settings()), source="baseline")
        return len(batches) * 100 / (time.perf_counter() - started)
    finally:
        engine.dispose()


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _within(phase: Phase) -> float:
    """Share of the sampled events visible within 2 s (one never seen counts as late)."""
    return sum(v <= VISIBLE_WITHIN for v in phase.visible) / max(1, len(phase.visible) + phase.unseen)


def report(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        rows.append((label, [fn(results[n]) for n in names]))

    for phase in ("batched", "single"):
        row(f"{phase}: accepted events/s (200)", lambda r, p=phase: f"{r[p].events / r[p].seconds:,.0f}")
        row(
            f"{phase}: ingested events/s",
            lambda r, p=phase: f"{r[p].events / (r[p].seconds + r[p].drained_after):,.0f}",
        )
        row(f"{phase}: requests/s (200)", lambda r, p=phase: f"{len(r[p].latencies) / r[p].seconds:,.0f}")
        row(
            f"{phase}: latency p50 / p99 ms",
            lambda r, p=phase: (
                f"{_q(r[p].latencies, 0.5) * 1000:.1f} / {_q(r[p].latencies, 0.99) * 1000:.1f}"
            ),
        )
        row(
            f"{phase}: 429 (share) / other errors",
            lambda r, p=phase: f"{r[p].shed} ({r[p].shed / max(1, r[p].requests):.0%}) / {r[p].errors}",
        )
        row(
            f"{phase}: visible p50 / p95 s",
            lambda r, p=phase: f"{_q(r[p].visible, 0.5):.2f} / {_q(r[p].visible, 0.95):.2f}",
        )
        row(
            f"{phase}: visible within 2 s",
            lambda r, p=phase: f"{_within(r[p]):.1%} of {len(r[p].visible) + r[p].unseen}",
        )
        row(f"{phase}: queue drained after", lambda r, p=phase: f"{r[p].drained_after:.1f} s")
        row(
            f"{phase}: CPU ms/1k ev http/proc/pg",
            lambda r, p=phase: "/".join(
                f"{r[p].cpu.get(role, 0) * 1e6 / max(1, r[p].events):.0f}"
                for role in ("http", "processor", "postgres")
            ),
        )
        row(
            f"{phase}: CPU cores used",
            lambda r, p=phase: f"{sum(r[p].cpu.values()) / (r[p].seconds + r[p].drained_after):.2f}",
        )
    row("server peak RSS", lambda r: f"{r['rss']:.0f} MB")
    row("baseline: file pipeline, events/s", lambda r: f"{r['baseline']:,.0f}")

    def ingested_rate(phase: Phase) -> float:
        return phase.events / (phase.seconds + phase.drained_after)

    row("batched ingested / baseline", lambda r: f"{ingested_rate(r['batched']) / r['baseline']:.2f}x")
    width = max(len(label) for label, _ in rows) + 2
    print(f"{'':{width}}" + "".join(f"{n:>22}" for n in names))
    for label, values in rows:
        print(f"{label:{width}}" + "".join(f"{v:>22}" for v in values))
    print(
        "targets: batched >= 5,000 events/s; single >= 1,000 req/s with p99 < 100 ms; "
        "95 % visible within 2 s; memory < 400 MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=15, help="Length of each phase (default 15).")
    parser.add_argument("--batch-clients", type=int, default=8)
    parser.add_argument("--single-clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="omni serve --workers (default 1).")
    parser.add_argument("--only", choices=["sqlite", "postgresql"], help="Run one database only.")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="omni-collector-") as tmp:
        workdir = Path(tmp)
        if args.only != "postgresql":
            results["SQLite"] = bench(f"sqlite:///{workdir / 'omni.db'}", args, workdir)
            print("SQLite done", flush=True)
        server = os.environ.get("OMNI_BENCH_DATABASE_URL")
        if server and args.only != "sqlite":
            with scratch_database(server, prefix="omni_bench") as url:
                results["PostgreSQL"] = bench(url, args, workdir)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    report(results)


if __name__ == "__main__":
    main()
