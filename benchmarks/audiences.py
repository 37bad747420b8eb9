"""Benchmark: build every built-in audience on a synthetic store and compare with hand-written SQL.

    .venv/bin/python benchmarks/audiences.py                       # 1,000,000 customers, 10,000,000 events
    .venv/bin/python benchmarks/audiences.py --customers 100000 --events 1000000
    OMNI_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python benchmarks/audiences.py

The store is written straight into the tables with SQL (recursive CTE on SQLite, generate_series on
PostgreSQL), the events' secondary indexes built after the load and, on PostgreSQL, a plain VACUUM
(the visibility map and hint bits autovacuum would set after such a load). The benchmark runs no
ANALYZE: one untimed build of every audience (a store in service) is where the product finds the
loaded tables without statistics and refreshes them itself (``profiles.db.refresh_stale_statistics``,
which every build runs first). SQLite runs in a temporary file;
PostgreSQL, when ``OMNI_BENCH_DATABASE_URL`` is set, in a database this script creates on that
server and drops at the end.

For each audience it prints the time of a hand-written query returning the same ids (fetched; the
best of two runs), of the first build (every member enters: the rows are written) and of a rebuild
15 minutes later (the steady state of the 15-minute schedule), each build's ratio to the hand-written
query, and checks that the members equal the hand-written query's ids. Build times are wall times of
``build_audience`` (connection, build, build log row, commit), and the best of two runs as well, like
the hand-written query's (on a shared machine one sample against the best of two would compare a
build's noise with the query's luck): the audience's rows and build log are removed (and, on
PostgreSQL, vacuumed away), untimed, before each first build, so both runs start from the same table,
the one the hand-written INSERT below leaves; each rebuild follows its own first build. Every run's
members are checked.

A first build writes one row per member, which the hand-written query does not, so a second table
compares it with the same rows written by hand: one ``INSERT INTO audience_memberships ... SELECT``
of the hand-written query (best of two, committed, then removed), and the first build's time beyond
the hand-written query, per row written and as a share of the build. Peak memory is this
process's (which includes SQLite's page cache; PostgreSQL's server memory is not counted).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audiences import build_audience, build_audiences, load_audiences  # noqa: E402
from audiences.definitions import builtin_directory  # noqa: E402
from omni.core.channels import Channel, Touchpoint  # noqa: E402
from omni.core.statuses import ConsentStatus  # noqa: E402
from profiles.db import (  # noqa: E402
    UTCDateTime,
    create_store_engine,
    scratch_database,
    upgrade_schema,
)
from profiles.models import AudienceMembership  # noqa: E402

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
YEAR = 365 * 86400
# The touchpoints of the generated events, one entry per share: the web three, the app two, the others one.
SHARES = {Touchpoint.WEB: 3, Touchpoint.APP: 2}
CHANNELS = [touchpoint.value for touchpoint in Touchpoint for _ in range(SHARES.get(touchpoint, 1))]
# name, share of events (per mille)
EVENT_NAMES = [
    ("Page Viewed", 450),
    ("Product Viewed", 250),
    ("Product Added", 100),
    ("Application Opened", 80),
    ("Email Opened", 60),
    ("Order Completed", 30),
    ("Checkout Started", 30),
]
EVENT_INDEXES = {
    "ix_events_customer_name_occurred": "events (customer_id, name, occurred_at)",
    "ix_events_name_occurred": "events (name, occurred_at)",
}

MULTIPLIERS = [2654435761, 2246822519, 3266489917, 668265263, 374761393, 1103515245]

HAND_WRITTEN = {
    "cart_abandoners": """
        SELECT DISTINCT c.id AS customer_id FROM carts k JOIN customers c ON c.id = k.customer_id
        WHERE k.status = 'open' AND k.value > 0 AND k.started_at <= :now AND k.updated_at <= :idle_cutoff
          AND NOT EXISTS (SELECT 1 FROM events e WHERE e.customer_id = k.customer_id
                          AND e.name = 'Order Completed' AND e.occurred_at >= k.updated_at
                          AND e.occurred_at <= :now)
          AND c.merged_into IS NULL AND c.email IS NOT NULL AND c.email <> ''
          AND NOT EXISTS (SELECT 1 FROM consents s WHERE s.customer_id = c.id AND s.channel = 'email'
                          AND s.status = 'opted_out')""",
    "lapsed_buyers": """
        SELECT o.customer_id AS customer_id FROM orders o JOIN customers c ON c.id = o.customer_id
        WHERE c.merged_into IS NULL AND o.placed_at <= :now
        GROUP BY o.customer_id HAVING MAX(o.placed_at) < :since_90d""",
    "omnichannel_engaged": """
        SELECT e.customer_id AS customer_id FROM events e JOIN customers c ON c.id = e.customer_id
        WHERE c.merged_into IS NULL AND e.occurred_at >= :since_90d AND e.occurred_at <= :now
        GROUP BY e.customer_id HAVING COUNT(DISTINCT e.channel) >= 3""",
    "pickup_ready": """
        SELECT DISTINCT o.customer_id AS customer_id FROM orders o JOIN customers c ON c.id = o.customer_id
        WHERE c.merged_into IS NULL AND o.fulfillment = 'pickup' AND o.status = 'ready_for_pickup'
          AND o.placed_at <= :now""",
}


def _sql_list(values: list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _case_by_bucket(expr: str, weighted: list[tuple[str, int]]) -> str:
    parts, edge = [], 0
    for value, weight in weighted:
        edge += weight
        parts.append(f"WHEN {expr} < {edge} THEN '{value}'")
    return "CASE " + " ".join(parts) + f" ELSE '{weighted[-1][0]}' END"


# The tables generate() writes, whose statistics are refreshed after the load.


def generate(engine: Engine, customers: int, events: int) -> None:
    """Write the synthetic store with SQL inside the database."""
    sqlite = engine.dialect.name == "sqlite"
    base = int(NOW.timestamp())

    def ts(seconds_ago: str) -> str:
        if sqlite:
            return f"(datetime({base} - ({seconds_ago}), 'unixepoch') || '.000000')"
        return f"to_timestamp({base} - ({seconds_ago}))"

    def rnd(modulo: int, column: str = "s.i", k: int = 0) -> str:
        # Deterministic pseudo-random from the row number (the same store on every run and dialect;
        # SQLite would also re-evaluate random() at each reference of a flattened subquery).
        return f"((({column} * {MULTIPLIERS[k]} + {k * 7919}) % 4294967291) % {modulo})"

    def series(count: int) -> str:
        if sqlite:
            return (
                f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) "
                "SELECT i FROM n"
            )
        return f"SELECT i FROM generate_series(1::bigint, {count}) AS g(i)"

    channels = "(ARRAY[" + _sql_list(CHANNELS) + "])" if not sqlite else None
    channel_expr = (
        f"{channels}[1 + x.c]"
        if not sqlite
        else "CASE " + " ".join(f"WHEN x.c = {i} THEN '{ch}'" for i, ch in enumerate(CHANNELS)) + " END"
    )
    name_expr = _case_by_bucket("x.b", EVENT_NAMES)
    with engine.begin() as conn:
        for name in EVENT_INDEXES:
            conn.execute(text(f"DROP INDEX {name}"))
        t = time.perf_counter()
        # 85 % have an email, 40 % a phone; 1 % were merged into the customer before them.
        conn.execute(
            text(
                "INSERT INTO customers (id, email, phone, traits, created_at, updated_at, merged_into) "
                f"SELECT s.i, CASE WHEN s.i % 20 < 17 THEN 'c' || s.i || '@example.com' END, "
                f"CASE WHEN s.i % 5 < 2 THEN '+1415' || s.i END, '{{}}', {ts(str(YEAR))}, {ts('0')}, "
                f"CASE WHEN s.i % 100 = 0 THEN s.i - 1 END FROM ({series(customers)}) AS s"
            )
        )
        conn.execute(
            text(
                "INSERT INTO consents (customer_id, channel, status, source, updated_at) "
                f"SELECT s.i, '{Channel.EMAIL}', '{ConsentStatus.OPTED_OUT}', 'bench', {ts('86400')} "
                f"FROM ({series(customers)}) AS s "
                "WHERE s.i % 25 = 0"
            )
        )
        print(f"  customers, consents     {time.perf_counter() - t:7.1f} s", flush=True)
        t = time.perf_counter()
        # message ids zero-padded, so the unique index is appended to in order
        pad = "printf('e%010d', x.i)" if sqlite else "'e' || lpad(x.i::text, 10, '0')"
        conn.execute(
            text(
                "INSERT INTO events (message_id, customer_id, type, name, channel, properties, context, "
                "occurred_at, received_at) "
                f"SELECT {pad}, x.cust, 'track', {name_expr}, {channel_expr}, '{{}}', '{{}}', "
                f"{ts('x.ago')}, {ts('x.ago')} FROM ("
                f"SELECT s.i AS i, 1 + {rnd(customers, k=1)} AS cust, {rnd(1000, k=2)} AS b, "
                f"{rnd(len(CHANNELS), k=3)} AS c, {rnd(YEAR, k=4)} AS ago FROM ({series(events)}) AS s) AS x"
            )
        )
        print(f"  events                  {time.perf_counter() - t:7.1f} s", flush=True)
        t = time.perf_counter()
        for name, target in EVENT_INDEXES.items():
            conn.execute(text(f"CREATE INDEX {name} ON {target}"))
        print(f"  event indexes           {time.perf_counter() - t:7.1f} s", flush=True)
        t = time.perf_counter()
        # Orders from the Order Completed events: 10 % for pickup, half of those ready.
        conn.execute(
            text(
                "INSERT INTO orders (order_id, customer_id, channel, total, fulfillment, status, items, "
                "placed_at, updated_at) "
                "SELECT message_id, customer_id, channel, 10 + id % 200, "
                "CASE WHEN id % 10 = 0 THEN 'pickup' WHEN channel = 'store' THEN 'in_store' ELSE 'ship' END, "
                "CASE WHEN id % 20 = 0 THEN 'ready_for_pickup' WHEN id % 10 = 0 THEN 'picked_up' "
                "ELSE 'placed' END, '[]', occurred_at, occurred_at FROM events WHERE name = 'Order Completed'"
            )
        )
        # One cart for 1 customer in 7: open (two thirds) or converted, last activity in the last 3 days.
        conn.execute(
            text(
                "INSERT INTO carts (customer_id, status, items, item_count, value, started_at, updated_at) "
                f"SELECT x.i, CASE WHEN x.i % 3 = 0 THEN 'converted' ELSE 'open' END, '[]', x.i % 4, "
                f"(x.i % 4) * 12.5, {ts('x.ago + 3600')}, {ts('x.ago')} FROM ("
                f"SELECT s.i AS i, {rnd(3 * 86400, k=5)} AS ago FROM ({series(customers)}) AS s "
                "WHERE s.i % 7 = 0) AS x"
            )
        )
        print(f"  orders, carts           {time.perf_counter() - t:7.1f} s", flush=True)
    # Statistics are the product's job, not the benchmark's: the rows above are written with plain SQL,
    # and the first audience build finds the tables without statistics and refreshes them itself
    # (profiles.db.refresh_stale_statistics), before any query is timed (see measure()).
    if not sqlite:
        # Benchmark hygiene, not statistics: a plain VACUUM, as autovacuum does after a load this size
        # (it is off on some servers, and runs when it likes on others). The planner then sees the
        # loaded pages all-visible, as in a store in service (which prices index-only scans as such),
        # and whichever query first reads a table does not pay for setting its rows' hint bits for all
        # the others.
        t = time.perf_counter()
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM"))
        print(f"  {'VACUUM':<24}{time.perf_counter() - t:7.1f} s", flush=True)


def _hand_statement(name: str, now: datetime, sql: str) -> tuple[Any, dict[str, Any]]:
    params = {"now": now, "idle_cutoff": now - timedelta(hours=1), "since_90d": now - timedelta(days=90)}
    params = {key: value for key, value in params.items() if f":{key}" in HAND_WRITTEN[name]}
    statement = text(sql).bindparams(*[bindparam(key, type_=UTCDateTime()) for key in params])
    return statement, params


def hand_written(engine: Engine, name: str, now: datetime) -> tuple[float, set[int]]:
    """The hand-written query's ids, fetched into Python: (best of two wall times, ids)."""
    statement, params = _hand_statement(name, now, HAND_WRITTEN[name])
    best, ids = float("inf"), set()
    for _ in range(2):
        started = time.perf_counter()
        with engine.connect() as conn:
            ids = {row[0] for row in conn.execute(statement, params)}
        best = min(best, time.perf_counter() - started)
    return best, ids


