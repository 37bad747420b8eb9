"""The bulk paths ingest writes through (``profiles.bulk``), on SQLite and PostgreSQL: COPY and one
``UPDATE ... FROM unnest`` on PostgreSQL write what ``executemany`` writes on SQLite; a batch costs the
same number of statements whatever its size; the statistics are refreshed during a long run, not only
at its end."""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from contextlib import closing
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, text

from profiles.bulk import insert_rows, insert_values, timestamp_param, update_rows
from profiles.db import create_store_engine, scratch_database, session_scope, upgrade_schema
from profiles.ingest import IngestOptions, ingest_items, ingest_payloads
from profiles.models import Cart, Customer, Event
from profiles.reader import RawItem

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
PG_URL = os.environ.get("OMNI_TEST_DATABASE_URL")
# Text COPY's own escapes, quotes, JSON escapes and more than the Basic Multilingual Plane.
AWKWARD = 'tab\there, line\nfeed, back\\slash, "quotes", \\N, \\., café, 🛒'


def customer(engine) -> int:
    with session_scope(engine) as session:
        row = Customer(traits={}, created_at=NOW, updated_at=NOW)
        session.add(row)
        session.flush()
        return row.id


def test_inserted_rows_read_back_as_written(engine):
    customer_id = customer(engine)
    lines = [["a", {"name": AWKWARD, "quantity": 1.0}]]
    carts = [
        {
            "customer_id": customer_id,
            "status": "open",
            "cart_id": AWKWARD,
            "items": [{"name": AWKWARD, "price": 2}],
            "item_count": 1,
            "value": 0,  # an int among floats
            "currency": None,
            "started_at": NOW,
            "updated_at": NOW + timedelta(microseconds=1),
            "converted_at": None,
            "order_id": None,
            "lines": lines,
        },
        {
            "customer_id": customer_id,
            "status": "converted",
            "cart_id": None,
            "items": [],
            "item_count": 0,
            "value": 2.5,
            "currency": "EUR",
            "started_at": NOW,
            "updated_at": NOW,
            "converted_at": NOW,
            "order_id": "o1",
            "lines": None,
        },
    ]
    with session_scope(engine) as session:
        insert_rows(session, Cart.__table__, carts)
    with session_scope(engine) as session:
        stored = session.execute(select(Cart).order_by(Cart.id)).scalars().all()
        assert [(c.cart_id, c.items, c.value, c.lines, c.updated_at) for c in stored] == [
            (AWKWARD, [{"name": AWKWARD, "price": 2}], 0.0, lines, NOW + timedelta(microseconds=1)),
            (None, [], 2.5, None, NOW),
        ]


def test_event_rows_in_driver_form_read_back_as_written(engine):
    customer_id = customer(engine)
    stamp = timestamp_param(engine.dialect.name)
    columns = ("message_id", "customer_id", "type", "name", "channel", "properties", "context", "occurred_at")
    values = [
        (f"m{i}", customer_id, "track", AWKWARD, "web", '{"k": "\\t\\n\\\\"}', "{}", stamp(NOW))
        for i in range(3)
    ]
    received = stamp(NOW)
    with session_scope(engine) as session:
        insert_values(
            session, Event.__table__, (*columns, "received_at"), [(*row, received) for row in values]
        )
    with session_scope(engine) as session:
        stored = session.execute(select(Event).order_by(Event.message_id)).scalars().all()
    assert [(e.message_id, e.name, e.properties, e.occurred_at) for e in stored] == [
        (f"m{i}", AWKWARD, {"k": "\t\n\\"}, NOW) for i in range(3)
    ]


def test_updated_rows_take_the_last_values_given_for_a_key(engine):
    ids = [customer(engine) for _ in range(3)]
    later = NOW + timedelta(hours=1)
    updates = [
        {
            "id": ids[0],
            "email": "first@example.org",
            "traits": {"a": 1},
            "traits_at": None,
            "updated_at": later,
        },
        {"id": ids[1], "email": None, "traits": {"b": AWKWARD}, "traits_at": later, "updated_at": later},
        # The same customer again: the last one given wins, as when rows are updated one by one.
        {"id": ids[0], "email": "second@example.org", "traits": {}, "traits_at": later, "updated_at": later},
    ]
    with session_scope(engine) as session:
        update_rows(session, Customer.__table__, "id", updates)
    with session_scope(engine) as session:
        stored = {c.id: c for c in session.execute(select(Customer)).scalars()}
    assert (stored[ids[0]].email, stored[ids[0]].traits, stored[ids[0]].traits_at) == (
        "second@example.org",
        {},
        later,
    )
    assert (stored[ids[1]].email, stored[ids[1]].traits) == (None, {"b": AWKWARD})
    assert (stored[ids[2]].traits, stored[ids[2]].updated_at) == ({}, NOW)  # not given: unchanged


