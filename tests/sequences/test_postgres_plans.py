"""The statement forms of a tick's batches on each database: on PostgreSQL a batch's rows travel as one
JSON parameter (``json_to_recordset``) and lists as one array literal, and read back exactly what was
written; the planner joins the rows to the table by key even on statistics from when it was empty; the
outbox records a batch in one statement; enrollment refreshes the statistics it made stale."""

from __future__ import annotations

import json
from datetime import timedelta, timezone

import pytest
from journey_kit import T0, customer, delivery, seed_stores
from sqlalchemy import event, select

from profiles.db import pg_array_literal, refresh_statistics, session_scope, stale_statistics
from profiles.models import Delivery, Enrollment, OutboxMessage
from profiles.outbox import OutboxRecorder
from sequences.definitions import parse_sequence
from sequences.dispatch import due_batch
from sequences.enrollment import enroll
from sequences.reports import TickReport
from sequences.shards import Shard
from sequences.sql import Driver
from sequences.walking import due_enrollments

# Text that must survive any quoting: quotes, backslashes, JSON and array-literal punctuation, unicode.
ODD = 'a "quoted" \\ back,slash {braces} [x] \' é 😀\nnew line\ttab NULL'


def _statements(engine) -> list[str]:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_: seen.append(sql))
    return seen


def test_batch_statements_per_database_round_trip_odd_values(engine):
    seed_stores(engine)
    customer(engine, 1)
    statements = _statements(engine)
    later = (T0 + timedelta(hours=3, microseconds=7)).astimezone(timezone(timedelta(hours=-5)))
    with session_scope(engine) as session:
        sql = Driver(session)
        assert sql.insert_ignore(Delivery.__table__, [delivery(ODD, 1, error=ODD), delivery("b", 1)]) == 2
    pg = engine.dialect.name == "postgresql"
    written = [s for s in statements if s.startswith('INSERT INTO "deliveries"')]
    assert len(written) == 1 and ("json_to_recordset" in written[0]) == pg
    with session_scope(engine) as session:
        ids = dict(session.execute(select(Delivery.dedupe_key, Delivery.id)).all())
        sql = Driver(session)
        sql.update_many(
            Delivery.__table__, ("id",), ("status", "sent_at", "error"), [(ids[ODD], "sent", later, ODD)]
        )
        among, params = sql.in_([ids[ODD], ids["b"]])
        both = sql.rows(
            f"SELECT dedupe_key, error, sent_at FROM deliveries WHERE id {among} ORDER BY id", params
        )
        among, params = sql.in_([ODD, "missing", None], "text[]")
        by_key = sql.rows(f"SELECT dedupe_key FROM deliveries WHERE dedupe_key {among}", params)
        listed = session.execute(select(Delivery.dedupe_key).where(sql.among(Delivery.id, [ids["b"]]))).all()
    assert [(k, e) for k, e, _ in both] == [(ODD, ODD), ("b", None)]
    assert Driver.read_ts(both[0][2]) == later
    assert by_key == [(ODD,)] and listed == [("b",)]
    updates = [s for s in statements if s.startswith('UPDATE "deliveries"')]
    assert len(updates) == 1 and ("json_to_recordset" in updates[0]) == pg


def test_array_literal_quotes_what_the_server_parses():
    assert pg_array_literal([3, 1, 2]) == "{3,1,2}"
    assert pg_array_literal(["a", None, 'b"\\']) == '{"a",NULL,"b\\"\\\\"}'
    assert pg_array_literal([]) == "{}"
    with pytest.raises(TypeError):
        pg_array_literal([1.5])


