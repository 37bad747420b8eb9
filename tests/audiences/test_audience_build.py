"""Building: memberships with entered / exited history, idempotent rebuilds, dependency order."""

from __future__ import annotations

import pytest
from audience_testkit import NOW, SECOND, History, days, hours, user_ids
from sqlalchemy import event, select, text

from audiences import (
    UnknownAudience,
    build_audience,
    build_audiences,
    compile_audience,
    load_audiences,
    members,
)
from audiences.definitions import builtin_directory, check_references, parse_definition
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import AudienceBuild, AudienceMembership


def _definitions(**wheres: dict) -> dict:
    definitions = {
        name: parse_definition({"name": name, "where": where}, file=f"{name}.yaml")
        for name, where in wheres.items()
    }
    check_references(definitions)
    return definitions


VIEWERS = _definitions(
    viewers={"event": "Page Viewed", "within": "1d"},
    gold_viewers={"all": [{"audience": "viewers"}, {"trait": "tier", "eq": "gold"}]},
)


def _rows(engine) -> list[tuple]:
    table = AudienceMembership.__table__
    names = user_ids(engine)
    with engine.connect() as conn:
        rows = conn.execute(
            # In the order of the stays (the table has no surrogate id to order by).
            select(table.c.audience, table.c.customer_id, table.c.entered_at, table.c.exited_at).order_by(
                table.c.entered_at, table.c.audience, table.c.customer_id, table.c.exited_at.nulls_last()
            )
        ).all()
    return [(a, names[c], entered, exited) for a, c, entered, exited in rows]


def _build_log(engine) -> list[tuple]:
    table = AudienceBuild.__table__
    with engine.connect() as conn:
        return conn.execute(
            select(
                table.c.audience, table.c.built_at, table.c.size, table.c.entered, table.c.exited
            ).order_by(table.c.id)
        ).all()


def test_entered_and_exited_across_three_builds(engine):
    t1, t2, t3 = NOW, NOW + days(1) + SECOND, NOW + days(2)
    (
        History()
        .identify("ann", tier="gold")
        .track("ann", "Page Viewed", days(0.5))
        .track("bob", "Page Viewed", days(0.5))
        .track("ann", "Page Viewed", -days(1))  # at t2 - 1s: still within a day at t2
        .track("cid", "Page Viewed", -days(1))
        .track("bob", "Page Viewed", -days(1.5))  # bob comes back before t3
        .ingest(engine)
    )
    first = build_audience(engine, "viewers", now=t1, definitions=VIEWERS)
    assert (first.size, first.entered, first.exited) == (2, 2, 0)
    second = build_audience(engine, "viewers", now=t2, definitions=VIEWERS)
    assert (second.size, second.entered, second.exited) == (2, 1, 1)  # cid in, bob out
    third = build_audience(engine, "viewers", now=t3, definitions=VIEWERS)
    assert (third.size, third.entered, third.exited) == (3, 1, 0)  # bob back (ann's view: exactly 1 day)
    assert _rows(engine) == [
        ("viewers", "ann", t1, None),
        ("viewers", "bob", t1, t2),
        ("viewers", "cid", t2, None),
        ("viewers", "bob", t3, None),  # a new row for the new stay
    ]
    assert [tuple(r[1:]) for r in _build_log(engine)] == [(t1, 2, 2, 0), (t2, 2, 1, 1), (t3, 3, 1, 0)]
    total, page = members(engine, "viewers", limit=2)
    assert total == 3 and [r["entered_at"] for r in page] == [t1, t2]


def test_rebuild_at_the_same_now_changes_nothing(engine):
    History().track("ann", "Page Viewed", days(0.5)).track("bob", "Page Viewed", days(0.5)).ingest(engine)
    build_audiences(engine, now=NOW, definitions=VIEWERS)
    rows, log = _rows(engine), _build_log(engine)
    again = build_audiences(engine, now=NOW, definitions=VIEWERS)
    assert {name: r.as_dict() for name, r in again.items()} == {
        "viewers": {"size": 2, "entered": 0, "exited": 0},
        "gold_viewers": {"size": 0, "entered": 0, "exited": 0},
    }
    assert _rows(engine) == rows and _build_log(engine) == log
    # An earlier now supersedes the later build (its history is undone), rather than being refused.
    earlier = build_audience(engine, "viewers", now=NOW - SECOND, definitions=VIEWERS)
    assert earlier.as_dict() == {"size": 2, "entered": 2, "exited": 0}
    assert [r[1:] for r in _rows(engine) if r[0] == "viewers"] == [
        ("ann", NOW - SECOND, None),
        ("bob", NOW - SECOND, None),
    ]
    assert [tuple(r[:2]) for r in _build_log(engine)] == [
        ("gold_viewers", NOW),
        ("viewers", NOW - SECOND),
    ]


