"""Engine, sessions, column types and schema migrations of the profile store.

SQLite is the embedded default (WAL mode, every transaction ``BEGIN IMMEDIATE`` so that two writers
queue on the busy timeout instead of failing half-way); PostgreSQL is reached through psycopg 3.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, DateTime, Engine, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from omni.core.settings import normalize_database_url

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# JSON documents: JSONB on PostgreSQL (indexable, containment operators), JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL keeps ``timestamptz``. SQLite has no timezone type, so values are stored as naive UTC
    text in one fixed format, which keeps comparisons in SQL (windows, idle times) correct, and are
    handed back aware. Naive datetimes are refused: a timestamp without a zone is a bug upstream.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Omni stores timezone-aware UTC timestamps only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    # On SQLite, bind and read the text format directly: the generic chain (this decorator, then
    # SQLite's DATETIME processor) dominated bulk inserts. The format is SQLAlchemy's own for SQLite,
    # so values written either way compare correctly.
    def bind_processor(self, dialect: Any) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        return sqlite_timestamp

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: str | None) -> datetime | None:
            if value is None:
                return None
            return datetime.fromisoformat(value).replace(tzinfo=UTC)

        return process


def sqlite_timestamp(value: datetime | None) -> str | None:
    """An aware datetime as the naive-UTC text SQLAlchemy uses on SQLite (it sorts and compares as time)."""
    if value is None:
        return None
    zone = value.tzinfo
    if zone is None:
        raise ValueError(f"naive datetime {value!r}: Omni stores timezone-aware UTC timestamps only")
    if zone is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


# --- PostgreSQL: many values as one parameter ------------------------------------------------------------
#
# psycopg dumps a list parameter (an array) value by value in Python, and an ``executemany`` row by row:
# for the 1,000-row statements of a tick that cost more of the process's time than the database's work.
# These forms hand the server one text parameter instead, built in C (``str.join``, orjson), which the
# server parses itself.

_PG_DIALECT = postgresql.dialect()


def pg_array_literal(values: Iterable[Any]) -> str:
    """``values`` (ints or strings, None for NULL) as a PostgreSQL array literal (``{1,2}``,
    ``{"a","b"}``): one text parameter to cast to the array type (``%s::bigint[]``)."""
    values = list(values)
    if all(type(value) is int for value in values):
        return "{" + ",".join(map(str, values)) + "}"
    return "{" + ",".join(map(_pg_array_element, values)) + "}"


def _pg_array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if type(value) is int:
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"an array literal holds ints and strings, not {type(value).__name__}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pg_recordset(table: Table, names: Sequence[str], alias: str = "v") -> str:
    """``json_to_recordset(%s::json) AS v(v0 type, v1 type, ...)``: the rows of :func:`pg_json_rows`
    (values of ``table``'s columns ``names``, in that order) as a relation to select, join or insert from.
    ``%s`` is the JSON parameter. Rows that carry JSON documents are read as ``jsonb`` instead: each
    document is then parsed once, not lexed as ``json`` and parsed again into its ``jsonb`` column (half
    the server's time for a batch of outbox emails)."""
    types = [table.c[name].type.compile(dialect=_PG_DIALECT) for name in names]
    columns = ", ".join(f"{alias}{i} {column_type}" for i, column_type in enumerate(types))
    kind = "jsonb" if any(isinstance(table.c[name].type, JSON) for name in names) else "json"
    return f"{kind}_to_recordset(%s::{kind}) AS {alias}({columns})"


def pg_json_rows(columns: Sequence[Sequence[Any]], alias: str = "v") -> str:
    """Column-wise values as the JSON parameter of :func:`pg_recordset`: timestamps must be aware (they
    travel as ISO 8601 with their offset), JSON columns' values as the documents themselves."""
    keys = [f"{alias}{i}" for i in range(len(columns))]
    rows = [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    return orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, open transactions (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=30000",
        "PRAGMA temp_store=MEMORY",
        "PRAGMA cache_size=-65536",
    ):
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock at the start: a deferred transaction that reads and then writes fails with
    # "database is locked" in WAL mode when another writer committed meanwhile.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_store_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for the profile store at ``url``."""
    url = normalize_database_url(url)
    # orjson: JSON columns are (de)serialised for every event; the stdlib was a large share of ingest time.
    kwargs.setdefault("json_serializer", _json_dumps)
    kwargs.setdefault("json_deserializer", orjson.loads)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str) -> Engine:
    """One engine per URL for the life of the process."""
    url = normalize_database_url(url)
    if url not in _ENGINES:
        _ENGINES[url] = create_store_engine(url)
    return _ENGINES[url]


def dispose_engines() -> None:
    for engine in _ENGINES.values():
        engine.dispose()
    _ENGINES.clear()


@contextmanager
def scratch_database(server_url: str, *, prefix: str = "omni_scratch") -> Iterator[str]:
    """A new, empty PostgreSQL database on the server ``server_url`` points at, dropped afterwards.

    Yields its URL. The database ``server_url`` names is only used to connect: its data is never touched.
    Tests and benchmarks use this so they never depend on (or clean up) a shared database.
    """
    admin_url = make_url(normalize_database_url(server_url))
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            dispose_engines()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _alembic_config(engine: Engine):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Create or upgrade the store's schema by applying the Alembic migrations (idempotent)."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()  # type: ignore[arg-type]


class SchemaNotReady(RuntimeError):
    """The store has not been initialised (or is behind the code): run ``omni init``."""


def require_schema(engine: Engine) -> None:
    """Fail with a clear message when the store's schema is missing or older than the code."""
    current = current_revision(engine)
    if current is None:
        raise SchemaNotReady(
            f"the profile store at {engine.url.render_as_string(hide_password=True)} has no schema: "
            "run `omni init` first"
        )
    if current != head_revision():
        raise SchemaNotReady(
            f"the profile store's schema is at revision {current}, the code needs {head_revision()}: "
            "run `omni init` to upgrade it"
        )


# SQLite: rows ANALYZE reads per index (PRAGMA analysis_limit), so a refresh costs about the same
# whatever the table's size; PostgreSQL samples a fixed number of rows (default_statistics_target) anyway.
SQLITE_ANALYSIS_LIMIT = 2000
# When a table's statistics are stale: autovacuum's default rule (autovacuum_analyze_threshold = 50,
# autovacuum_analyze_scale_factor = 0.1): more rows changed than 50 + 10 % of the rows at the last ANALYZE.
ANALYZE_THRESHOLD = 50
ANALYZE_SCALE_FACTOR = 0.1


@contextmanager
def _connection(bind: Engine | Connection | Session) -> Iterator[Connection]:
    """A connection of ``bind``: an engine's in a transaction of its own (committed at the end), a
    connection or session's own, in the caller's transaction (the caller commits)."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    elif isinstance(bind, Session):
        yield bind.connection()
    else:
        yield bind


def refresh_statistics(bind: Engine | Connection | Session, tables: Iterable[str]) -> None:
    """Refresh the planner's statistics of ``tables`` (after a bulk write changed them substantially).

    PostgreSQL: one ``ANALYZE t1, t2, ...`` (samples a fixed number of rows per table, so it costs about
    the same at any size). SQLite: ``ANALYZE`` of each table, bounded by ``PRAGMA analysis_limit``.
    Works inside a transaction on both (ANALYZE, unlike VACUUM, needs none of its own): given an Engine
    it runs in a short transaction of its own; given a Connection or Session, in the caller's, and the
    statistics count once the caller commits. Empty tables are fine; unknown names raise.

    On PostgreSQL it takes a SHARE UPDATE EXCLUSIVE lock on each table until the transaction ends: reads
    and writes go on, another ANALYZE or VACUUM of the same table waits. So call it at the end of the
    write, not before more work in a long transaction.
    """
    names = sorted(set(tables))
    if not names:
        return
    with _connection(bind) as conn:
        quote = conn.dialect.identifier_preparer.quote
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA analysis_limit = {SQLITE_ANALYSIS_LIMIT}")
            try:
                for name in names:
                    conn.exec_driver_sql(f"ANALYZE {quote(name)}")
            finally:
                conn.exec_driver_sql("PRAGMA analysis_limit = 0")
        else:
            conn.exec_driver_sql(f"ANALYZE {', '.join(quote(name) for name in names)}")


def refresh_stale_statistics(bind: Engine | Connection | Session, tables: Iterable[str]) -> list[str]:
    """Refresh the statistics of those of ``tables`` that are stale however the rows arrived (an ingest,
    a restore, a load with plain SQL): never analyzed with rows in them, or changed since the last
    ANALYZE by more than ``50 + 10 %`` of the rows it counted (autovacuum's rule, for servers where
    autovacuum is off or has not run yet). Returns the tables refreshed.

    Cheap when nothing is stale: PostgreSQL reads ``pg_stat_user_tables`` (its counter of rows changed
    since the last ANALYZE); SQLite compares ``sqlite_stat1`` with ``max(rowid)`` of each table (an
    index lookup, not a count).
    """
    names = sorted(set(tables))
    if not names:
        return []
    with _connection(bind) as conn:
        if conn.dialect.name == "sqlite":
            counted: dict[str, float] = {}
            if conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first():
                for table, stat in conn.exec_driver_sql("SELECT tbl, stat FROM sqlite_stat1"):
                    if table in names and stat:
                        counted[table] = max(counted.get(table, 0.0), float(str(stat).split()[0]))
            quote = conn.dialect.identifier_preparer.quote
            stale = []
            for name in names:
                rows = conn.exec_driver_sql(f"SELECT max(rowid) FROM {quote(name)}").scalar() or 0
                if rows and abs(rows - counted.get(name, 0.0)) > ANALYZE_THRESHOLD + ANALYZE_SCALE_FACTOR * (
                    counted.get(name, 0.0)
                ):
                    stale.append(name)
        else:
            quote = conn.dialect.identifier_preparer.quote
            stale = []
            for name, analyzed, changed, reltuples in conn.execute(
                text(
                    # pg_stats, not pg_stat_user_tables.last_analyze: written by ANALYZE in its own
                    # transaction, while the statistics counters reach other sessions up to a second late.
                    "SELECT c.relname, EXISTS (SELECT 1 FROM pg_stats AS p WHERE p.schemaname = "
                    "current_schema() AND p.tablename = c.relname), coalesce(s.n_mod_since_analyze, 0), "
                    "c.reltuples FROM pg_class AS c LEFT JOIN pg_stat_user_tables AS s ON s.relid = c.oid "
                    "WHERE c.relnamespace = to_regnamespace(current_schema()) AND c.relkind IN ('r', 'p') "
                    "AND c.relname = ANY(:names)"
                ),
                {"names": names},
            ):
                if not analyzed:
                    if conn.exec_driver_sql(f"SELECT EXISTS (SELECT 1 FROM {quote(name)})").scalar():
                        stale.append(name)
                elif changed > ANALYZE_THRESHOLD + ANALYZE_SCALE_FACTOR * max(reltuples, 0):
                    stale.append(name)
        if stale:
            refresh_statistics(conn, stale)
    return sorted(stale)


def stale_statistics(bind: Engine | Connection | Session, changed: Mapping[str, int]) -> list[str]:
    """The tables of ``changed`` (table -> rows written, at most) whose statistics a write of that many
    rows makes stale: never analyzed, or more rows changed than ``50 + 10 %`` of the rows their
    statistics count (autovacuum's default rule). Cheap: reads the catalog, not the tables."""
    names = sorted(name for name, rows in changed.items() if rows > 0)
    if not names:
        return []
    with _connection(bind) as conn:
        if conn.dialect.name == "sqlite":
            analyzed = conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_stat1'"
            ).first()
            counted: dict[str, float] = {}
            if analyzed is not None:
                # stat: "rows [rows per distinct key prefix ...]"; one row per index (or table).
                for table, stat in conn.exec_driver_sql("SELECT tbl, stat FROM sqlite_stat1"):
                    if table in names and stat:
                        counted[table] = max(counted.get(table, 0.0), float(str(stat).split()[0]))
        else:
            counted = {
                table: float(reltuples)
                for table, reltuples in conn.execute(
                    text(
                        "SELECT relname, reltuples FROM pg_class "
                        "WHERE relkind IN ('r', 'p') AND relnamespace = to_regnamespace(current_schema()) "
                        "AND relname = ANY(:names)"
                    ),
                    {"names": names},
                )
                # -1: never analyzed nor vacuumed (PostgreSQL 14 and later)
                if reltuples >= 0
            }
    return [
        name
        for name in names
        if name not in counted or changed[name] > ANALYZE_THRESHOLD + ANALYZE_SCALE_FACTOR * counted[name]
    ]
