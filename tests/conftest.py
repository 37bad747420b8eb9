"""Shared fixtures.

``engine``: a migrated, empty profile store, once on SQLite and, when ``OMNI_TEST_DATABASE_URL`` is
set, once on PostgreSQL. The PostgreSQL cases run in a database this test run creates and drops
(never in the database the URL names, which other people may use).

``prefect_harness``: a temporary Prefect API for tests that run flows (ask for it explicitly).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)
for _name in [n for n in os.environ if n.startswith("OMNI_") and n != "OMNI_TEST_DATABASE_URL"]:
    os.environ.pop(_name)  # the developer's own Omni settings must not leak into tests

import pytest  # noqa: E402
from sqlalchemy import Engine, text  # noqa: E402

from omni.core.settings import get_settings  # noqa: E402
from profiles.db import create_store_engine, dispose_engines, scratch_database, upgrade_schema  # noqa: E402
from profiles.models import metadata  # noqa: E402

PG_URL = os.environ.get("OMNI_TEST_DATABASE_URL")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against PostgreSQL (needs OMNI_TEST_DATABASE_URL)")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite store, copied for each test (migrating every time would be slow)."""
    path = tmp_path_factory.mktemp("template") / "omni.db"
    engine = create_store_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    engine.dispose()  # closing the last connection checkpoints the WAL into the file
    assert not path.with_name("omni.db-wal").exists()
    return path


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated once and dropped at the end."""
    if not PG_URL:
        pytest.skip("OMNI_TEST_DATABASE_URL is not set")
    with scratch_database(PG_URL, prefix="omni_test") as url:
        engine = create_store_engine(url)
        upgrade_schema(engine)
        engine.dispose()
        yield url


def _truncate_all(engine: Engine) -> None:
    tables = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[str]:
    """URL of a migrated, empty store (SQLite file per test, or the run's PostgreSQL database emptied)."""
    get_settings.cache_clear()
    if request.param == "sqlite":
        path = tmp_path / "omni.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("pg_database_url")
        engine = create_store_engine(url)
        _truncate_all(engine)
        engine.dispose()
        yield url
    dispose_engines()
    get_settings.cache_clear()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_store_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A store migrated just now, never analyzed (a fresh PostgreSQL database, not the shared one)."""
    if request.param == "sqlite":
        engine = create_store_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
        upgrade_schema(engine)
        yield engine
        engine.dispose()
        return
    if not PG_URL:
        pytest.skip("OMNI_TEST_DATABASE_URL is not set")
    with scratch_database(PG_URL, prefix="omni_test") as url:
        engine = create_store_engine(url)
        upgrade_schema(engine)
        yield engine
        engine.dispose()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for the whole run, started on first use (about 10 s)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


def _wait_until_waiting_on_a_lock(engine: Engine, pid: int, what: str = "the backend") -> None:
    """Until PostgreSQL backend ``pid`` waits on a lock (bounded: the test fails rather than hangs)."""
    for _ in range(20_000):
        with engine.connect() as conn:
            waiting = conn.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            ).scalar()
        if waiting == "Lock":
            return
    raise AssertionError(f"{what} never waited on a lock")


@pytest.fixture
def wait_until_blocked():
    """``wait_until_blocked(engine, pid, what)``: for concurrency tests on PostgreSQL, until backend ``pid``
    waits on a lock another connection holds."""
    return _wait_until_waiting_on_a_lock