def hand_written_insert(engine: Engine, name: str, now: datetime) -> tuple[float, int]:
    """The least a first build must do: the hand-written query's ids written as open membership rows
    by one INSERT ... SELECT (same table and indexes; committed). Best of two wall times;
    the rows are deleted after each run (and, on PostgreSQL, vacuumed away), untimed, so the build
    that follows starts from the same table."""
    sql = (
        "INSERT INTO audience_memberships (audience, customer_id, entered_at) "
        f"SELECT :audience, h.customer_id, :now FROM ({HAND_WRITTEN[name]}) AS h"
    )
    statement, params = _hand_statement(name, now, sql)
    statement = statement.bindparams(bindparam("now", type_=UTCDateTime()))
    params = {**params, "now": now, "audience": name}
    best, rows = float("inf"), 0
    for _ in range(2):
        started = time.perf_counter()
        with engine.begin() as conn:
            rows = conn.execute(statement, params).rowcount
        best = min(best, time.perf_counter() - started)
        remove_audience(engine, name)
    return best, rows


def remove_audience(engine: Engine, name: str) -> None:
    """Untimed: the audience's membership rows and build log, as if it had never been built; on
    PostgreSQL the dead rows are vacuumed away, so the next writer finds the table as the last did."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audience_memberships WHERE audience = :a"), {"a": name})
        conn.execute(text("DELETE FROM audience_builds WHERE audience = :a"), {"a": name})
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM audience_memberships"))


def timed_build(engine: Engine, name: str, now: datetime, definitions: dict) -> tuple[float, Any]:
    """Wall time of a whole build: connection, the build, its log row and the commit."""
    started = time.perf_counter()
    result = build_audience(engine, name, now=now, definitions=definitions)
    return time.perf_counter() - started, result


def current_members(engine: Engine, name: str) -> set[int]:
    table = AudienceMembership.__table__
    with engine.connect() as conn:
        return set(
            conn.execute(
                select(table.c.customer_id).where(table.c.audience == name, table.c.exited_at.is_(None))
            ).scalars()
        )


def _generate_in_child(url: str, customers: int, events: int) -> None:
    engine = create_store_engine(url)
    try:
        upgrade_schema(engine)
        generate(engine, customers, events)
    finally:
        engine.dispose()


def generate_in_child_process(
    engine: Engine, customers: int, events: int, *, target: Callable[[str, int, int], None] | None = None
) -> None:
    """Generate the store (``target(url, customers, events)``, default :func:`generate` on a migrated
    store) in a child process, so that the peak memory a benchmark prints afterwards is its own work's
    alone (building the event indexes sorts 10M rows in memory)."""
    started = time.perf_counter()
    child = multiprocessing.get_context("fork").Process(
        target=target or _generate_in_child,
        args=(engine.url.render_as_string(hide_password=False), customers, events),
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"generating the store failed (exit code {child.exitcode})")
    print(f"  generated in {time.perf_counter() - started:.1f} s", flush=True)


def run(engine: Engine, label: str, customers: int, events: int) -> bool:
    print(f"\n{label}: {customers:,} customers, {events:,} events", flush=True)
    generate_in_child_process(engine, customers, events)
    return measure(engine, label)


def measure(engine: Engine, label: str) -> bool:
    """Hand-written queries and builds of every built-in audience on a generated store."""
    definitions = load_audiences(builtin_directory())
    print(
        f"  {'audience':<22}{'members':>10}{'hand SQL':>11}{'build':>9}{'ratio':>7}"
        f"{'rebuild':>9}{'ratio':>7}  same ids"
    )
    ok = True
    floors = []
    # A store in service: its audiences were built before (the product refreshes stale statistics then).
    t = time.perf_counter()
    build_audiences(engine, now=NOW - timedelta(days=1), definitions=definitions)
    for name in definitions:  # each audience is then measured from an empty table, as before
        remove_audience(engine, name)
    print(f"  earlier builds (untimed) {time.perf_counter() - t:6.1f} s", flush=True)
    for name in definitions:
        hand_time, hand_ids = hand_written(engine, name, NOW)
        floor_time, floor_rows = hand_written_insert(engine, name, NOW)
        later = NOW + timedelta(minutes=15)
        first_time = second_time = float("inf")
        members_seen = []
        for run_index in range(2):  # best of two, each run from the same table
            if run_index:
                remove_audience(engine, name)
            elapsed, first = timed_build(engine, name, NOW, definitions)
            first_time = min(first_time, elapsed)
            first_members = current_members(engine, name)
            elapsed, second = timed_build(engine, name, later, definitions)
            second_time = min(second_time, elapsed)
            members_seen.append((first_members, current_members(engine, name)))
        later_time, later_ids = hand_written(engine, name, later)
        same = floor_rows == len(hand_ids) and all(
            first_members == hand_ids and later_members == later_ids
            for first_members, later_members in members_seen
        )
        ok = ok and same
        print(
            f"  {name:<22}{first.size:>10,}{hand_time:>10.2f}s{first_time:>8.2f}s"
            f"{first_time / hand_time:>6.2f}x{second_time:>8.2f}s"
            f"{second_time / later_time:>6.2f}x"
            f"  {'yes' if same else 'NO'}  (rebuild: +{second.entered:,} -{second.exited:,})",
            flush=True,
        )
        floors.append((name, first.entered, hand_time, floor_time, first_time))
    # A first build writes every member once; the hand-written query writes nothing. The fair floor
    # for it is the same ids written by hand (INSERT ... SELECT of the hand-written query); "beyond
    # the query" is the build's time over the hand-written query's, per row written and as a share.
    print(
        f"\n  first build vs writing its rows by hand ({label}):\n"
        f"  {'audience':<22}{'rows':>10}{'hand INSERT':>13}{'build':>9}{'ratio':>7}"
        f"{'beyond the query: per row':>27}{'share':>7}"
    )
    for name, rows, hand_time, floor_time, first_time in floors:
        beyond = max(first_time - hand_time, 0.0)
        per_row = beyond / rows * 1e6 if rows else 0.0
        print(
            f"  {name:<22}{rows:>10,}{floor_time:>12.2f}s{first_time:>8.2f}s"
            f"{first_time / floor_time:>6.2f}x{per_row:>24.1f} us{beyond / first_time:>7.0%}"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak memory (hand-written queries and builds, this process): {peak_mb:.0f} MB")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--sqlite-path", help="SQLite file to use (default: a temporary file, removed after)")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    ok = True
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory() as folder:
            path = args.sqlite_path or str(Path(folder) / "bench.db")
            if Path(path).exists():
                Path(path).unlink()
            engine = create_store_engine(f"sqlite:///{path}")
            try:
                ok = run(engine, "SQLite", args.customers, args.events) and ok
            finally:
                engine.dispose()
    pg_url = os.environ.get("OMNI_BENCH_DATABASE_URL")
    if pg_url:
        with scratch_database(pg_url, prefix="omni_bench") as url:
            engine = create_store_engine(url)
            try:
                ok = run(engine, "PostgreSQL", args.customers, args.events) and ok
            finally:
                engine.dispose()
    else:
        print("\n(PostgreSQL: set OMNI_BENCH_DATABASE_URL to run it too)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
