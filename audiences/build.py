"""Building audiences: the new member set, and the entered / exited history, inside the database.

A build of one audience is one transaction, and its compiled condition runs once:

- PostgreSQL: ``CREATE TEMPORARY TABLE ... AS`` the condition (so the query may use parallel workers,
  which any statement that writes forbids), then one statement: a FULL JOIN of those ids with the
  audience's open memberships gives who enters and who leaves, and data-modifying CTEs close the open
  rows of those who left (``exited_at = now``, by ctid) and insert a row for each newcomer
  (``entered_at = now``). When the audience has no open row (a first build), the query sorts the ids
  (in its workers) and they are inserted straight from the temporary table, in that order.
- SQLite (no data-modifying CTEs): the ids go into a temporary table, then ``UPDATE ... WHERE NOT
  EXISTS`` closes and ``INSERT ... SELECT ... WHERE NOT EXISTS`` opens rows. When the audience has no
  open row (a first build), the ids are inserted straight from the condition.

Before that, two short statements: the audience's lock (PostgreSQL), then its last build and whether it
has open rows, read together.

A customer who leaves and comes back has one row per stay. A row in ``audience_builds`` records size,
entered, exited and duration.

On PostgreSQL a build that owns its transaction (``target`` an engine) commits with
``synchronous_commit = off`` (``SET LOCAL``: that transaction only): its commit does not wait for the
write-ahead log to reach the disk. A build is derived data, recomputed from the store at every run, so
a crash right after its commit (within about three ``wal_writer_delay``, 0.6 s by default) may lose
it, build log row included, and the next run simply builds the audience again. Anything that read the
build and then committed itself (an enrollment, say) makes the build durable too, since the log is
written in order. A build in the caller's transaction (a session or connection) leaves its settings
alone: its other writes keep the durability the caller chose.

Building again at the same ``now`` with the same data changes nothing (not even the build log).

Building at a ``now`` earlier than the audience's last build (after a preview with ``--now`` in the
future) is allowed: the history after ``now`` is undone first (stays that began later are deleted,
stays that ended later are open again, later builds leave the log), then the build runs as usual. So
the latest build in time always wins, and memberships are correct as of the build's own ``now``; a
future preview is superseded by the next real-time build instead of blocking it.
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
    Integer,
    MetaData,
    Select,
    Table,
    and_,
    any_,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.visitors import InternalTraversal

from audiences.compiler import compile_audience
from audiences.definitions import AudienceDefinition, dependency_order, load_audiences
from profiles.db import UTCDateTime, refresh_stale_statistics
from profiles.models import AudienceBuild, AudienceMembership, Customer

memberships = AudienceMembership.__table__
builds = AudienceBuild.__table__
customers = Customer.__table__

_temp_metadata = MetaData()
# SQLite: the ids of the build in progress; temporary, so private to the connection.
build_members = Table(
    "omni_audience_build_members",
    _temp_metadata,
    # INTEGER PRIMARY KEY on SQLite: the rowid itself, so no separate index to maintain.
    Column("customer_id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
    prefixes=["TEMPORARY"],
)

# PostgreSQL: the ids of the build in progress, created by CREATE TEMPORARY TABLE ... AS and dropped
# by the build (ON COMMIT DROP if the transaction ends first).
new_members = Table("omni_audience_build_new", _temp_metadata, Column("customer_id", BigInteger))


class _CreateTempAs(Executable, ClauseElement):
    """``CREATE TEMPORARY TABLE name ON COMMIT DROP AS select`` (PostgreSQL)."""

    inherit_cache = True
    _traverse_internals = [
        ("name", InternalTraversal.dp_string),
        ("select", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, name: str, select: Select) -> None:
        self.name = name
        self.select = select


@compiles(_CreateTempAs)
def _compile_create_temp_as(element: _CreateTempAs, compiler: Any, **kw: Any) -> str:
    return f"CREATE TEMPORARY TABLE {element.name} ON COMMIT DROP AS {compiler.process(element.select, **kw)}"


# INSERT ... SELECT reports its row count only when asked (psycopg otherwise gives -1).
ROWCOUNT = {"preserve_rowcount": True}


class UnknownAudience(KeyError):
    def __str__(self) -> str:
        return f"unknown audience {self.args[0]!r}"


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
    build_members.create(conn, checkfirst=True)
    conn.execute(build_members.delete())


def _start(conn: Connection, name: str, now: datetime, *, own_transaction: bool) -> tuple[Any, bool]:
    """Lock the audience (PostgreSQL); rewind any history after ``now`` (see :func:`_rewind`); return
    its last build (or None) and whether it has open rows."""
    if conn.dialect.name == "postgresql":
        # Two builds of the same audience at once would race on the one-open-row index. The lock is a
        # statement of its own: the reads below must take their snapshot after it is granted.
        lock = [func.pg_advisory_xact_lock(_lock_key(name))]
        if own_transaction:
            # SET LOCAL, in the same round trip (see the module docstring).
            lock.append(func.set_config("synchronous_commit", "off", True))
        conn.execute(select(*lock))
    row = _last_build(conn, name)
    if row.built_at is not None and now < row.built_at:
        _rewind(conn, name, now)
        row = _last_build(conn, name)
    return (row if row.built_at is not None else None), bool(row.has_open)


def _last_build(conn: Connection, name: str) -> Any:
    """(built_at, size, has_open) of the audience's last build, in one round trip; built_at is None
    before the first build."""
    last = (
        select(builds.c.built_at, builds.c.size)
        .where(builds.c.audience == name)
        .order_by(builds.c.built_at.desc(), builds.c.id.desc())
        .limit(1)
        .subquery("omni_last")
    )
    one = select(literal(1).label("one")).subquery("omni_one")
    has_open = exists(select(literal(1)).where(_open_rows(name)))
    return conn.execute(
        select(last.c.built_at, last.c.size, has_open.label("has_open")).select_from(
            one.outerjoin(last, true())
        )
    ).one()


def _rewind(conn: Connection, name: str, now: datetime) -> None:
    """Undo the audience's history after ``now``: what builds later than ``now`` wrote (a preview with
    ``--now`` in the future, or a machine whose clock ran ahead).

    Stays that began after ``now`` are deleted, stays that ended after ``now`` are open again, and the
    later builds leave the build log. The memberships are then exactly what the builds up to ``now``
    left, so the build at ``now`` diffs against them as usual: every ``entered_at`` and ``exited_at``
    stays at or before the latest build, and a customer keeps at most one open row (their stays never
    overlap, so at most one of them spans ``now``). Rare, so no index serves it (the statements read
    the audience's rows in full)."""
    at = literal(now, UTCDateTime())
    conn.execute(memberships.delete().where(memberships.c.audience == name, memberships.c.entered_at > at))
    conn.execute(
        update(memberships)
        .where(memberships.c.audience == name, memberships.c.exited_at > at)
        .values(exited_at=None)
    )
    conn.execute(builds.delete().where(builds.c.audience == name, builds.c.built_at > at))


def _write_members(
    conn: Connection,
    definition: AudienceDefinition,
    *,
    now: datetime,
    definitions: Mapping,
    has_open_rows: bool,
) -> tuple[int, int, int]:
    """(size, exited, entered): the new member set and the history rows, set-based."""
    statement = compile_audience(definition, now=now, definitions=definitions)
    if conn.dialect.name == "postgresql":
        return _write_members_postgresql(conn, definition.name, statement, now, first=not has_open_rows)
    return _write_members_sqlite(conn, definition.name, statement, now, first=not has_open_rows)


def _open_rows(name: str) -> Any:
    # Served by the partial unique index uq_audience_memberships_open (audience, customer_id).
    return and_(memberships.c.audience == name, memberships.c.exited_at.is_(None))


def _new_rows(name: str, ids: Any, now: datetime) -> Select:
    return select(literal(name).label("audience"), ids, literal(now, UTCDateTime()).label("entered_at"))


def _write_members_postgresql(
    conn: Connection, name: str, statement: Select, now: datetime, *, first: bool
) -> tuple[int, int, int]:
    """Two statements.

    1. ``CREATE TEMPORARY TABLE ... AS`` the audience query: unlike ``INSERT ... SELECT`` (or any
       statement that writes), it may run the query with parallel workers, as the query alone would.
    2. When the audience has no open row (a first build, or an audience that was empty), every id
       enters: one ``INSERT ... SELECT`` of those ids, which statement 1 sorted. Otherwise one
       statement, one snapshot: a FULL JOIN of those ids with the audience's open rows (which
       PostgreSQL can only run as a hash or merge join, so no estimate turns it into a scan per row)
       gives who enters and who leaves; two data-modifying CTEs close and open the rows.
    """
    if first:
        # Every id enters, in id order (ids are numbered as customers are, so the inserts into the
        # one-open-row index stay local). The query sorts them in its parallel workers, rather than the
        # INSERT alone after it; the temporary table, written and then read in that order (a new table
        # read by a sequential scan), hands them over sorted. The order only matters for speed.
        statement = statement.order_by(None).order_by(statement.selected_columns[0])
    size = conn.execute(_CreateTempAs(new_members.name, statement), execution_options=ROWCOUNT).rowcount
    new = new_members.c.customer_id
    if first:
        opened = insert(memberships).from_select(
            ["audience", "customer_id", "entered_at"], _new_rows(name, new, now)
        )
        exited, entered = 0, conn.execute(opened, execution_options=ROWCOUNT).rowcount
    else:
        exited, entered = conn.execute(_diff_statement(name, now)).one()
    # Dropped now rather than at commit: a caller's transaction may build several audiences.
    conn.execute(text(f"DROP TABLE {new_members.name}"))
    return size, exited, entered


def _diff_statement(name: str, now: datetime) -> Select:
    """(exited, entered): closes the open rows of those not in the build's ids, opens one for each
    newcomer."""
    new = new_members.c.customer_id
    row = literal_column(f"{memberships.name}.ctid")
    open_rows = (
        select(memberships.c.customer_id, row.label("open_tid")).where(_open_rows(name)).subquery("omni_open")
    )
    diff = (
        select(new.label("entering"), open_rows.c.open_tid.label("leaving"))
        .select_from(new_members.outerjoin(open_rows, open_rows.c.customer_id == new, full=True))
        .where(or_(new.is_(None), open_rows.c.customer_id.is_(None)))
        .cte("omni_diff")
    )
    # The rows to close by their physical address (ctid), found by the FULL JOIN above in the same
    # snapshot: a TID scan reads those rows only. (With the audience filters repeated here, stale
    # statistics could pick a scan of all the audience's open rows instead.)
    leaving = select(diff.c.leaving).where(diff.c.leaving.is_not(None)).scalar_subquery()
    closed = (
        update(memberships)
        .where(row == any_(func.array(leaving)))
        .values(exited_at=now)
        .returning(memberships.c.customer_id)
        .cte("omni_closed")
    )
    opened = (
        insert(memberships)
        .from_select(
            ["audience", "customer_id", "entered_at"],
            # In id order, as in a first build.
            _new_rows(name, diff.c.entering, now)
            .where(diff.c.entering.is_not(None))
            .order_by(diff.c.entering),
        )
        .returning(memberships.c.customer_id)
        .cte("omni_opened")
    )
    return select(
        select(func.count()).select_from(closed).scalar_subquery(),
        select(func.count()).select_from(opened).scalar_subquery(),
    )


def _write_members_sqlite(
    conn: Connection, name: str, statement: Select, now: datetime, *, first: bool
) -> tuple[int, int, int]:
    """No data-modifying CTEs on SQLite: the ids go to a temporary table first, unless the audience has
    no open row (a first build): then every id enters, straight from the query."""
    if first:
        ids = statement.subquery("omni_new")
        entered = conn.execute(
            insert(memberships).from_select(
                ["audience", "customer_id", "entered_at"],
                _new_rows(name, ids.c.customer_id, now).order_by(ids.c.customer_id),
            ),
            execution_options=ROWCOUNT,
        ).rowcount
        return entered, 0, entered
    _prepare_temp(conn)
    size = conn.execute(
        insert(build_members).from_select(["customer_id"], statement), execution_options=ROWCOUNT
    ).rowcount
    exited = conn.execute(
        update(memberships)
        .where(
            _open_rows(name),
            ~exists(select(literal(1)).where(build_members.c.customer_id == memberships.c.customer_id)),
        )
        .values(exited_at=now),
        execution_options=ROWCOUNT,
    ).rowcount
    entered = conn.execute(
        insert(memberships).from_select(
            ["audience", "customer_id", "entered_at"],
            _new_rows(name, build_members.c.customer_id, now).where(
                ~exists(
                    select(literal(1)).where(
                        _open_rows(name), memberships.c.customer_id == build_members.c.customer_id
                    )
                )
            ),
        ),
        execution_options=ROWCOUNT,
    ).rowcount
    conn.execute(build_members.delete())
    return size, exited, entered


def _build(
    conn: Connection,
    definition: AudienceDefinition,
    *,
    now: datetime,
    definitions: Mapping,
    own_transaction: bool = False,
) -> BuildResult:
    started = time.perf_counter()
    name = definition.name
    last, has_open_rows = _start(conn, name, now, own_transaction=own_transaction)
    size, exited, entered = _write_members(
        conn, definition, now=now, definitions=definitions, has_open_rows=has_open_rows
    )
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

    ``target`` is an engine (the build commits on its own; on PostgreSQL without waiting for the disk,
    see the module docstring), or a session or connection (the caller's transaction, whose settings
    the build leaves alone; nothing is committed here). ``definitions`` default to the built-in
    audiences (:func:`load_audiences`).
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
            return _build(
                connection, definitions[name], now=now, definitions=definitions, own_transaction=True
            )
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
    # Plan on real numbers: a store loaded without Omni's ingest (a restore, plain SQL), or on a server
    # whose autovacuum is off, may have no statistics, and every estimate is then 1 row.
    refresh_stale_statistics(target, AUDIENCE_SOURCES)
    results: dict[str, BuildResult] = {}
    for name in build_order(definitions, names):
        results[name] = build_audience(target, name, now=now, definitions=definitions)
    # What the builds wrote is read next (enrollment joins the memberships).
    refresh_stale_statistics(target, ("audience_memberships", "audience_builds"))
    return results


# The tables an audience's statement reads.
AUDIENCE_SOURCES = (
    "customers",
    "identities",
    "events",
    "carts",
    "orders",
    "consents",
    "stores",
    "audience_memberships",
)


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
