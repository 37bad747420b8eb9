"""Benchmark: `omni ingest` of a Segment feed into a fresh store on SQLite and PostgreSQL, beside its floor.

    .venv/bin/python benchmarks/ingest.py                               # realistic feed, 50,000 customers
    .venv/bin/python benchmarks/ingest.py --customers 200000            # the memory target's size
    .venv/bin/python benchmarks/ingest.py --feed synthetic --events 1000000 --customers 100000
    OMNI_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python benchmarks/ingest.py

Feeds (``benchmarks/feeds.py``, from a fixed random seed: ``--seed``, default 7):

- ``realistic`` (default): many customers with few events each (about 2.4). Most browse anonymously,
  and most of those sign in hours or days later, known already from an earlier visit, so the sign-in
  merges two profiles; others sign up; some give their email on one device and their userId on
  another (a merge of two known profiles); phone-only SMS subscribers; store customers
  (``context.channel`` store: loyalty enrolment, Order Completed at the till); carts and orders on web
  and app; 0.5 % hostile lines (invalid JSON, no ids, wrong types, over 32 KB, not UTF-8); and arrival
  out of order (a quarter of the events hours or days late), while every event keeps the time it
  happened. 50,000 customers make 118,849 events and 594 hostile lines.
- ``synthetic``: ``--events`` over ``--customers``, 10 per customer by default, every customer known
  from their second event, few merges, interleaved round by round.

For each database (SQLite in a temporary file; PostgreSQL, when ``OMNI_BENCH_DATABASE_URL`` is set, in
databases this script creates on that server and drops), two runs, each in a child process of its
own and a fresh migrated store:

- the floor: the same events, already converted to rows by Omni's own validation (rejected lines
  left out; conversion is not timed), each given a customer id (one per userId or anonymousId, the
  customers inserted before the clock starts), inserted into the ``events`` table with its indexes and
  foreign key, in transactions as large as Omni's (``OMNI_INGEST_TRANSACTION_SIZE``): SQLite by
  ``executemany`` on a connection set up as Omni's; PostgreSQL by ``COPY`` (psycopg ``cursor.copy``);
- Omni: ``profiles.ingest.ingest_files`` as ``omni ingest`` calls it (``IngestOptions.of(Settings())``,
  so ``OMNI_INGEST_*`` apply), then the customers it merged (``merged_into`` set) are counted.

Printed per run: wall time, events/s (lines read per second), CPU time of the child (plus Omni's parse
worker, and on PostgreSQL the server processes serving the run's connections, read from /proc when
the server is on this machine), and peak memory (the child's own high-water mark, VmHWM; the parse
worker apart, as its ru_maxrss; a PostgreSQL server's memory not included). Then Omni's ratio to the
floor and the targets (issue 15): >= 20,000 events/s on SQLite and >= 10,000 on PostgreSQL, within 4x
of the floor, peak memory under 300 MB at 200,000 customers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.feeds import FEED_END, write_realistic, write_synthetic  # noqa: E402

# Omni receives the feed a day after its last event (its timestamps are all in the past).
RECEIVED_AT = FEED_END + timedelta(days=1)
TARGET_RATE = {"sqlite": 20_000, "postgresql": 10_000}
TARGET_RATIO = 4.0
TARGET_PEAK_MB = 300


def _server_cpu(pids: set[int]) -> float | None:
    """CPU seconds used so far by the PostgreSQL server processes ``pids``, or None when they cannot be
    read (a server on another machine)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if fields[0] == "Z":  # ended (a connection closed): its time is gone with it
            return None
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


