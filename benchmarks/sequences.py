"""Benchmark: customers entering the flagship ``abandoned_cart`` sequence, three ticks through simulated days.

    .venv/bin/python benchmarks/sequences.py                        # 100,000 customers, the engine directly
    .venv/bin/python benchmarks/sequences.py --customers 10000
    .venv/bin/python benchmarks/sequences.py --prefect              # each tick as the run_sequences flow
    OMNI_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python benchmarks/sequences.py
    OMNI_BENCH_DATABASE_URL=... .venv/bin/python benchmarks/sequences.py --shards 2   # PostgreSQL in 2 shards

The store is written straight into the tables with SQL (recursive CTE on SQLite, generate_series on
PostgreSQL): every customer has an email, a phone with SMS opt-in, a home store and an open cart idle
for 2 hours, so ``cart_abandoners`` picks them all up. SQLite runs in a temporary file; PostgreSQL,
when ``OMNI_BENCH_DATABASE_URL`` is set, in a database this script creates on that server and drops.

Ticks, with every channel on the outbox connector (rows in the ``outbox`` table):

1. at T (15:00 UTC, daytime for the stores' customers): build ``cart_abandoners``, enroll everyone
   (10 % holdout), send the cart email;
2. at T + 1 day: add everyone to the ``cart_retargeting`` ad audience;
3. at T + 3 days: the SMS pickup reminder.

Printed per tick: wall time, this process's CPU time (wall time on a busy machine includes waiting for a
core; CPU time does not, and it includes SQLite's work but not a PostgreSQL server's), on PostgreSQL the
CPU time of the server processes serving the run's connections (read from /proc when the server runs on
this machine), the statements the engine sent (each a round trip on PostgreSQL; commits included),
messages sent, messages per second (of wall time), batches of ``DeliveryPolicy.batch_size`` the engine
walked (enrollments) and dispatched (deliveries), Prefect task runs (with ``--prefect``), and the
process's peak memory so far (ru_maxrss; SQLite's page cache included, a PostgreSQL server's memory
not). The baseline, in the same run and store: one plain multi-row INSERT of as many outbox rows as the
first tick sent (then deleted again before the ticks). With both databases, the PostgreSQL/SQLite ratio
per tick follows: of wall time, and of CPU time (on PostgreSQL this process's plus the server's), the
steadier figure on a shared machine. ``--shards N`` runs the PostgreSQL ticks in N shards (threads of
this process, each on its own connections, as ``omni sequences run --shards N``); SQLite always runs one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiles.bulk import insert_rows  # noqa: E402
from profiles.db import create_store_engine, scratch_database, session_scope, sqlite_timestamp, upgrade_schema  # noqa: E402
from profiles.models import OutboxMessage  # noqa: E402
from profiles.stores import parse_store, upsert_stores  # noqa: E402

T0 = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
TICKS = (("T", timedelta(0)), ("T + 1 day", timedelta(days=1)), ("T + 3 days", timedelta(days=3)))
STORES = [
    {"id": "nyc", "name": "Omni SoHo", "city": "New York", "timezone": "America/New_York"},
    {"id": "lis", "name": "Omni Chiado", "city": "Lisbon", "timezone": "Europe/Lisbon"},
]
CART_ITEMS = '[{"product_id": "tee", "sku": null, "name": "Black Tee", "price": 19.5, "quantity": 2}]'


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(engine: Engine, customers: int) -> None:
    """Customers, SMS consents and open carts, written with SQL inside the database."""
    sqlite = engine.dialect.name == "sqlite"
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=T0 - timedelta(days=30))

    def ts(value: datetime) -> str:
        return f"'{sqlite_timestamp(value)}'" if sqlite else f"'{value.isoformat()}'::timestamptz"

    series = (
        f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {customers}) "
        "SELECT i FROM n"
        if sqlite
        else f"SELECT i FROM generate_series(1::bigint, {customers}) AS g(i)"
    )
    created, cart_at = ts(T0 - timedelta(days=10)), ts(T0 - timedelta(hours=2))
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, email, phone, first_name, home_store_id, traits, created_at, "
                f"updated_at) SELECT s.i, 'c' || s.i || '@example.org', '+1212' || (2000000 + s.i), "
                f"'Cust' || s.i, CASE WHEN s.i % 3 = 0 THEN 'lis' ELSE 'nyc' END, '{{}}', {created}, "
                f"{created} FROM ({series}) AS s"
            )
        )
        conn.execute(
            text(
                "INSERT INTO consents (customer_id, channel, status, source, updated_at) "
                f"SELECT s.i, 'sms', 'opted_in', 'bench', {created} FROM ({series}) AS s"
            )
        )
        conn.execute(
            text(
                "INSERT INTO carts (customer_id, status, items, item_count, value, currency, started_at, "
                f"updated_at) SELECT s.i, 'open', '{CART_ITEMS}', 2, 39.0, 'USD', {cart_at}, {cart_at} "
                f"FROM ({series}) AS s"
            )
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def _server_cpu(engine: Engine) -> dict[int, float] | None:
    """CPU seconds so far of each PostgreSQL server process connected to ``engine``'s database, or None
    (SQLite; a server on another machine)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        ).scalars()
        used: dict[int, float] = {}
        clock = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            used[pid] = (int(fields[11]) + int(fields[12])) / clock  # utime, stime
    return used


