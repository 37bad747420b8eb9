"""Parse workers: JSON lines prepared in another process are stored exactly as when prepared in-process.

The input mixes everything a batch can hold — bad lines, rejections, duplicates within and across
chunks, identifies that merge customers, shuffled commerce, consent — over many small chunks, so
several go through the worker process. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from datetime import UTC, datetime

import pytest
from sqlalchemy import delete, select
from sqlmodel import SQLModel

from profiles.db import session_scope
from profiles.ingest import IngestOptions, ingest_files
from profiles.models import Cart, Consent, Customer, Event, Identity, Order, RejectedEvent
from profiles.reader import LineChunk, iter_input

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def feed_lines() -> list[str]:
    lines = []
    for c in range(12):
        at = f"2026-05-{10 + c % 5:02d}T10:00:00Z"
        lines.append(json.dumps({"type": "page", "anonymousId": f"a{c}", "name": "Home", "timestamp": at}))
        added = json.dumps(
            {
                "type": "track",
                "anonymousId": f"a{c}",
                "event": "Product Added",
                "properties": {"product_id": f"p{c}", "price": 10 + c, "quantity": 1},
                "timestamp": f"2026-05-{10 + c % 5:02d}T10:05:00Z",
                "messageId": f"add-{c}",
            }
        )
        lines.append(added)
        if c % 3 == 0:
            lines.append("{not json")
            lines.append(json.dumps({"type": "track", "userId": f"u{c}"}))  # no event name
        lines.append(
            json.dumps(
                {
                    "type": "identify",
                    "userId": f"u{c}",
                    "anonymousId": f"a{c}",
                    "traits": {"email": f"C{c}@Example.org ", "sms_opt_in": c % 2 == 0},
                    "timestamp": at,
                }
            )
        )
        if c % 4 == 0:  # a purchase in store, before the identify arrived: converts the cart
            lines.append(
                json.dumps(
                    {
                        "type": "track",
                        "userId": f"u{c}",
                        "event": "Order Completed",
                        "properties": {"order_id": f"o{c}", "total": 25},
                        "context": {"channel": "store"},
                        "timestamp": f"2026-05-{10 + c % 5:02d}T11:00:00Z",
                    }
                )
            )
        # Its message id again, later, with other content: a duplicate; the first one stays.
        lines.append(added.replace('"quantity": 1', '"quantity": 5'))
    return lines


def snapshot(engine) -> dict:
    """The store's content, customers named by their identities (ids differ between runs)."""
    with session_scope(engine) as s:
        names: dict[int, set[str]] = defaultdict(set)
        for customer_id, value in s.execute(select(Identity.customer_id, Identity.value)):
            names[customer_id].add(value)

        def who(customer_id: int) -> tuple[str, ...]:
            return tuple(sorted(names[customer_id]))

        return {
            "events": sorted(
                (e.message_id, who(e.customer_id), e.type, e.name, e.channel, str(e.occurred_at))
                for e in s.execute(select(Event)).scalars()
            ),
            "rejected": sorted(
                (r.source, r.reason, r.raw) for r in s.execute(select(RejectedEvent)).scalars()
            ),
            "customers": sorted(
                (who(c.id), c.email, c.merged_into is None)
                for c in s.execute(select(Customer)).scalars()
                if c.merged_into is None
            ),
            "carts": sorted(
                (who(c.customer_id), c.status, c.value, c.order_id) for c in s.execute(select(Cart)).scalars()
            ),
            "orders": sorted(
                (o.order_id, who(o.customer_id), o.fulfillment, o.total)
                for o in s.execute(select(Order)).scalars()
            ),
            "consents": sorted(
                (who(c.customer_id), c.channel, c.status) for c in s.execute(select(Consent)).scalars()
            ),
        }


def empty(engine) -> None:
    with session_scope(engine) as s:
        for table in reversed(SQLModel.metadata.sorted_tables):
            s.execute(delete(table))


def test_parse_workers_store_exactly_what_in_process_parsing_stores(engine):
    data = ("\n".join(feed_lines()) + "\n").encode()
    outcomes = []
    for workers in (0, 1):
        options = IngestOptions(batch_size=4, parse_workers=workers)
        result = ingest_files(engine, ["-"], options=options, now=NOW, stdin=io.BytesIO(data))
        outcomes.append((result.as_dict(), result.samples, snapshot(engine)))
        empty(engine)
    (counts, samples, store), (worker_counts, worker_samples, worker_store) = outcomes
    assert worker_counts == counts
    assert worker_samples == samples
    assert worker_store == store
    # The feed is what it says: rejections, duplicates, merges, a store purchase converting a cart.
    assert counts["rejected"] == 8 and counts["duplicates"] == 12
    assert counts["accepted"] + counts["duplicates"] + counts["rejected"] == len(feed_lines())
    assert any(source == "<stdin>:3" and "invalid JSON" in reason for source, reason, _ in store["rejected"])
    assert len(store["customers"]) == 12
    assert ("o0", ("a0", "c0@example.org", "u0"), "in_store", 25.0) in store["orders"]
    assert any(cart[1] == "converted" and cart[3] == "o4" for cart in store["carts"])
    assert (("a1", "c1@example.org", "u1"), "open", 11.0, None) in store["carts"]


@pytest.mark.parametrize(
    ("lines", "chunk_lines", "chunk_bytes", "sizes"),
    [(10, 4, 1 << 20, [4, 4, 2]), (10, 100, 60, [2, 2, 2, 2, 2])],
)
def test_json_lines_come_out_in_chunks_of_lines_and_bytes(lines, chunk_lines, chunk_bytes, sizes):
    text = "".join(json.dumps({"type": "page", "anonymousId": f"a{i}"}) + "\n\n" for i in range(lines))
    chunks = list(
        iter_input(io.BytesIO(text.encode()), "f", chunk_lines=chunk_lines, chunk_bytes=chunk_bytes)
    )
    assert all(isinstance(chunk, LineChunk) for chunk in chunks)
    assert [len(chunk.lines) for chunk in chunks] == sizes
    # Line numbers count the blank lines between payloads.
    assert [n for chunk in chunks for n, _ in chunk.lines] == list(range(1, 2 * lines, 2))
