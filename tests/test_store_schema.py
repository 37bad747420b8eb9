"""The schema: migrations create exactly what the models describe, `init` is idempotent, and a store
at an older revision upgrades in place."""

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from audiences import build_audience
from audiences.definitions import parse_definition
from omni.cli import app
from profiles.db import (
    _alembic_config,
    create_store_engine,
    current_revision,
    head_revision,
    scratch_database,
    upgrade_schema,
)
from profiles.models import AudienceMembership, Customer, Delivery, Enrollment, metadata

memberships = AudienceMembership.__table__


def test_migrations_match_models(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_upgrade_is_idempotent(engine):
    upgrade_schema(engine)
    upgrade_schema(engine)
    assert current_revision(engine) == head_revision()


# --- `omni init` on an empty database, and the upgrade from 0002 ------------------------------------

PG_URL = os.environ.get("OMNI_TEST_DATABASE_URL")
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def blank_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """URL of an empty database: no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'blank.db'}"
        return
    if not PG_URL:
        pytest.skip("OMNI_TEST_DATABASE_URL is not set")
    with scratch_database(PG_URL, prefix="omni_test") as url:
        yield url


def _init(url: str) -> dict:
    result = CliRunner().invoke(app, ["init", "--database-url", url, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _no_differences(engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata) == []


def test_init_on_an_empty_database(blank_url):
    assert _init(blank_url)["revision"] == head_revision()
    engine = create_store_engine(blank_url)
    try:
        _no_differences(engine)
        assert inspect(engine).get_foreign_keys("audience_memberships") == []
    finally:
        engine.dispose()
    assert _init(blank_url)["changed"] is False


def _seed_memberships(engine, stays):
    """Two customers, and stays of theirs in one audience: (customer_id, exited_at), entered at T0."""
    with engine.begin() as conn:
        conn.execute(
            insert(Customer.__table__),
            [
                {"id": i, "email": email, "traits": {}, "created_at": T0, "updated_at": T0}
                for i, email in [(1, "ann@example.org"), (2, None)]
            ],
        )
        conn.execute(
            insert(memberships),
            [
                {"audience": "reachable", "customer_id": customer, "entered_at": T0, "exited_at": exited}
                for customer, exited in stays
            ],
        )


def _init_to_head_keeping_memberships(engine, url, revision):
    """``omni init`` upgrades a store at ``revision`` to the head, memberships as they were."""
    before = _memberships(engine)
    assert _init(url)["previous_revision"] == revision
    assert current_revision(engine) == head_revision()
    assert _memberships(engine) == before
    _no_differences(engine)


def _builds_go_on_from_the_seeded_history(engine):
    """After an upgrade: still one open row per customer, and a build goes on from the history as it
    was: customer 2 (no email) leaves."""
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(insert(memberships).values(audience="reachable", customer_id=1, entered_at=T0))
    definitions = {
        "reachable": parse_definition(
            {"name": "reachable", "where": {"trait": "email", "exists": True}}, file="reachable.yaml"
        )
    }
    later = T0 + timedelta(hours=1)
    result = build_audience(engine, "reachable", now=later, definitions=definitions)
    assert result.as_dict() == {"size": 1, "entered": 0, "exited": 1}
    assert _memberships(engine) == [(1, T0, None), (2, T0, T0), (2, T0, later)]


def test_upgrade_from_0002_keeps_memberships_without_the_customer_foreign_key(blank_url):
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine, "0002")
        _seed_memberships(engine, [(1, None), (2, T0), (2, None)])
        _init_to_head_keeping_memberships(engine, blank_url, "0002")
        assert inspect(engine).get_foreign_keys("audience_memberships") == []
        assert [i["name"] for i in inspect(engine).get_indexes("audience_memberships")] == [
            "uq_audience_memberships_open"
        ]
        _builds_go_on_from_the_seeded_history(engine)
    finally:
        engine.dispose()


def test_downgrade_to_0002_and_upgrade_again(blank_url):
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine)
        command.downgrade(_alembic_config(engine), "0002")
        assert current_revision(engine) == "0002"
        assert [fk["referred_table"] for fk in inspect(engine).get_foreign_keys("audience_memberships")] == [
            "customers"
        ]
        upgrade_schema(engine)
        assert current_revision(engine) == head_revision()
        _no_differences(engine)
    finally:
        engine.dispose()


# --- 0005: memberships without the surrogate id ----------------------------------------------------


def _replica_identity(engine) -> str:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT relreplident FROM pg_class WHERE relname = 'audience_memberships'")
        ).scalar_one()


def test_upgrade_from_0004_drops_the_membership_id(blank_url):
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine, "0004")
        assert "id" in [c["name"] for c in inspect(engine).get_columns("audience_memberships")]
        _seed_memberships(engine, [(2, T0), (1, None), (2, None)])
        _init_to_head_keeping_memberships(engine, blank_url, "0004")
        schema = inspect(engine)
        assert [c["name"] for c in schema.get_columns("audience_memberships")] == [
            "audience",
            "customer_id",
            "entered_at",
            "exited_at",
        ]
        assert schema.get_pk_constraint("audience_memberships")["constrained_columns"] == []
        assert [i["name"] for i in schema.get_indexes("audience_memberships")] == [
            "uq_audience_memberships_open"
        ]
        if engine.dialect.name == "postgresql":
            assert _replica_identity(engine) == "f"  # logical replication can still publish its updates
        _builds_go_on_from_the_seeded_history(engine)
    finally:
        engine.dispose()


def test_downgrade_to_0004_numbers_the_stays_in_order(blank_url):
    engine = create_store_engine(blank_url)
    t1, t2 = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    try:
        upgrade_schema(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(memberships),
                [
                    {"audience": "b", "customer_id": 1, "entered_at": t1, "exited_at": None},
                    {"audience": "a", "customer_id": 2, "entered_at": T0, "exited_at": t1},
                    {"audience": "a", "customer_id": 2, "entered_at": t2, "exited_at": None},
                    {"audience": "a", "customer_id": 1, "entered_at": T0, "exited_at": None},
                ],
            )
        command.downgrade(_alembic_config(engine), "0004")
        assert current_revision(engine) == "0004"
        assert inspect(engine).get_pk_constraint("audience_memberships")["constrained_columns"] == ["id"]
        if engine.dialect.name == "postgresql":
            assert _replica_identity(engine) == "d"
        read = text("SELECT id, audience, customer_id FROM audience_memberships ORDER BY id")
        with engine.begin() as conn:
            assert [tuple(r) for r in conn.execute(read)] == [
                (1, "a", 1),
                (2, "a", 2),
                (3, "b", 1),
                (4, "a", 2),
            ]
            # New rows are numbered after them, as before 0005.
            conn.execute(insert(memberships).values(audience="c", customer_id=3, entered_at=t2))
            assert (
                conn.execute(text("SELECT max(id) FROM audience_memberships WHERE audience = 'c'")).scalar()
                == 5
            )
        upgrade_schema(engine)
        assert current_revision(engine) == head_revision()
        _no_differences(engine)
        assert len(_memberships(engine)) == 5
    finally:
        engine.dispose()


def _memberships(engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(
            select(memberships.c.customer_id, memberships.c.entered_at, memberships.c.exited_at).order_by(
                memberships.c.entered_at, memberships.c.customer_id, memberships.c.exited_at.nulls_last()
            )
        ).all()


# --- 0004: the open cart's lines ----------------------------------------------------------------------


def test_upgrade_from_0003_keeps_carts_and_the_next_product_event_fills_their_lines(blank_url):
    from profiles.ingest import ingest_payloads
    from profiles.models import Cart, Event, Identity

    tee = {"product_id": "tee", "price": 20.0, "quantity": 1}
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine, "0003")
        assert "lines" not in [c["name"] for c in inspect(engine).get_columns("carts")]
        # A store written before 0004: a customer, one Product Added and the open cart derived from it.
        with engine.begin() as conn:
            conn.execute(
                insert(Customer.__table__), [{"id": 1, "traits": {}, "created_at": T0, "updated_at": T0}]
            )
            conn.execute(
                insert(Identity.__table__),
                [{"kind": "user_id", "value": "u1", "customer_id": 1, "created_at": T0}],
            )
            conn.execute(
                insert(Event.__table__).values(
                    message_id="m1",
                    customer_id=1,
                    type="track",
                    name="Product Added",
                    channel="web",
                    properties=tee,
                    context={},
                    user_id="u1",
                    occurred_at=T0,
                    received_at=T0,
                )
            )
            item = {"product_id": "tee", "sku": None, "name": None, "price": 20.0, "quantity": 1}
            conn.execute(
                insert(Cart.__table__).values(
                    customer_id=1,
                    status="open",
                    items=[item],
                    item_count=1,
                    value=20.0,
                    started_at=T0,
                    updated_at=T0,
                )
            )
        assert _init(blank_url)["previous_revision"] == "0003"
        _no_differences(engine)
        with engine.connect() as conn:
            assert conn.execute(select(Cart.item_count, Cart.lines)).all() == [(1, None)]
        # A row without lines is re-derived from the events, and keeps its lines from then on.
        later = T0 + timedelta(hours=1)
        added = {"type": "track", "userId": "u1", "event": "Product Added", "properties": tee}
        ingest_payloads(engine, [{**added, "messageId": "m2", "timestamp": later.isoformat()}], now=later)
        with engine.connect() as conn:
            [(count, lines)] = conn.execute(select(Cart.item_count, Cart.lines)).all()
        assert (count, [key for key, _ in lines]) == (2, ["tee"])
        command.downgrade(_alembic_config(engine), "0003")
        assert "lines" not in [c["name"] for c in inspect(engine).get_columns("carts")]
    finally:
        engine.dispose()


# --- 0006: one open enrollment per sequence and customer --------------------------------------------


def test_upgrade_to_0006_closes_duplicate_enrollments_left_by_concurrent_ticks(blank_url):
    """A store that already holds the race's duplicates upgrades: the first enrollment stays open, the
    others exit with the reason and their pending deliveries are skipped, so nothing goes out twice."""
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine, "0005")
        customer = {"id": 1, "traits": {}, "created_at": T0, "updated_at": T0}
        row = {"sequence": "abandoned_cart", "customer_id": 1, "step_index": 0, "enrolled_at": T0}
        send = {"step_id": "cart_email", "customer_id": 1, "channel": "email", "connector": "outbox"}
        send |= {"status": "pending", "attempts": 0, "marketing": True, "next_attempt_at": T0}
        with engine.begin() as conn:
            conn.execute(insert(Customer.__table__), [customer])
            conn.execute(
                insert(Enrollment.__table__),
                [
                    {**row, "id": n, "status": status, "updated_at": T0}
                    for n, status in ((1, "active"), (2, "active"), (3, "completed"), (4, "holdout"))
                ],
            )
            conn.execute(
                insert(Delivery.__table__),
                [
                    {**send, "dedupe_key": f"enrollment:{n}:cart_email", "enrollment_id": n}
                    | {"created_at": T0, "updated_at": T0}
                    for n in (1, 2)
                ],
            )
        upgrade_schema(engine)
        _no_differences(engine)
        with engine.begin() as conn:
            statuses = conn.execute(text("SELECT id, status, exit_reason FROM enrollments ORDER BY id")).all()
            sends = conn.execute(
                text("SELECT enrollment_id, status FROM deliveries ORDER BY enrollment_id")
            ).all()
        assert [tuple(r) for r in statuses] == [
            (1, "active", None),
            (2, "exited", "duplicate enrollment"),
            (3, "completed", None),
            (4, "exited", "duplicate enrollment"),
        ]
        assert [tuple(r) for r in sends] == [(1, "pending"), (2, "skipped")]
    finally:
        engine.dispose()