@contextmanager
def server_cpu(engine: Any) -> Iterator[dict[str, float | None]]:
    """Measure the CPU time of the server processes behind ``engine``'s connections (PostgreSQL)."""
    from sqlalchemy import event

    measured: dict[str, float | None] = {"server_cpu_seconds": None}
    if engine.dialect.name != "postgresql":
        yield measured
        return
    pids: set[int] = set()
    before: dict[int, float] = {}

    def remember(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        dbapi_connection.rollback()  # leave the connection as it came
        pids.add(pid)
        before[pid] = _server_cpu({pid}) or 0.0

    event.listen(engine, "connect", remember)
    engine.dispose()  # connections opened from here on are measured
    try:
        yield measured
        used = _server_cpu(pids)
        if used is not None:
            measured["server_cpu_seconds"] = used - sum(before.values())
    finally:
        event.remove(engine, "connect", remember)


def open_store(url: str) -> Any:
    from profiles.db import create_store_engine, upgrade_schema

    engine = create_store_engine(url)
    upgrade_schema(engine)
    return engine


def converted_transactions(path: Path, dialect: str, per_transaction: int) -> Iterator[list[tuple]]:
    """The feed's valid events as rows of the events table, a transaction's worth at a time."""
    from omni.core.settings import Settings
    from profiles.bulk import timestamp_param
    from profiles.ingest import IngestOptions, prepared_batches
    from profiles.reader import iter_input

    options = IngestOptions.of(Settings())
    received = timestamp_param(dialect)(RECEIVED_AT)
    customers: dict[str, int] = {}
    rows: list[tuple] = []
    with path.open("rb") as stream:
        batches = prepared_batches(
            iter_input(stream, path.name, None, chunk_lines=options.batch_size),
            size=options.batch_size,
            now=RECEIVED_AT,
            default_region=options.default_region,
            dialect=dialect,
            workers=0,
            future=options.max_future,
        )
        for batch in batches:
            for e in batch.events:
                # One customer per userId, else anonymousId (row: message_id, type, name, channel,
                # properties, context, user_id, anonymous_id, occurred_at).
                who = e.row[6] or e.row[7]
                customer_id = customers.setdefault(who, len(customers) + 1)
                rows.append((e.row[0], customer_id, *e.row[1:], received))
            if len(rows) >= per_transaction:
                yield rows
                rows = []
    if rows:
        yield rows


def add_customers(conn: Any, dialect: str, first: int, last: int) -> None:
    """Customers ``first`` to ``last`` (empty profiles), on the driver connection ``conn``."""
    if last < first:
        return
    if dialect == "sqlite":
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO customers (id, traits, created_at, updated_at) VALUES (?, '{}', ?, ?)",
            [(i, "2026-11-01 00:00:00.000000", "2026-11-01 00:00:00.000000") for i in range(first, last + 1)],
        )
        conn.execute("COMMIT")
    else:
        conn.execute(
            "INSERT INTO customers (id, traits, created_at, updated_at) "
            "SELECT i, '{}', now(), now() FROM generate_series(%s::bigint, %s) AS g(i)",
            (first, last),
        )
        conn.commit()