def test_a_future_preview_does_not_block_builds_at_the_real_time(engine):
    """`--now` six hours ahead, then the real time: the real build succeeds, its memberships are those at
    the real time, and the next build carries on from it."""
    (
        History()
        .track("ann", "Page Viewed", hours(2))  # a member at every build below
        .track("cid", "Page Viewed", hours(20))  # a member now; gone 6 hours later (26 hours ago)
        .track("dan", "Page Viewed", -hours(3))  # views 3 hours from now: a member only then
        .ingest(engine)
    )
    past, future = NOW - hours(1), NOW + hours(6)
    build_audience(engine, "viewers", now=past, definitions=VIEWERS)
    preview = build_audience(engine, "viewers", now=future, definitions=VIEWERS)
    assert preview.as_dict() == {"size": 2, "entered": 1, "exited": 1}  # dan in, cid out

    real = build_audience(engine, "viewers", now=NOW, definitions=VIEWERS)
    assert real.as_dict() == {"size": 2, "entered": 0, "exited": 0}  # as if the preview never was
    assert _rows(engine) == [("viewers", "ann", past, None), ("viewers", "cid", past, None)]
    assert [tuple(r[1:]) for r in _build_log(engine)] == [(past, 2, 2, 0), (NOW, 2, 0, 0)]
    total, page = members(engine, "viewers")
    assert total == 2 and {r["entered_at"] for r in page} == {past}

    later = NOW + hours(7)
    assert build_audience(engine, "viewers", now=later, definitions=VIEWERS).as_dict() == {
        "size": 2,
        "entered": 1,
        "exited": 1,
    }
    assert _rows(engine) == [
        ("viewers", "ann", past, None),
        ("viewers", "cid", past, later),
        ("viewers", "dan", later, None),
    ]


def test_dependencies_first_and_merged_customers_exit(engine):
    (
        History()
        .identify("ann", tier="gold")
        .track("ann", "Page Viewed", days(0.5))
        .anonymous("visitor", "Page Viewed", days(0.5))
        .identify("bob", ago=days(0.2), tier="gold")
        .ingest(engine, batch_size=1)
    )
    results = build_audiences(engine, ["gold_viewers"], now=NOW, definitions=VIEWERS)
    assert list(results) == ["viewers", "gold_viewers"]  # the referenced audience first
    assert results["viewers"].size == 2 and results["gold_viewers"].size == 1
    # the visitor signs in as bob: the visitor's profile is merged away and leaves, bob enters
    History().alias("bob", "visitor", days(0.1)).ingest(engine)
    later = NOW + SECOND
    results = build_audiences(engine, now=later, definitions=VIEWERS)
    assert {n: r.as_dict() for n, r in results.items()} == {
        "viewers": {"size": 2, "entered": 1, "exited": 1},
        "gold_viewers": {"size": 2, "entered": 1, "exited": 0},
    }
    names = user_ids(engine)
    _, current = members(engine, "gold_viewers")
    assert {names[r["customer_id"]] for r in current} == {"ann", "bob"}


def test_build_in_the_callers_transaction_and_unknown_names(engine):
    History().track("ann", "Page Viewed", days(0.5)).ingest(engine)
    with pytest.raises(RuntimeError):
        with session_scope(engine) as session:
            assert build_audience(session, "viewers", now=NOW, definitions=VIEWERS).entered == 1
            raise RuntimeError("roll back")
    assert _rows(engine) == []
    with session_scope(engine) as session:
        build_audience(session, "viewers", now=NOW, definitions=VIEWERS)
    assert len(_rows(engine)) == 1
    with pytest.raises(UnknownAudience):
        build_audience(engine, "nobody", now=NOW, definitions=VIEWERS)
    with pytest.raises(UnknownAudience):
        build_audiences(engine, ["nobody"], now=NOW, definitions=VIEWERS)


def test_an_audience_that_empties_and_fills_again_keeps_its_history(engine):
    # Builds with no open row take a shorter path (every id enters: inserted straight from the query on
    # SQLite, from the temporary table on PostgreSQL): the history rows before it must stay as they are.
    t1, t2, t3, t4 = NOW, NOW + days(1) + SECOND, NOW + days(3), NOW + days(3) + SECOND
    (History().track("ann", "Page Viewed", days(0.5)).track("bob", "Page Viewed", days(0.5)).ingest(engine))
    assert build_audience(engine, "viewers", now=t1, definitions=VIEWERS).as_dict() == {
        "size": 2,
        "entered": 2,
        "exited": 0,
    }
    assert build_audience(engine, "viewers", now=t2, definitions=VIEWERS).as_dict() == {
        "size": 0,
        "entered": 0,
        "exited": 2,
    }
    # ann is back within a day of t3 (received when it happened: events far ahead of receipt are refused)
    back = History().track("ann", "Page Viewed", -days(2.5)).payloads
    assert ingest_payloads(engine, back, now=t3).rejected == 0
    assert build_audience(engine, "viewers", now=t3, definitions=VIEWERS).as_dict() == {
        "size": 1,
        "entered": 1,
        "exited": 0,
    }
    again = build_audience(engine, "viewers", now=t4, definitions=VIEWERS)
    assert again.as_dict() == {"size": 1, "entered": 0, "exited": 0}
    assert _rows(engine) == [
        ("viewers", "ann", t1, t2),
        ("viewers", "bob", t1, t2),
        ("viewers", "ann", t3, None),
    ]
    assert [tuple(r[1:]) for r in _build_log(engine)] == [
        (t1, 2, 2, 0),
        (t2, 0, 0, 2),
        (t3, 1, 1, 0),
        (t4, 1, 0, 0),
    ]


