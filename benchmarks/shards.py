"""Benchmark: one ``abandoned_cart`` tick on PostgreSQL by one worker, then by several shard workers.

    OMNI_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/postgres .venv/bin/python benchmarks/shards.py
    ... benchmarks/shards.py --customers 20000 --workers 1 2 4 --rounds 2 --ticks 2

For each round and each worker count (alternately, so a busy machine hurts each alike), a fresh database on
the server with the store of ``benchmarks/sequences.py`` (every customer an email, an SMS consent and an
open cart), then the ticks at T (enroll everyone, 10 % held out, send the cart email) and, with ``--ticks
2``, T + 1 day (add everyone to an ad audience):

- today: the one-worker tick (``run_tick``, ``shards=1``) in this process;
- ``--shards`` shards (default 2) on n worker processes: ``run_tick(shards=...)``: audiences, enrollment
  and exits in this process, then the shards spread over n worker processes started before the clock
  starts (as a work pool's workers are), each shard a call of ``sequences.tick.run_shard`` on the
  worker's own connections. One worker runs the shards one after the other: the same work as two
  workers, so the two compare the parallelism alone.

Printed per tick: wall time, CPU time of this process and of the workers (a PostgreSQL server's CPU is
in neither), the slowest shard's wall time, messages sent, and duplicates: deliveries handed to the
outbox connector more than once (counted before the outbox's own dedupe, which would hide them) plus
outbox rows sharing a delivery id. PostgreSQL only: on SQLite a tick is always one shard.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni.core.settings import Settings  # noqa: E402
from profiles.db import create_store_engine, scratch_database, session_scope, upgrade_schema  # noqa: E402
from profiles.models import OutboxMessage  # noqa: E402
from sequences.reports import TickReport  # noqa: E402
from sequences.shards import Shard  # noqa: E402
from sequences.tick import run_tick  # noqa: E402


def _store_benchmark() -> Any:
    """benchmarks/sequences.py (its name is the engine package's): its store generator and T."""
    spec = importlib.util.spec_from_file_location("bench_sequences", Path(__file__).with_name("sequences.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- in each worker process ------------------------------------------------------------------------------

_ENGINES: dict[str, Any] = {}
_SENT: list[str] = []


def _worker_ready(_warm: int = 0) -> int:
    """Import everything a shard needs and count what the outbox connector is handed."""
    from profiles.outbox import OutboxRecorder

    if not getattr(OutboxRecorder, "_bench_counting", False):
        original = OutboxRecorder.__call__

        def record(recorder: Any, rows: Any) -> Any:
            _SENT.extend(row["delivery_id"] for row in rows)
            return original(recorder, rows)

        OutboxRecorder.__call__ = record
        OutboxRecorder._bench_counting = True
    return os.getpid()


def _worker_shard(
    url: str, index: int, count: int, now: str
) -> tuple[dict[str, Any], list[str], float, float]:
    """One shard: its report, the delivery ids it handed to the outbox, its wall and CPU seconds."""
    from sequences.tick import run_shard

    _worker_ready()
    if url not in _ENGINES:
        _ENGINES[url] = create_store_engine(url)
    _SENT.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_shard(
        _ENGINES[url],
        shard=Shard(index, count),
        now=datetime.fromisoformat(now),
        settings=Settings(),
        names=["abandoned_cart"],
    )
    return report.shard_dict(), list(_SENT), time.perf_counter() - wall, time.process_time() - cpu


def _worker_dispose() -> None:
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


# --- the benchmark ---------------------------------------------------------------------------------------


def one_store(
    server_url: str, customers: int, shards: int, workers: int, ticks: int, bench: Any
) -> list[dict[str, Any]]:
    """A fresh store of ``customers``, ticked in ``shards`` by ``workers`` processes (``shards=1``: today's
    tick in this process); one row of figures per tick."""
    rows = []
    with scratch_database(server_url, prefix="omni_bench_shards") as url:
        engine = create_store_engine(url)
        pool = None
        try:
            upgrade_schema(engine)
            bench.generate(engine, customers)
            if shards > 1:
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
                # Started and warm before the clock starts, like a work pool's workers.
                assert len(set(pool.map(_worker_ready, range(workers * 4)))) >= 1
            _worker_ready()  # this process counts what it hands to the outbox too (1 worker)
            shard_figures: list[tuple[float, float]] = []
            worker_sent: list[str] = []
            for offset in (timedelta(0), timedelta(days=1))[:ticks]:
                at = bench.T0 + offset
                shard_figures.clear()
                worker_sent.clear()

                def in_processes(shards: list[Shard], at: datetime = at) -> list[TickReport | BaseException]:
                    futures = [
                        pool.submit(_worker_shard, url, shard.index, shard.count, at.isoformat())
                        for shard in shards
                    ]
                    outcomes: list[TickReport | BaseException] = []
                    for future in futures:
                        report, sent, wall, cpu = future.result()
                        worker_sent.extend(sent)
                        shard_figures.append((wall, cpu))
                        outcomes.append(TickReport.from_shard_dict(report))
                    return outcomes

                _SENT.clear()
                wall, cpu = time.perf_counter(), time.process_time()
                report = run_tick(
                    engine,
                    now=at,
                    settings=Settings(),
                    names=["abandoned_cart"],
                    shards=shards,
                    run_shards=in_processes if shards > 1 else None,
                )
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                steps = report.sequences["abandoned_cart"].steps
                sent = sum(s.sent + s.added + s.removed for s in steps.values())
                handed = Counter(_SENT + worker_sent)
                rows.append(
                    {
                        "tick": "T" if not offset else "T + 1 day",
                        "shards": shards,
                        "workers": workers,
                        "wall": wall,
                        "cpu": cpu,
                        "worker_cpu": sum(c for _, c in shard_figures),
                        "slowest_shard": max((w for w, _ in shard_figures), default=0.0),
                        "sent": sent,
                        "duplicates": sum(n - 1 for n in handed.values() if n > 1)
                        + _outbox_duplicates(engine),
                    }
                )
        finally:
            if pool is not None:
                pool.submit(_worker_dispose).result()
                pool.shutdown()
            engine.dispose()
    return rows


def _outbox_duplicates(engine: Any) -> int:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        rows, distinct = session.execute(
            select(func.count(), func.count(table.c.delivery_id.distinct()))
        ).one()
    return rows - distinct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker processes to compare.")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="Repeat the worker counts alternately.")
    parser.add_argument("--ticks", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()
    server_url = os.environ.get("OMNI_BENCH_DATABASE_URL")
    if not server_url:
        print("Set OMNI_BENCH_DATABASE_URL to a PostgreSQL server: on SQLite a tick is always one shard.")
        return 2
    bench = _store_benchmark()
    print(f"PostgreSQL, {args.customers:,} customers entering abandoned_cart; {os.cpu_count()} cores here")
    print(
        f"  {'round':<6}{'shards':>7}{'workers':>8}  {'tick':<10}{'wall':>8}{'cpu':>8}{'workers cpu':>12}"
        f"{'slowest':>9}{'sent':>9}{'msg/s':>8}{'dupl.':>7}"
    )
    for round_number in range(1, args.rounds + 1):
        configs = [(1, 1)] + [(args.shards, workers) for workers in args.workers]
        for shards, workers in configs:
            for row in one_store(server_url, args.customers, shards, workers, args.ticks, bench):
                print(
                    f"  {round_number:<6}{shards:>7}{workers:>8}  {row['tick']:<10}"
                    f"{row['wall']:>7.1f}s{row['cpu']:>7.1f}s{row['worker_cpu']:>11.1f}s{row['slowest_shard']:>8.1f}s{row['sent']:>9,}"
                    f"{row['sent'] / row['wall']:>8,.0f}{row['duplicates']:>7}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