def shoppers(count: int, prefix: str) -> list[dict]:
    """New customers, each an identify, a product added and an order: every table a batch writes."""
    out = []
    for i in range(count):
        user = f"{prefix}{i}"
        at = (NOW - timedelta(hours=1)).isoformat()
        out += [
            {
                "type": "identify",
                "userId": user,
                "messageId": f"{user}-i",
                "timestamp": at,
                "traits": {"email": f"{user}@example.org", "sms_opt_in": True},
                "context": {"timezone": "Europe/Lisbon"},
            },
            {
                "type": "track",
                "userId": user,
                "event": "Product Added",
                "messageId": f"{user}-p",
                "timestamp": at,
                "properties": {"product_id": "tee", "price": 20, "quantity": 1},
            },
            {
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "messageId": f"{user}-o",
                "timestamp": NOW.isoformat(),
                "properties": {"order_id": f"{user}-o", "total": 20},
            },
        ]
    return out


class StatementCounter:
    """Statements a PostgreSQL connection sends: each execute and COPY, and each row of an executemany
    (which the server executes one by one)."""

    def __init__(self, engine) -> None:
        import psycopg

        counts: Counter[str] = Counter()
        self.counts = counts

        class Counting(psycopg.Cursor):
            def execute(self, query, params=None, **kwargs):
                counts["execute"] += 1
                return super().execute(query, params, **kwargs)

            def executemany(self, query, params_seq, **kwargs):
                params_seq = list(params_seq)
                counts["executemany rows"] += len(params_seq)
                return super().executemany(query, params_seq, **kwargs)

            def copy(self, statement, params=None, **kwargs):
                counts["copy"] += 1
                return super().copy(statement, params, **kwargs)

        @event.listens_for(engine, "connect")
        def count_statements(dbapi_connection, _record):
            dbapi_connection.cursor_factory = Counting

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.mark.postgresql
def test_a_batch_costs_the_same_statements_on_postgresql_whatever_its_size(tmp_path):
    """Ten times the customers in a batch, not ten times the statements: events, identities, carts and
    orders are copied, profiles and carts updated in one statement each."""
    if not PG_URL:
        pytest.skip("OMNI_TEST_DATABASE_URL is not set")
    statements = []
    for size in (20, 200):
        with scratch_database(PG_URL, prefix="omni_test") as url:
            engine = create_store_engine(url)
            upgrade_schema(engine)
            engine.dispose()
            counter = StatementCounter(engine)
            ingest_payloads(engine, shoppers(size, "first"), now=NOW)  # new carts and orders
            counter.counts.clear()
            # The same customers again: found, their profiles updated, their open carts carried forward.
            again = [p for p in shoppers(size, "first") if p["type"] != "track" or "Added" in p["event"]]
            for payload in again:
                payload["messageId"] += "-again"
                payload["timestamp"] = NOW.isoformat()
                # Consents changed on known customers are still updated a row at a time
                # (profiles.consent.apply_consents): left out here.
                payload.get("traits", {}).pop("sms_opt_in", None)
            result = ingest_payloads(engine, again, now=NOW + timedelta(minutes=1))
            assert result.accepted == 2 * size
            statements.append(dict(counter.counts))
            engine.dispose()
    assert statements[0] == statements[1]
    assert "executemany rows" not in statements[1]


def lines_of(payloads: list[dict]) -> list[RawItem]:
    import orjson

    items = []
    for index, payload in enumerate(payloads):
        raw = orjson.dumps(payload).decode()
        items.append(RawItem(f"feed:{index + 1}", raw, len(raw), payload))
    return items


def analyzed_tables(engine) -> set[str]:
    """The tables with statistics, read beside a running ingest (on SQLite, by a plain reader: the
    engine's connections begin by taking the write lock the ingest holds)."""
    if engine.dialect.name == "sqlite":
        with closing(sqlite3.connect(engine.url.database)) as conn:
            if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone() is None:
                return set()
            return {row[0] for row in conn.execute("SELECT DISTINCT tbl FROM sqlite_stat1")}
    with engine.connect() as conn:
        return {
            row[0]
            for row in conn.execute(
                text("SELECT DISTINCT tablename FROM pg_stats WHERE schemaname = current_schema()")
            )
        }


def test_a_long_run_refreshes_the_statistics_between_transactions(fresh_engine):
    """The lookups of the later batches of a run plan on statistics of what the earlier ones wrote (on a
    server with autovacuum off nothing else takes them), and only a few times a run."""
    seen: list[set[str]] = []
    options = IngestOptions(batch_size=60, transaction_size=60, parse_workers=0)
    result = ingest_items(
        fresh_engine,
        lines_of(shoppers(160, "long")),  # 480 payloads: 8 transactions
        options=options,
        now=NOW,
        on_batch=lambda _result: seen.append(analyzed_tables(fresh_engine)),
    )
    assert result.accepted == 480
    assert not {"events", "customers", "identities"} & seen[0]
    # Checked after the first transaction, then each time the payloads read double.
    assert {"events", "customers", "identities", "carts", "orders"} <= seen[1]
    assert {"events", "customers", "identities"} <= analyzed_tables(fresh_engine)


def test_the_timezone_names_remembered_are_bounded_whatever_the_feed_holds():
    """A feed can carry any number of different wrong timezone names: validating them keeps a fixed
    number in memory, not one per name."""
    from profiles.segment import _is_zone, valid_timezone

    for i in range(5000):
        assert valid_timezone(f"Mars/Crater_{i}") is None
    assert valid_timezone("Europe/Lisbon") == "Europe/Lisbon"
    assert _is_zone.cache_info().currsize <= _is_zone.cache_info().maxsize == 4096
