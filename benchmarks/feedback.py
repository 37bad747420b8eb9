"""Benchmark: SendGrid's Event Webhook on `omni serve` — a signed post of N events, SQLite and PostgreSQL.

    .venv/bin/python benchmarks/feedback.py                           # SQLite (a temporary file)
    OMNI_BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        .venv/bin/python benchmarks/feedback.py                       # and PostgreSQL, side by side

For each database: a fresh migrated store (SQLite in a temporary directory; PostgreSQL in a scratch
database this script creates and drops) with ``--customers`` customers (default 2,000), one sent email
each, and `omni serve`'s app under uvicorn in a thread. Then, for each post size (``--sizes``, default
1,000 and 5,000 events): a post of events over those emails signed with a real ECDSA P-256 key, in
SendGrid's mix (processed 20 %, delivered 30 %, open 25 %, click 10 %, deferred 5 %, hard bounce 3 %,
dropped 1 %, unsubscribe 2 %, spamreport 1 %, an unknown delivery id 3 %), posted ``--repeat`` times
(each post new events), and the same post again (all duplicates). Printed: seconds per post (best and
median) and events/s.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omni.core.settings import Settings  # noqa: E402
from omni.server.app import create_app  # noqa: E402
from profiles.db import create_store_engine, scratch_database, session_scope, upgrade_schema  # noqa: E402
from profiles.ingest import ingest_payloads  # noqa: E402
from profiles.models import Customer, Delivery  # noqa: E402

NOW = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
MIX = [
    ("processed", 20),
    ("delivered", 30),
    ("open", 25),
    ("click", 10),
    ("deferred", 5),
    ("bounce", 3),
    ("dropped", 1),
    ("unsubscribe", 2),
    ("spamreport", 1),
    ("unknown", 3),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Key:
    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def sign(self, body: bytes, timestamp: str) -> str:
        return base64.b64encode(
            self.private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        ).decode()


def seed(engine, customers: int) -> list[tuple[str, str]]:
    """``customers`` customers with an email each and a sent delivery; returns (delivery key, email)."""
    payloads = [
        {
            "type": "identify",
            "userId": f"u{n}",
            "messageId": f"id-{n}",
            "traits": {"email": f"c{n}@example.org"},
        }
        for n in range(customers)
    ]
    ingest_payloads(engine, payloads, now=NOW - timedelta(days=1))
    with session_scope(engine) as session:
        table = Customer.__table__
        ids = dict(session.execute(table.select().with_only_columns(table.c.email, table.c.id)).all())
        rows = []
        for n in range(customers):
            email = f"c{n}@example.org"
            rows.append(
                {
                    "dedupe_key": f"campaign:bench:{n}",
                    "step_id": "send",
                    "campaign": "bench",
                    "customer_id": ids[email],
                    "channel": "email",
                    "connector": "sendgrid",
                    "template": "email/x",
                    "status": "sent",
                    "attempts": 1,
                    "marketing": True,
                    "provider_message_id": f"msg{n:06d}SGbench",
                    "created_at": NOW - timedelta(hours=1),
                    "updated_at": NOW - timedelta(hours=1),
                    "sent_at": NOW - timedelta(hours=1),
                }
            )
        session.execute(insert(Delivery.__table__), rows)
    return [(f"campaign:bench:{n}", f"c{n}@example.org") for n in range(customers)]


class Posts:
    def __init__(self, deliveries: list[tuple[str, str]], seed_: int = 7) -> None:
        self.deliveries = deliveries
        self.random = random.Random(seed_)
        self.n = 0
        self.kinds = [kind for kind, weight in MIX for _ in range(weight)]

    def batch(self, size: int) -> list[dict]:
        events = []
        for _ in range(size):
            self.n += 1
            kind = self.random.choice(self.kinds)
            key, email = self.random.choice(self.deliveries)
            event = {
                "email": email,
                "timestamp": int((NOW - timedelta(minutes=30)).timestamp()) + self.n % 600,
                "event": kind,
                "sg_event_id": f"bench-{self.n}",
                "sg_message_id": "msg.filter0001.1.0",
                "omni_delivery_id": key,
            }
            if kind == "unknown":
                event.update(event="open", omni_delivery_id=f"campaign:gone:{self.n}")
            elif kind == "bounce":
                event.update(type="bounce", reason="550 5.1.1 user unknown")
            elif kind == "dropped":
                event.update(reason="Bounced Address")
            elif kind == "click":
                event["url"] = "https://shop.example.com/cart?utm_source=omni"
            elif kind == "deferred":
                event["response"] = "421 try again later"
            events.append(event)
        return events


@contextmanager
def serving(engine, key: Key, url: str):
    settings = Settings(database_url=url, sendgrid_webhook_public_key=SecretStr(key.public_b64))
    app = create_app(settings, engine=engine, background=False)
    app.state.clock = lambda: NOW
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code in (200, 503):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post(client: httpx.Client, base: str, key: Key, events: list[dict]) -> tuple[float, dict]:
    body = json.dumps(events).encode()
    timestamp = str(int(NOW.timestamp()))
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "X-Twilio-Email-Event-Webhook-Signature": key.sign(body, timestamp),
    }
    started = time.perf_counter()
    answer = client.post(f"{base}/webhooks/sendgrid", content=body, headers=headers, timeout=300)
    elapsed = time.perf_counter() - started
    answer.raise_for_status()
    return elapsed, answer.json()


def run(label: str, url: str, args) -> None:
    engine = create_store_engine(url)
    upgrade_schema(engine)
    deliveries = seed(engine, args.customers)
    key = Key()
    posts = Posts(deliveries)
    with serving(engine, key, url) as base, httpx.Client() as client:
        post(client, base, key, posts.batch(10))  # warm up
        for size in args.sizes:
            times, last = [], None
            for _ in range(args.repeat):
                last = posts.batch(size)
                elapsed, answer = post(client, base, key, last)
                times.append(elapsed)
            again, answer = post(client, base, key, last)
            assert answer["duplicates"] == size, answer
            best, median = min(times), statistics.median(times)
            print(
                f"{label:10} {size:>6} events: best {best:6.3f} s, median {median:6.3f} s "
                f"({size / median:8.0f} events/s); the same post again {again:6.3f} s",
                flush=True,
            )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        run("sqlite", f"sqlite:///{folder}/bench.db", args)
        pg = os.environ.get("OMNI_BENCH_DATABASE_URL")
        if pg:
            run("postgresql", stack.enter_context(scratch_database(pg, prefix="omni_bench")), args)


if __name__ == "__main__":
    main()
