"""Statistics are refreshed after an ingest (PostgreSQL plans collapse without them; autovacuum may be
off). Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from profiles.db import (
    refresh_statistics,
    session_scope,
    stale_statistics,
)
from profiles.ingest import ingest_payloads

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
PG_URL = os.environ.get("OMNI_TEST_DATABASE_URL")
TABLES = ("events", "customers", "identities", "carts", "consents")


def payloads(count: int, prefix: str = "m") -> list[dict]:
    out = []
    for i in range(count):
        user = f"{prefix}-u{i}"
        out.append(
            {"type": "identify", "userId": user, "messageId": f"{prefix}i{i}", "traits": {"sms_opt_in": True}}
        )
        out.append(
            {
                "type": "track",
                "userId": user,
                "event": "Product Added",
                "messageId": f"{prefix}p{i}",
                "properties": {"product_id": "p", "price": 5},
            }
        )
    return out


def analyzed(engine) -> dict[str, float]:
    """Rows per table as the statistics count them (tables without statistics are left out)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            exists = conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first()
            if exists is None:
                return {}
            rows: dict[str, float] = {}
            for table, stat in conn.exec_driver_sql("SELECT tbl, stat FROM sqlite_stat1"):
                rows[table] = max(rows.get(table, 0.0), float(stat.split()[0]))
            return rows
        return {
            name: float(reltuples)
            for name, reltuples, last in conn.execute(
                text(
                    "SELECT c.relname, c.reltuples, s.last_analyze FROM pg_class c "
                    "JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.relkind = 'r'"
                )
            )
            if last is not None and reltuples >= 0
        }


def test_an_ingest_into_a_fresh_store_refreshes_the_statistics_of_the_tables_it_changed(fresh_engine):
    assert not set(TABLES) & set(analyzed(fresh_engine))
    result = ingest_payloads(fresh_engine, payloads(300), now=NOW)
    assert result.accepted == 600
    stats = analyzed(fresh_engine)
    assert stats["events"] == pytest.approx(600, rel=0.05)
    assert stats["customers"] == pytest.approx(300, rel=0.05)
    for table in TABLES:
        assert stats.get(table, 0) > 0, table
    # A small ingest after that changes too little to be worth it: nothing is stale.
    with session_scope(fresh_engine) as session:
        assert stale_statistics(session, {"events": 2, "customers": 1}) == []
        assert stale_statistics(session, {"events": 1000}) == ["events"]


def test_refresh_statistics_works_on_empty_tables_and_with_any_bind(fresh_engine):
    refresh_statistics(fresh_engine, ["orders", "rejected_events"])  # empty: no error
    with fresh_engine.connect() as conn:
        refresh_statistics(conn, ["orders"])
        conn.commit()
    with session_scope(fresh_engine) as session:
        refresh_statistics(session, ["orders", "carts"])
    refresh_statistics(fresh_engine, [])
    assert stale_statistics(fresh_engine, {"orders": 0}) == []


def test_a_tick_that_enrolls_and_sends_to_many_refreshes_the_statistics_of_its_tables(fresh_engine):
    """The first tick after a campaign of entrants writes enrollments and deliveries from nothing: the next
    tick must not plan on statistics of empty tables."""
    from audiences import build_audiences
    from omni.core.settings import Settings
    from sequences.tick import run_tick

    shoppers = payloads(300)
    for payload in shoppers:
        if payload["type"] == "identify":
            payload["traits"]["email"] = f"{payload['userId']}@example.org"
        payload["timestamp"] = NOW.isoformat()
    ingest_payloads(fresh_engine, shoppers, now=NOW)
    build_audiences(fresh_engine, ["cart_abandoners"], now=NOW.replace(hour=15))
    assert not {"enrollments", "deliveries"} & set(analyzed(fresh_engine))
    report = run_tick(
        fresh_engine,
        now=NOW.replace(hour=15),
        settings=Settings(),
        names=["abandoned_cart"],
        sleep=lambda _s: None,
    )
    entered = report.sequences["abandoned_cart"]
    assert entered.enrolled + entered.held_out == 300
    stats = analyzed(fresh_engine)
    assert stats["enrollments"] == pytest.approx(300, rel=0.05)
    assert stats["deliveries"] > 0


def test_a_build_refreshes_tables_loaded_without_omni(fresh_engine):
    """Rows that arrived with plain SQL (a restore, a bulk load) have no statistics: the next audience
    build finds that and refreshes them before it plans; a second build finds nothing stale."""
    from audiences import build_audiences
    from profiles.db import refresh_stale_statistics

    with fresh_engine.begin() as conn:
        for i in range(1, 301):
            conn.execute(
                text(
                    "INSERT INTO customers (id, email, traits, created_at, updated_at) "
                    "VALUES (:i, :email, '{}', :at, :at)"
                ),
                {"i": i, "email": f"c{i}@example.org", "at": NOW},
            )
    assert "customers" not in analyzed(fresh_engine)
    build_audiences(fresh_engine, ["lapsed_buyers"], now=NOW)
    assert analyzed(fresh_engine)["customers"] == pytest.approx(300, rel=0.05)
    with session_scope(fresh_engine) as session:
        assert refresh_stale_statistics(session, ["customers", "events"]) == []