class StatementCounter:
    """Counts the statements (and commits) the engine sends: on PostgreSQL, each is a round trip."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._statement)

    def _statement(self, *_args: Any) -> None:
        self.count += 1

    def take(self) -> int:
        count, self.count = self.count, 0
        return count

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._statement)


def baseline_insert(engine: Engine, rows: int) -> float:
    """Seconds for one plain INSERT of ``rows`` outbox rows (driver executemany), deleted again after."""
    table = OutboxMessage.__table__
    batch = [
        {
            "delivery_id": f"baseline:{i}",
            "channel": "email",
            "customer_id": i,
            "recipient": f"c{i}@example.org",
            "template": "email/abandoned_cart",
            "subject": f"Cust{i}, you left 2 items in your cart",
            "body": "Black Tee ($39.00) is waiting for you. " * 8,
            "payload": {"delivery_id": f"baseline:{i}", "channel": "email", "to": f"c{i}@example.org"},
            "sent_at": T0,
        }
        for i in range(1, rows + 1)
    ]
    started = time.perf_counter()
    with session_scope(engine) as session:
        insert_rows(session, table, batch)
    seconds = time.perf_counter() - started
    with engine.begin() as conn:
        conn.execute(table.delete())
    return seconds


class BatchCounter:
    """Counts the engine's walk and dispatch batches by wrapping its per-batch functions."""

    def __init__(self) -> None:
        import sequences.dispatch
        import sequences.walking

        self.walking, self.dispatch = sequences.walking, sequences.dispatch
        self.walked = 0
        self.dispatched = 0
        self._walk = self.walking._walk_batch
        self._dispatch = self.dispatch._dispatch_batch

        def walk(*args: Any, **kwargs: Any) -> Any:
            self.walked += 1
            return self._walk(*args, **kwargs)

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            self.dispatched += 1
            return self._dispatch(*args, **kwargs)

        self.walking._walk_batch = walk
        self.dispatch._dispatch_batch = dispatch

    def take(self) -> tuple[int, int]:
        counts = (self.walked, self.dispatched)
        self.walked = self.dispatched = 0
        return counts

    def close(self) -> None:
        self.walking._walk_batch = self._walk
        self.dispatch._dispatch_batch = self._dispatch


def engine_ticker(engine: Engine, shards: int = 1) -> Callable[[datetime], tuple[dict[str, Any], int | None]]:
    from omni.core.settings import Settings
    from sequences.tick import run_tick

    settings = Settings()

    def tick(at: datetime) -> tuple[dict[str, Any], int | None]:
        report = run_tick(engine, now=at, settings=settings, names=["abandoned_cart"], shards=shards)
        return report.as_dict(), None

    return tick


def flow_ticker(url: str) -> Callable[[datetime], tuple[dict[str, Any], int | None]]:
    """Each tick as the ``run_sequences`` flow; also returns the task runs the flow run created."""
    for name, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(name, value)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.run_sequences import run_sequences

    def tick(at: datetime) -> tuple[dict[str, Any], int | None]:
        state = run_sequences(now=at, names=["abandoned_cart"], database_url=url, return_state=True)
        result = state.result()
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200
            )
        return result, len(runs)

    return tick