def run_floor(path: Path, url: str) -> dict:
    from omni.core.settings import Settings
    from profiles.ingest import EVENT_COLUMNS

    engine = open_store(url)
    dialect = engine.dialect.name
    per_transaction = max(Settings().ingest_transaction_size, Settings().ingest_batch_size)
    columns = ", ".join(EVENT_COLUMNS)
    elapsed = cpu = 0.0
    server: float | None = 0.0
    count = customers = 0
    raw = engine.raw_connection()
    conn = raw.driver_connection
    backend = {conn.info.backend_pid} if dialect == "postgresql" else set()
    for rows in converted_transactions(path, dialect, per_transaction):
        # The customers the rows point at, inserted before the clock starts.
        first, customers = customers + 1, max(customers, max(row[1] for row in rows))
        add_customers(conn, dialect, first, customers)
        started, cpu_started = time.perf_counter(), time.process_time()
        server_started = _server_cpu(backend)
        if dialect == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
            placeholders = ", ".join("?" * len(EVENT_COLUMNS))
            conn.executemany(f"INSERT INTO events ({columns}) VALUES ({placeholders})", rows)
            conn.execute("COMMIT")
        else:
            with conn.cursor() as cursor, cursor.copy(f"COPY events ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        server_ended = _server_cpu(backend)
        if server is not None and server_started is not None and server_ended is not None:
            server += server_ended - server_started
        else:
            server = None
        count += len(rows)
    raw.close()
    engine.dispose()
    return {
        "events": count,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "server_cpu_seconds": server if dialect == "postgresql" else None,
    }


def run_omni(path: Path, url: str) -> dict:
    from sqlalchemy import text

    from omni.core.settings import Settings
    from profiles.ingest import IngestOptions, ingest_files

    engine = open_store(url)
    options = IngestOptions.of(Settings())  # OMNI_INGEST_* as the CLI reads them
    with server_cpu(engine) as server:
        started, cpu_started = time.perf_counter(), time.process_time()
        result = ingest_files(engine, [str(path)], options=options, now=RECEIVED_AT)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with engine.connect() as conn:
        merged, alive = conn.execute(
            text("SELECT count(merged_into), count(*) - count(merged_into) FROM customers")
        ).one()
    engine.dispose()
    return {
        "events": result.read,
        **result.as_dict(),
        "merged": merged,
        "customers": alive,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        **server,
        "worker_cpu_seconds": children.ru_utime + children.ru_stime,
        "worker_peak_mb": children.ru_maxrss / 1024,
    }


def peak_mb() -> float:
    """This process's own peak resident memory, in MB: ``VmHWM`` on Linux. Not ``ru_maxrss``, which Linux
    carries over fork and exec: a child started by this script reported the script's own peak (the
    feed generator's, 274 MB at 200,000 customers) whenever that was higher than its own."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(phase: str, path: Path, url: str) -> None:
    result = {"floor": run_floor, "omni": run_omni}[phase](path, url)
    result["peak_mb"] = peak_mb()
    print(json.dumps(result))


def run_phase(phase: str, data: Path, url: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, "--input", str(data), "--url", url],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_text(side: dict) -> str:
    parts = [f"{side['cpu_seconds']:.1f} s"]
    if side.get("worker_cpu_seconds"):
        parts.append(f"+ {side['worker_cpu_seconds']:.1f} s parse worker ({side['worker_peak_mb']:.0f} MB)")
    if side.get("server_cpu_seconds") is not None:
        parts.append(f"+ {side['server_cpu_seconds']:.1f} s server")
    return " ".join(parts)


def report(label: str, dialect: str, customers: int, floor: dict, omni: dict) -> None:
    print(f"\n{label}")
    print(f"  {'':34}{'wall s':>8}{'events/s':>10}{'peak MB':>9}  cpu")
    floor_label = "floor: COPY into events" if dialect == "postgresql" else "floor: executemany into events"
    for name, side in ((floor_label, floor), ("omni ingest", omni)):
        rate = side["events"] / side["seconds"]
        print(f"  {name:34}{side['seconds']:>8.1f}{rate:>10,.0f}{side['peak_mb']:>9.0f}  {cpu_text(side)}")
    counts = ", ".join(f"{key} {omni[key]:,}" for key in ("accepted", "duplicates", "rejected"))
    print(f"  omni: {omni['events']:,} lines read: {counts}")
    print(f"  omni: {omni['merged']:,} customers merged into another, {omni['customers']:,} customers remain")
    rate = omni["events"] / omni["seconds"]
    ratio = omni["seconds"] / floor["seconds"]
    print(f"  events/s: {rate:,.0f} (target >= {TARGET_RATE[dialect]:,})")
    print(f"  ratio to floor: {ratio:.1f}x (target <= {TARGET_RATIO:g}x)")
    print(
        f"  peak memory: {omni['peak_mb']:.0f} MB at {customers:,} customers "
        f"(target < {TARGET_PEAK_MB} MB at 200,000 customers)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--feed", choices=["realistic", "synthetic"], default="realistic")
    parser.add_argument("--customers", type=int, help="default: 50,000 (realistic), 100,000 (synthetic)")
    parser.add_argument("--events", type=int, default=1_000_000, help="synthetic feed only")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--phase", choices=["floor", "omni"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args.phase, args.input, args.url)
        return
    customers = args.customers or (50_000 if args.feed == "realistic" else 100_000)

    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "events.jsonl"
        print(f"generating the {args.feed} feed of {customers:,} customers ...", flush=True)
        if args.feed == "realistic":
            counts = write_realistic(data, customers, seed=args.seed)
        else:
            counts = write_synthetic(data, args.events, customers, seed=args.seed)
        mix = ", ".join(f"{kind} {n:,}" for kind, n in counts.items() if kind not in ("events", "hostile"))
        print(
            f"input: {counts['events'] + counts['hostile']:,} lines ({counts['hostile']:,} hostile), "
            f"{data.stat().st_size / 1e6:,.1f} MB" + (f"; customers: {mix}" if mix else ""),
            flush=True,
        )
        if not args.skip_sqlite:
            figures = {
                phase: run_phase(phase, data, f"sqlite:///{tmpdir / f'{phase}.db'}")
                for phase in ("floor", "omni")
            }
            report("SQLite", "sqlite", customers, figures["floor"], figures["omni"])
        server = os.environ.get("OMNI_BENCH_DATABASE_URL")
        if not server:
            print("\n(PostgreSQL: set OMNI_BENCH_DATABASE_URL to run it too)")
            return
        from profiles.db import scratch_database

        figures = {}
        for phase in ("floor", "omni"):
            with scratch_database(server, prefix="omni_bench") as url:
                figures[phase] = run_phase(phase, data, url)
        report("PostgreSQL", "postgresql", customers, figures["floor"], figures["omni"])


if __name__ == "__main__":
    main()
