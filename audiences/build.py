"""Building audiences: the new member set, and the entered / exited history, inside the database.

A build of one audience is one transaction:

1. the compiled condition runs once, ``INSERT ... SELECT`` into a temporary table of ids;
2. open memberships whose customer is not in it are closed (``UPDATE ... SET exited_at = now
   WHERE NOT EXISTS``);
3. ids without an open membership get a new row (``INSERT ... SELECT ... WHERE NOT EXISTS`` on
   SQLite; ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` against the one-open-row index on
   PostgreSQL), so a customer who leaves and comes back has one row per stay;
4. a row in ``audience_builds`` records size, entered, exited and duration.

Building again at the same ``now`` with the same data changes nothing (not even the build log).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    and_,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from audiences.compiler import compile_audience
from audiences.definitions import AudienceDefinition, dependency_order, load_audiences
from profiles.db import UTCDateTime
from profiles.models import AudienceBuild, AudienceMembership, Customer

memberships = AudienceMembership.__table__
builds = AudienceBuild.__table__
customers = Customer.__table__

_temp_metadata = MetaData()
# Rows of the build in progress; temporary, so private to the connection.
build_members = Table(
    "omni_audience_build_members",
    _temp_metadata,
    Column("customer_id", BigInteger, primary_key=True),
    prefixes=["TEMPORARY"],
)


# INSERT ... SELECT reports its row count only when asked (psycopg otherwise gives -1).
ROWCOUNT = {"preserve_rowcount": True}


class UnknownAudience(KeyError):
    def __str__(self) -> str:
        return f"unknown audience {self.args[0]!r}"


class BuildOrderError(ValueError):
    """``now`` is earlier than the audience's last build: its history would run backwards."""


@dataclass(frozen=True, slots=True)
class BuildResult:
    audience: str
    size: int
    entered: int
    exited: int
    duration: float  # seconds
    built_at: datetime

    @property
    def duration_ms(self) -> int:
        return round(self.duration * 1000)

    def as_dict(self) -> dict[str, int]:
        return {"size": self.size, "entered": self.entered, "exited": self.exited}


def _lock_key(audience: str) -> int:
    return zlib.crc32(f"omni-audience:{audience}".encode()) - (1 << 31)


def _prepare_temp(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            text(
                # Created once per connection (creating it in every transaction costs catalog writes).
                "CREATE TEMPORARY TABLE IF NOT EXISTS omni_audience_build_members "
                "(customer_id BIGINT PRIMARY KEY) ON COMMIT DELETE ROWS"
            )
        )
    else:
        build_members.create(conn, checkfirst=True)
    conn.execute(build_members.delete())


def _start(conn: Connection, name: str, now: datetime) -> Any:
    """Lock the audience (PostgreSQL) and return its last build, refusing a ``now`` before it."""
    if conn.dialect.name == "postgresql":
        # Two builds of the same audience at once would race on the one-open-row index.
        conn.execute(select(func.pg_advisory_xact_lock(_lock_key(name))))
    last = conn.execute(
        select(builds.c.built_at, builds.c.size)
        .where(builds.c.audience == name)
        .order_by(builds.c.built_at.desc(), builds.c.id.desc())
        .limit(1)
    ).first()
    if last is not None and now < last.built_at:
        raise BuildOrderError(
            f"audience {name!r} was last built at {last.built_at.isoformat()}; cannot build it at the "
            f"earlier time {now.isoformat()}"
        )
    return last


def _write_members(
    conn: Connection, definition: AudienceDefinition, *, now: datetime, definitions: Mapping
) -> tuple[int, int, int]:
    """(size, exited, entered): the new member set and the history rows, set-based."""
    name = definition.name
    statement = compile_audience(definition, now=now, definitions=definitions)
    _prepare_temp(conn)
    size = conn.execute(
        insert(build_members).from_select(["customer_id"], statement), execution_options=ROWCOUNT
    ).rowcount
    # (No ANALYZE of the temporary table: PostgreSQL sizes a never-analysed table from its pages, which
    # is enough for the two joins below, and ANALYZE cost more than it saved in the benchmark.)

    open_row = and_(memberships.c.audience == name, memberships.c.exited_at.is_(None))
    exited = conn.execute(
        update(memberships)
        .where(
            open_row,
            ~exists(select(literal(1)).where(build_members.c.customer_id == memberships.c.customer_id)),
        )
        .values(exited_at=now),
        execution_options=ROWCOUNT,
    ).rowcount
    # PostgreSQL: the one-open-row unique index does the "not already a member" check; an anti-join
    # planned against a table the planner believes empty degrades to a scan per row on a first build.
    if conn.dialect.name == "postgresql":
        rows = select(
            literal(name).label("audience"),
            build_members.c.customer_id,
            literal(now, UTCDateTime()).label("entered_at"),
        )
        entered = conn.execute(
            pg_insert(memberships)
            .from_select(["audience", "customer_id", "entered_at"], rows)
            .on_conflict_do_nothing(
                index_elements=["audience", "customer_id"], index_where=memberships.c.exited_at.is_(None)
            ),
            execution_options=ROWCOUNT,
        ).rowcount
    else:
        entered = _insert_new(conn, name, now, open_row)
    if conn.dialect.name != "postgresql":  # PostgreSQL empties it at commit
        conn.execute(build_members.delete())
    return size, exited, entered