def run(
    engine: Engine, label: str, customers: int, use_prefect: bool, shards: int = 1
) -> list[dict[str, Any]]:
    """The three ticks on ``engine``; returns per tick its wall and CPU seconds (CPU: this process's plus,
    on PostgreSQL, the server's when it can be read)."""
    in_shards = f" in {shards} shards" if shards > 1 and engine.dialect.name == "postgresql" else ""
    print(f"\n{label}: {customers:,} customers entering abandoned_cart{in_shards}", flush=True)
    upgrade_schema(engine)
    started = time.perf_counter()
    generate(engine, customers)
    print(f"  generated in {time.perf_counter() - started:.1f} s; peak memory so far {peak_mb():.0f} MB")
    expected_first = customers - customers // 10  # about 10 % held out
    base = baseline_insert(engine, expected_first)
    print(
        f"  baseline: one plain INSERT of {expected_first:,} outbox rows: {base:.2f} s "
        f"({expected_first / base:,.0f} rows/s)"
    )
    url = engine.url.render_as_string(hide_password=False)
    tick = flow_ticker(url) if use_prefect else engine_ticker(engine, shards)
    counter = BatchCounter()
    statements = StatementCounter(engine)
    print(
        f"  {'tick':<12}{'wall':>8}{'cpu':>8}{'server':>8}{'stmts':>8}{'sent':>9}{'msg/s':>9}{'channel':>9}"
        f"{'walk b.':>9}{'disp. b.':>10}{'tasks':>7}{'peak MB':>9}"
    )
    total_tasks = 0
    figures: list[dict[str, Any]] = []
    try:
        for name, offset in TICKS:
            at = T0 + offset
            statements.take()
            server_before = _server_cpu(engine)
            t, cpu = time.perf_counter(), time.process_time()
            report, tasks = tick(at)
            seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
            server_after = _server_cpu(engine)
            server = (
                sum(used - server_before.get(pid, 0.0) for pid, used in server_after.items())
                if server_before is not None and server_after is not None
                else None
            )
            sent_statements = statements.take()
            walked, dispatched = counter.take()
            steps = report["sequences"]["abandoned_cart"]["steps"]
            # Messages and ad-audience updates alike: what went out to a provider in this tick.
            sent = sum(s["sent"] + s["added"] + s["removed"] for s in steps.values())
            channel = next((step for step, s in steps.items() if s["sent"] + s["added"] + s["removed"]), "-")
            total_tasks += tasks or 0
            server_text = f"{server:>7.1f}s" if server is not None else f"{'-':>8}"
            print(
                f"  {name:<12}{seconds:>7.1f}s{cpu:>7.1f}s{server_text}{sent_statements:>8,}{sent:>9,}"
                f"{sent / seconds:>9,.0f}{channel[:8]:>9}{walked:>9}{dispatched:>10}"
                f"{tasks if tasks is not None else '-':>7}{peak_mb():>9.0f}",
                flush=True,
            )
            figures.append({"tick": name, "wall": seconds, "cpu": cpu + (server or 0.0), "sent": sent})
    finally:
        counter.close()
        statements.close()
    with session_scope(engine) as session:
        by_channel = dict(
            session.execute(
                select(OutboxMessage.__table__.c.channel, func.count()).group_by(
                    OutboxMessage.__table__.c.channel
                )
            ).all()
        )
    print(f"  outbox rows by channel: {by_channel}")
    if use_prefect:
        print(
            f"  Prefect task runs: {total_tasks} in all "
            f"(1 per {customers / max(total_tasks, 1):,.0f} customers)"
        )
    else:
        print("  Prefect task runs: not measured (engine called directly; pass --prefect)")
    print(f"  peak memory (this process): {peak_mb():.0f} MB")
    return figures


def print_ratios(sqlite: list[dict[str, Any]], postgresql: list[dict[str, Any]], label: str) -> None:
    """PostgreSQL's figures over SQLite's, tick by tick (target: within 1.5x)."""
    print(f"\nPostgreSQL{label} / SQLite, per tick (target: wall within 1.5x)")
    print(f"  {'tick':<12}{'wall':>14}{'ratio':>7}{'cpu (+server)':>18}{'ratio':>7}")
    for lite, pg in zip(sqlite, postgresql, strict=True):
        print(
            f"  {lite['tick']:<12}{pg['wall']:>6.1f}/{lite['wall']:>5.1f} s{pg['wall'] / lite['wall']:>6.2f}x"
            f"{pg['cpu']:>10.1f}/{lite['cpu']:>5.1f} s{pg['cpu'] / lite['cpu']:>6.2f}x"
        )
    total = sum(p["wall"] for p in postgresql) / sum(s["wall"] for s in sqlite)
    print(f"  all ticks: wall {total:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--prefect", action="store_true", help="Run each tick as the run_sequences flow.")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument(
        "--shards", type=int, default=1, help="Run the PostgreSQL ticks in this many shards (threads)."
    )
    args = parser.parse_args()
    if args.shards > 1 and args.prefect:
        parser.error("--shards runs the engine directly; not with --prefect")
    sqlite_figures: list[dict[str, Any]] = []
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            engine = create_store_engine(f"sqlite:///{Path(folder) / 'bench.db'}")
            try:
                sqlite_figures = run(engine, "SQLite", args.customers, args.prefect)
            finally:
                engine.dispose()
    pg_url = os.environ.get("OMNI_BENCH_DATABASE_URL")
    if pg_url:
        with scratch_database(pg_url, prefix="omni_bench") as url:
            engine = create_store_engine(url)
            try:
                pg_figures = run(engine, "PostgreSQL", args.customers, args.prefect, args.shards)
            finally:
                engine.dispose()
        if sqlite_figures:
            print_ratios(sqlite_figures, pg_figures, f" ({args.shards} shards)" if args.shards > 1 else "")
    else:
        print("\n(PostgreSQL: set OMNI_BENCH_DATABASE_URL to run it too)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
