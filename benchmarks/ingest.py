"""Benchmark: ingest N synthetic Segment events into a fresh SQLite store.

Prints events/s and peak memory of Omni's ingestion beside two baselines measured in the same run:

- the floor: plain ``sqlite3`` ``executemany`` inserting the same raw payload lines into a single table
  without indexes;
- the events table alone: plain ``sqlite3`` ``executemany`` of the same events, already converted to
  rows (no parsing, validation, identities, carts or orders), into Omni's migrated ``events`` table
  with its indexes (the unique message id that catches duplicates across runs, and the two the
  audiences read), in transactions as large as Omni's. It shows what the schema itself costs.

Each side runs in a child process of its own, so each peak memory figure is that side's alone.

    python benchmarks/ingest.py                       # 1,000,000 events over 100,000 customers
    python benchmarks/ingest.py --events 100000 --customers 10000

Targets (issue 2): >= 20,000 events/s, within 3x of the floor, peak memory under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni.core.channels import Touchpoint  # noqa: E402

PRODUCTS = [(f"sku-{i}", f"Product {i}", round(5 + (i * 7.3) % 95, 2)) for i in range(200)]
# The touchpoints of the generated events: where customers act on their own (no message channels).
OWN = (Touchpoint.WEB, Touchpoint.APP, Touchpoint.STORE, Touchpoint.CALL_CENTER, Touchpoint.CHAT)
CHANNELS = [touchpoint.value for touchpoint in OWN]
PAGES = ["Home", "Category", "Product", "Search", "Cart"]


def generate(path: Path, events: int, customers: int, seed: int = 7) -> None:
    """Write ``events`` JSON lines over ``customers`` customers, interleaved across customers the way a
    real feed is: round r emits the r-th event of every customer, in a shuffled customer order.

    Every customer has a phone number of their own. One customer in fifty also browses on a second
    device first (an anonymous id of its own, so a customer of its own), and a later identify from that
    device merges the two: identity resolution and merges are part of what is measured.
    """
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    per_customer = max(1, events // customers)
    written = 0
    order = list(range(customers))
    with path.open("w") as out:
        for step in range(per_customer):
            rng.shuffle(order)
            for c in order:
                if written >= events:
                    return
                at = (start + timedelta(days=step * 3 + rng.random() * 3)).isoformat().replace("+00:00", "Z")
                anon = f"anon-{c}"
                user = f"user-{c}"
                mid = f"bench-{c}-{step}"
                channel = CHANNELS[rng.randrange(len(CHANNELS))] if step > 2 else "web"
                second_device = c % 50 == 0
                if step == 0:
                    payload = {"type": "page", "anonymousId": anon, "name": "Home"}
                elif step == 2 and second_device:
                    payload = {"type": "page", "anonymousId": f"{anon}-tablet", "name": "Home"}
                elif step == 3 and second_device:
                    payload = {"type": "identify", "userId": user, "anonymousId": f"{anon}-tablet"}
                elif step == 1:
                    payload = {
                        "type": "identify",
                        "userId": user,
                        "anonymousId": anon,
                        "traits": {
                            "email": f"customer{c}@example.org",
                            "first_name": f"Name{c}",
                            "phone": f"+1415{2_000_000 + c:07d}",
                            "sms_opt_in": c % 3 == 0,
                        },
                    }
                else:
                    roll = rng.random()
                    who = {"userId": user} if rng.random() < 0.7 else {"anonymousId": anon}
                    if roll < 0.45:
                        payload = {"type": "page", **who, "name": PAGES[rng.randrange(len(PAGES))]}
                    elif roll < 0.75:
                        sku, name, price = PRODUCTS[rng.randrange(len(PRODUCTS))]
                        payload = {
                            "type": "track",
                            **who,
                            "event": "Product Added",
                            "properties": {"product_id": sku, "name": name, "price": price, "quantity": 1},
                        }
                    elif roll < 0.82:
                        sku, _, _ = PRODUCTS[rng.randrange(len(PRODUCTS))]
                        payload = {
                            "type": "track",
                            **who,
                            "event": "Product Removed",
                            "properties": {"product_id": sku, "quantity": 1},
                        }
                    elif roll < 0.9:
                        payload = {
                            "type": "track",
                            **who,
                            "event": "Order Completed",
                            "properties": {
                                "order_id": f"o-{c}-{step}",
                                "total": round(rng.random() * 200, 2),
                            },
                        }
                    else:
                        payload = {
                            "type": "track",
                            **who,
                            "event": "Product Viewed",
                            "properties": {"product_id": PRODUCTS[rng.randrange(len(PRODUCTS))][0]},
                        }
                payload.update(messageId=mid, timestamp=at, context={"channel": channel})
                out.write(json.dumps(payload, separators=(",", ":")) + "\n")
                written += 1


def run_floor(path: Path, db: Path) -> dict:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE raw_events (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    started = time.perf_counter()
    count = 0
    with path.open() as source:
        batch: list[tuple[str]] = []
        for line in source:
            batch.append((line.rstrip("\n"),))
            if len(batch) >= 5000:
                conn.executemany("INSERT INTO raw_events (payload) VALUES (?)", batch)
                conn.commit()
                count += len(batch)
                batch = []
        if batch:
            conn.executemany("INSERT INTO raw_events (payload) VALUES (?)", batch)
            conn.commit()
            count += len(batch)
    elapsed = time.perf_counter() - started
    conn.close()
    return {"events": count, "seconds": elapsed}


def run_events_table(path: Path, db: Path) -> dict:
    from profiles.db import create_store_engine, upgrade_schema

    engine = create_store_engine(f"sqlite:///{db}")
    upgrade_schema(engine)
    engine.dispose()
    received = "2026-12-01 00:00:00.000000"

    def as_row(line: str) -> tuple:
        p = json.loads(line)
        who = p.get("userId") or p.get("anonymousId")
        at = datetime.fromisoformat(p["timestamp"]).strftime("%Y-%m-%d %H:%M:%S.%f")
        return (
            p["messageId"],
            int(who.split("-")[1]),
            p["type"],
            p.get("event") or p.get("name"),
            p["context"]["channel"],
            json.dumps(p.get("properties") or p.get("traits") or {}),
            json.dumps(p["context"]),
            p.get("userId"),
            p.get("anonymousId"),
            at,
            received,
        )

    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA cache_size=-65536")
    sql = (
        "INSERT INTO events (message_id, customer_id, type, name, channel, properties, context, user_id,"
        " anonymous_id, occurred_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    from omni.core.settings import get_settings

    per_transaction = get_settings().ingest_transaction_size
    count, elapsed = 0, 0.0
    with path.open() as source:
        while True:
            # Rows are converted before the clock starts: only the inserts are timed.
            rows = [as_row(line) for _, line in zip(range(per_transaction), source, strict=False)]
            if not rows:
                break
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
            elapsed += time.perf_counter() - started
            count += len(rows)
    conn.close()
    return {"events": count, "seconds": elapsed}


def run_omni(path: Path, db: Path) -> dict:
    from omni.core.settings import get_settings
    from profiles.db import create_store_engine, upgrade_schema
    from profiles.ingest import IngestOptions, ingest_files

    engine = create_store_engine(f"sqlite:///{db}")
    upgrade_schema(engine)
    options = IngestOptions.of(get_settings())  # OMNI_INGEST_* as the CLI reads them
    started, cpu_started = time.perf_counter(), time.process_time()
    result = ingest_files(engine, [str(path)], options=options, now=datetime(2026, 12, 1, tzinfo=UTC))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "events": result.read,
        **result.as_dict(),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "worker_cpu_seconds": children.ru_utime + children.ru_stime,
        "worker_peak_mb": children.ru_maxrss / 1024,
    }


def child(phase: str, path: Path, db: Path) -> None:
    runs = {"floor": run_floor, "events-table": run_events_table, "omni": run_omni}
    result = runs[phase](path, db)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--phase", choices=["floor", "events-table", "omni"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        child(args.phase, args.input, args.db)
        return

    with tempfile.TemporaryDirectory(prefix="omni-bench-") as tmp:
        tmpdir = Path(tmp)
        data = tmpdir / "events.jsonl"
        print(f"generating {args.events:,} events over {args.customers:,} customers ...", flush=True)
        generate(data, args.events, args.customers)
        size_mb = data.stat().st_size / 1e6
        print(f"input: {size_mb:,.1f} MB of JSON lines", flush=True)
        figures = {}
        for phase in ("floor", "events-table", "omni"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--phase",
                    phase,
                    "--input",
                    str(data),
                    "--db",
                    str(tmpdir / f"{phase}.db"),
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            figures[phase] = json.loads(out.stdout.strip().splitlines()[-1])
        floor, table, omni = figures["floor"], figures["events-table"], figures["omni"]
        omni_rate = omni["events"] / omni["seconds"]
        ratio = omni["seconds"] / floor["seconds"]
        print()
        print(f"{'':44}{'seconds':>10}{'events/s':>12}{'peak MB':>10}")
        for label, side in (
            ("sqlite3 executemany, raw lines (floor)", floor),
            ("sqlite3 executemany, events table alone", table),
            ("omni ingest", omni),
        ):
            rate = side["events"] / side["seconds"]
            print(f"{label:44}{side['seconds']:>10.1f}{rate:>12,.0f}{side['peak_mb']:>10.0f}")
        print()
        counts = ", ".join(f"{key} {omni[key]:,}" for key in ("accepted", "duplicates", "rejected"))
        print(f"omni: {counts}")
        print(f"ratio to floor: {ratio:.1f}x (target <= 3x)")
        schema = table["seconds"] / floor["seconds"]
        print(f"the events table with its indexes alone: {schema:.1f}x the floor")
        print(f"events/s: {omni_rate:,.0f} (target >= 20,000)")
        print(f"peak memory: {omni['peak_mb']:.0f} MB (target < 300 MB)", end="")
        print(f"; parse worker: {omni['worker_peak_mb']:.0f} MB" if omni["worker_peak_mb"] else "")
        print(
            f"cpu: {omni['cpu_seconds']:.1f} s storing, "
            f"{omni['worker_cpu_seconds']:.1f} s in the parse worker"
            f" ({omni['events'] / omni['cpu_seconds']:,.0f} events per cpu-second of the storing process)"
        )


if __name__ == "__main__":
    main()