def test_rows_join_the_table_by_key_on_statistics_from_when_it_was_empty(engine):
    """The advance of parked enrollments (``where``: still parked) on statistics taken when the table was
    empty: a plain condition made PostgreSQL expect one parked enrollment and rescan the JSON rows for
    every row of the table. The table side must never be the outer side of a nested loop over the rows."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL plan")
    refresh_statistics(engine, ["enrollments"])  # empty
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO customers (id, traits, created_at, updated_at) "
            "SELECT i, '{}', now(), now() FROM generate_series(1, 30000) AS g(i)"
        )
        conn.exec_driver_sql(
            "INSERT INTO enrollments (sequence, customer_id, status, step_index, next_run_at, enrolled_at, "
            "updated_at) SELECT 's', i, 'active', 1, now(), now(), now() "
            "FROM generate_series(1, 30000) AS g(i)"
        )
        # Parked at their send step, as the walk leaves them: statistics from before know none parked.
        conn.exec_driver_sql("UPDATE enrollments SET next_run_at = NULL")
    captured: list[tuple[str, tuple]] = []

    def capture(_conn, _cursor, sql, params, *_):
        if sql.startswith('UPDATE "enrollments"'):
            captured.append((sql, params))

    event.listen(engine, "before_cursor_execute", capture)
    with session_scope(engine) as session:
        rows = [(i, 1, 2, T0, T0) for i in range(1000, 1100)]
        done = Driver(session).update_many(
            Enrollment.__table__,
            ("id", "step_index"),
            ("step_index", "next_run_at", "updated_at"),
            rows,
            where="status = 'active' AND next_run_at IS NULL",
        )
    assert done == 100
    (sql, params), *_ = captured
    with engine.begin() as conn:
        (plan,) = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}", params).scalar()
    for node in _nodes(plan["Plan"] if isinstance(plan, dict) else json.loads(plan)[0]["Plan"]):
        if node["Node Type"] == "Nested Loop":
            outer, inner = node["Plans"]
            assert inner["Node Type"] != "Function Scan", "the rows rescanned once per enrollment"


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_outbox_records_a_batch_once_in_one_statement_on_postgresql(engine):
    statements = _statements(engine)
    record = OutboxRecorder(engine, clock=lambda: T0)
    row = {
        "delivery_id": ODD,
        "channel": "email",
        "customer_id": 7,
        "recipient": "a@example.org",
        "template": "email/x",
        "subject": ODD,
        "body": None,
        "payload": {"to": "a@example.org", "nested": {"text": ODD, "n": [1, 2.5, None, True]}},
    }
    assert record([row, {**row, "delivery_id": "second"}]) == {ODD, "second"}
    assert record([row, {**row, "delivery_id": "third"}]) == {"third"}
    assert record([]) == set()
    with session_scope(engine) as session:
        stored = session.execute(select(OutboxMessage).where(OutboxMessage.delivery_id == ODD)).scalar_one()
    assert (stored.subject, stored.body, stored.payload, stored.sent_at) == (ODD, None, row["payload"], T0)
    outbox = [s for s in statements if s.startswith("INSERT INTO outbox")]
    if engine.dialect.name == "postgresql":
        assert len(outbox) == 2 and all("ON CONFLICT (delivery_id) DO NOTHING" in s for s in outbox)


def test_enrolling_many_refreshes_the_statistics_the_tick_plans_on(engine):
    seed_stores(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO customers (id, traits, created_at, updated_at) VALUES "
            + ", ".join(f"({i}, '{{}}', '2026-05-01 00:00:00', '2026-05-01 00:00:00')" for i in range(1, 201))
        )
        conn.exec_driver_sql(
            "INSERT INTO events (message_id, customer_id, type, name, channel, properties, context, "
            "occurred_at, received_at) VALUES "
            + ", ".join(
                f"('m{i}', {i}, 'track', 'Signed Up', 'web', '{{}}', '{{}}', '2026-06-02 14:00:00', "
                "'2026-06-02 14:00:00')"
                for i in range(1, 201)
            )
        )
    refresh_statistics(engine, ["enrollments"])  # statistics of the empty table
    sequence = parse_sequence(
        {
            "name": "welcome",
            "trigger": {"event": "Signed Up"},
            "steps": [{"id": "mail", "send": {"channel": "email", "template": "email/abandoned_cart"}}],
        },
        file="welcome.yaml",
        audiences={},
    )
    report = TickReport(now=T0)
    with session_scope(engine) as session:
        enroll(session, sequence, now=T0, report=report)
    assert report.sequences["welcome"].enrolled == 200
    assert stale_statistics(engine, {"enrollments": 1}) == []


def _explained(engine, query) -> list[dict]:
    """The nodes of ``query``'s plan as run (EXPLAIN ANALYZE)."""
    compiled = query.compile(dialect=engine.dialect)
    with engine.begin() as conn:
        (plan,) = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}", compiled.params).scalar()
    return list(_nodes(plan["Plan"] if isinstance(plan, dict) else json.loads(plan)[0]["Plan"]))


def _rows_read(nodes: list[dict], table: str) -> int:
    return sum(n["Actual Rows"] * n["Actual Loops"] for n in nodes if n.get("Relation Name") == table)


def test_a_batch_of_due_work_reads_its_own_rows_not_every_row_still_due(engine):
    """A tick reads due deliveries and enrollments a batch at a time, each batch after the one before.
    Each batch must read only its own rows from the table, in order along the due-work index, on
    statistics from when the tables were empty: reading (and joining, and sorting) every row still due
    for each batch made a tick quadratic in its deliveries."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL plan")
    refresh_statistics(engine, ["deliveries", "enrollments"])  # empty
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO customers (id, traits, created_at, updated_at) "
            "SELECT i, '{}', now(), now() FROM generate_series(1, 20000) AS g(i)"
        )
        conn.exec_driver_sql(
            "INSERT INTO enrollments (id, sequence, customer_id, status, step_index, next_run_at, "
            "enrolled_at, updated_at) SELECT i, 's', i, 'active', 1, %s, now(), now() "
            "FROM generate_series(1, 20000) AS g(i)",
            (T0,),
        )
        conn.exec_driver_sql(
            "INSERT INTO deliveries (id, dedupe_key, enrollment_id, step_id, customer_id, channel, "
            "connector, status, attempts, marketing, next_attempt_at, created_at, updated_at) "
            "SELECT i, 'enrollment:' || i || ':mail', i, 'mail', i, 'email', 'outbox', "
            "CASE WHEN i %% 4 = 0 THEN 'sent' ELSE 'pending' END, 0, true, %s, now(), now() "
            "FROM generate_series(1, 20000) AS g(i)",
            (T0,),
        )
    after = (T0, 8000)  # a batch half-way through the tick
    dispatch = _explained(engine, due_batch(now=T0, after=after, limit=500))
    assert _rows_read(dispatch, "deliveries") <= 500
    assert _rows_read(dispatch, "enrollments") <= 500
    walk = _explained(engine, due_enrollments("s", now=T0, after=after, limit=500))
    assert _rows_read(walk, "enrollments") <= 500
    assert not [n for n in dispatch + walk if n["Node Type"] == "Sort" and n["Actual Rows"] > 500]
    # A shard reads its batch off the same index: about the shard count times as many entries, not all.
    shard = _explained(engine, due_batch(now=T0, after=after, limit=500, shard=Shard(1, 4)))
    assert _rows_read(shard, "deliveries") <= 500