def _insert_new(conn: Connection, name: str, now: datetime, open_row: Any) -> int:
    new_ids = select(
        literal(name).label("audience"),
        build_members.c.customer_id,
        literal(now, UTCDateTime()).label("entered_at"),
    ).where(
        ~exists(select(literal(1)).where(open_row, memberships.c.customer_id == build_members.c.customer_id))
    )
    return conn.execute(
        insert(memberships).from_select(["audience", "customer_id", "entered_at"], new_ids),
        execution_options=ROWCOUNT,
    ).rowcount


def _build(
    conn: Connection, definition: AudienceDefinition, *, now: datetime, definitions: Mapping
) -> BuildResult:
    started = time.perf_counter()
    name = definition.name
    last = _start(conn, name, now)
    size, exited, entered = _write_members(conn, definition, now=now, definitions=definitions)
    duration = time.perf_counter() - started
    repeat = last is not None and last.built_at == now and entered == 0 and exited == 0 and last.size == size
    if not repeat:
        conn.execute(
            insert(builds).values(
                audience=name,
                built_at=now,
                size=size,
                entered=entered,
                exited=exited,
                duration_ms=round(duration * 1000),
            )
        )
    return BuildResult(name, size, entered, exited, duration, now)


def _connection_and_commit(target: Engine | Connection | Session) -> tuple[Any, bool]:
    if isinstance(target, Session):
        return target.connection(), False
    return target, isinstance(target, Engine)


def build_audience(
    target: Engine | Connection | Session,
    name: str,
    *,
    now: datetime,
    definitions: Mapping[str, AudienceDefinition] | None = None,
) -> BuildResult:
    """Build one audience at ``now``: write its members and the entered / exited history.

    ``target`` is an engine (the build commits on its own), or a session or connection (the caller's
    transaction; nothing is committed here). ``definitions`` default to :func:`load_audiences`.
    Audiences this one refers to are read as they are (build them first: :func:`build_audiences`).
    """
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: pass a timezone-aware now")
    definitions = load_audiences() if definitions is None else definitions
    if name not in definitions:
        raise UnknownAudience(name)
    conn, own = _connection_and_commit(target)
    if own:
        with conn.begin() as connection:
            return _build(connection, definitions[name], now=now, definitions=definitions)
    return _build(conn, definitions[name], now=now, definitions=definitions)


def build_order(
    definitions: Mapping[str, AudienceDefinition], names: Iterable[str] | None = None
) -> list[str]:
    """``names`` (default: every audience) and the audiences they refer to, dependencies first."""
    names = None if names is None else list(names)
    for name in names or []:
        if name not in definitions:
            raise UnknownAudience(name)
    return dependency_order(definitions, names)


def build_audiences(
    target: Engine | Connection | Session,
    names: Iterable[str] | None = None,
    *,
    now: datetime,
    definitions: Mapping[str, AudienceDefinition] | None = None,
) -> dict[str, BuildResult]:
    """Build ``names`` (default: all) and the audiences they refer to, in dependency order.

    With an engine, each audience is its own transaction.
    """
    definitions = load_audiences() if definitions is None else definitions
    results: dict[str, BuildResult] = {}
    for name in build_order(definitions, names):
        results[name] = build_audience(target, name, now=now, definitions=definitions)
    return results


def last_builds(target: Engine | Connection | Session) -> dict[str, dict[str, Any]]:
    """audience -> its latest build (built_at, size, entered, exited, duration_ms)."""
    latest = (
        select(builds.c.audience, func.max(builds.c.id).label("id")).group_by(builds.c.audience).subquery()
    )
    statement = select(builds).join(latest, latest.c.id == builds.c.id)
    conn, own = _connection_and_commit(target)
    if own:
        with conn.connect() as connection:
            rows = connection.execute(statement).all()
    else:
        rows = conn.execute(statement).all()
    return {
        row.audience: {k: v for k, v in row._mapping.items() if k not in ("id", "audience")} for row in rows
    }


def members(
    target: Engine | Connection | Session, name: str, *, limit: int = 100, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """(total, a page of the current members: customer_id, email, entered_at), oldest entry first."""
    open_rows = and_(memberships.c.audience == name, memberships.c.exited_at.is_(None))
    page = (
        select(memberships.c.customer_id, customers.c.email, memberships.c.entered_at)
        .join(customers, customers.c.id == memberships.c.customer_id)
        .where(open_rows)
        .order_by(memberships.c.entered_at, memberships.c.customer_id)
        .limit(limit)
        .offset(offset)
    )
    total_statement = select(func.count()).select_from(memberships).where(open_rows)
    conn, own = _connection_and_commit(target)
    if own:
        with conn.connect() as connection:
            total = connection.execute(total_statement).scalar_one()
            rows = connection.execute(page).all()
    else:
        total = conn.execute(total_statement).scalar_one()
        rows = conn.execute(page).all()
    return total, [dict(row._mapping) for row in rows]