def test_many_members_enter_and_leave_in_one_build(engine):
    # Set-based both ways: half the members leave and as many new ones enter in the same build.
    history = History()
    for i in range(60):
        history.track(f"u{i:02d}", "Page Viewed", days(0.5) if i < 40 else -days(0.5))
    history.ingest(engine)
    first = build_audience(engine, "viewers", now=NOW, definitions=VIEWERS)
    assert first.as_dict() == {"size": 40, "entered": 40, "exited": 0}
    later = NOW + days(1) + SECOND  # the first 40 views are now older than a day; the last 20 count
    second = build_audience(engine, "viewers", now=later, definitions=VIEWERS)
    assert second.as_dict() == {"size": 20, "entered": 20, "exited": 40}
    rows = _rows(engine)
    assert len(rows) == 60
    assert {r[1] for r in rows if r[3] is None} == {f"u{i:02d}" for i in range(40, 60)}
    assert all(r[3] == later for r in rows if r[1] < "u40")
    _, current = members(engine, "viewers", limit=100)
    assert len(current) == 20


def test_compiled_audiences_are_cached_statements():
    # A build compiles its statement once per shape, not at every run: every built-in audience has a
    # cache key, and the same one at another `now` (the times are parameters).
    definitions = load_audiences(builtin_directory())
    for definition in definitions.values():
        at_now = compile_audience(definition, now=NOW, definitions=definitions)._generate_cache_key()
        later = compile_audience(definition, now=NOW + hours(1), definitions=definitions)
        assert at_now is not None and at_now == later._generate_cache_key(), definition.name


def test_several_builds_in_one_callers_transaction(engine):
    # Each build's working table is its own: several audiences, and the same one twice, in one
    # transaction of the caller.
    (
        History()
        .identify("ann", tier="gold")
        .track("ann", "Page Viewed", days(0.5))
        .track("bob", "Page Viewed", days(0.5))
        .ingest(engine)
    )
    with session_scope(engine) as session:
        first = build_audiences(session, now=NOW, definitions=VIEWERS)
        again = build_audiences(session, now=NOW + SECOND, definitions=VIEWERS)
    assert {n: r.as_dict() for n, r in first.items()} == {
        "viewers": {"size": 2, "entered": 2, "exited": 0},
        "gold_viewers": {"size": 1, "entered": 1, "exited": 0},
    }
    assert {n: r.as_dict() for n, r in again.items()} == {
        "viewers": {"size": 2, "entered": 0, "exited": 0},
        "gold_viewers": {"size": 1, "entered": 0, "exited": 0},
    }
    assert sorted((r[0], r[1]) for r in _rows(engine)) == [
        ("gold_viewers", "ann"),
        ("viewers", "ann"),
        ("viewers", "bob"),
    ]


def test_a_build_on_its_own_commits_without_waiting_for_the_disk_but_a_callers_transaction_keeps_its_setting(
    engine,
):
    # PostgreSQL: a build that owns its transaction commits with synchronous_commit off (derived data,
    # redone by the next run if a crash loses it); in the caller's transaction the setting is the caller's.
    if engine.dialect.name != "postgresql":
        pytest.skip("synchronous_commit is a PostgreSQL setting")
    History().track("ann", "Page Viewed", days(0.5)).ingest(engine)
    at_commit = []

    @event.listens_for(engine, "commit")
    def _setting_at_commit(conn):  # before the COMMIT is sent, in the transaction being committed
        with conn.connection.dbapi_connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            at_commit.append(cursor.fetchone()[0])

    assert build_audience(engine, "viewers", now=NOW, definitions=VIEWERS).entered == 1
    assert at_commit == ["off"]
    with engine.connect() as conn:
        default = conn.execute(text("SHOW synchronous_commit")).scalar_one()
    assert default != "off"  # SET LOCAL: the pooled connection is back to the server's setting
    at_commit.clear()
    with session_scope(engine) as session:
        assert build_audience(session, "viewers", now=NOW + SECOND, definitions=VIEWERS).size == 1
        assert session.execute(text("SHOW synchronous_commit")).scalar_one() == default
    assert at_commit == [default]
