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
from sqlalchemy import insert, inspect, select
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
from profiles.models import AudienceMembership, Customer, metadata

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


def test_upgrade_from_0002_keeps_memberships_without_the_customer_foreign_key(blank_url):
    engine = create_store_engine(blank_url)
    try:
        upgrade_schema(engine, "0002")
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
                    {"audience": "reachable", "customer_id": 1, "entered_at": T0, "exited_at": None},
                    {"audience": "reachable", "customer_id": 2, "entered_at": T0, "exited_at": T0},
                    {"audience": "reachable", "customer_id": 2, "entered_at": T0, "exited_at": None},
                ],
            )
        before = _memberships(engine)
        assert _init(blank_url)["previous_revision"] == "0002"
        assert current_revision(engine) == head_revision()
        assert _memberships(engine) == before
        _no_differences(engine)
        assert inspect(engine).get_foreign_keys("audience_memberships") == []
        assert [i["name"] for i in inspect(engine).get_indexes("audience_memberships")] == [
            "uq_audience_memberships_open"
        ]
        with pytest.raises(IntegrityError), engine.begin() as conn:  # still one open row per customer
            conn.execute(insert(memberships).values(audience="reachable", customer_id=1, entered_at=T0))
        # Builds go on from the history as it was: customer 2 (no email) leaves.
        definitions = {
            "reachable": parse_definition(
                {"name": "reachable", "where": {"trait": "email", "exists": True}}, file="reachable.yaml"
            )
        }
        later = T0 + timedelta(hours=1)
        result = build_audience(engine, "reachable", now=later, definitions=definitions)
        assert result.as_dict() == {"size": 1, "entered": 0, "exited": 1}
        assert _memberships(engine) == [(1, T0, None), (2, T0, T0), (2, T0, later)]
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


def _memberships(engine) -> list[tuple]:
    with engine.connect() as conn:
        return conn.execute(
            select(memberships.c.customer_id, memberships.c.entered_at, memberships.c.exited_at).order_by(
                memberships.c.id
            )
        ).all()
