"""The store side of the outbox connector: the ``outbox`` table, written and read.

:class:`OutboxRecorder` is the writer ``connectors.outbox.OutboxConnector`` records through (a
``connectors.outbox.OutboxWriter``): the engine builds one per tick, ``OutboxRecorder(engine, clock=...)``,
and hands it to ``connectors.get_connector(..., outbox=...)``. :func:`list_outbox` reads the table for
``omni outbox list``.

Recording a batch is one statement on PostgreSQL: ``INSERT ... SELECT FROM json_to_recordset(%s) ON
CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id`` (the batch as one JSON parameter; a concurrent
writer of the same delivery id waits for the other and skips it). On SQLite (in-process: no round trips
to save, and executemany runs in C) the ids already recorded are read first and the new rows inserted.

**Staged** (:meth:`OutboxRecorder.stage`, PostgreSQL): the sequence engine records a batch's outbox rows
in the transaction that records the batch's outcomes, where a provider's answer would be recorded. The
recorder then keeps the rows it is handed (every one reported recorded) until the engine writes them
with :meth:`OutboxRecorder.write_staged`, in that transaction: a delivery is ``sent`` exactly when its
outbox row is in, and a batch costs one transaction and commit fewer. Should that transaction fail, the
rows are not in and the claimed deliveries are recovered as for any provider (email, SMS and push
``unknown``, never resent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omni.core.clock import utcnow
from profiles.bulk import aware, insert_rows
from profiles.db import pg_json_rows, pg_recordset, session_scope
from profiles.models import OutboxMessage

# The columns a recorder writes, in the order of its PostgreSQL statement.
_COLUMNS = ("delivery_id", "channel", "customer_id", "recipient", "template", "subject", "body", "payload")


class OutboxRecorder:
    """Records outbox rows (``connectors.outbox.OutboxRow``) idempotently by delivery id, ``sent_at``
    from ``clock`` (the engine's ``now``)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        self._staged: list[Mapping[str, Any]] | None = None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert the rows whose delivery id is not recorded yet; returns those delivery ids. Staged: keep
        them for :meth:`write_staged`, and return every delivery id."""
        now = self.clock()
        if not rows:
            return set()
        if self._staged is not None:
            self._staged.extend(rows)
            return {row["delivery_id"] for row in rows}
        if self.engine.dialect.name == "postgresql":
            with session_scope(self.engine) as session:
                return _insert_new_pg(session, rows, now)
        try:
            return self._insert_new(rows, now)
        except IntegrityError:
            # Another writer recorded some of them between our SELECT and INSERT: look again once.
            return self._insert_new(rows, now)

    def stage(self) -> bool:
        """From now on keep the rows handed to this recorder for :meth:`write_staged` (PostgreSQL; on SQLite,
        in-process, nothing to save: rows are recorded when handed over). Returns whether it stages."""
        if self.engine.dialect.name == "postgresql" and self._staged is None:
            self._staged = []
        return self._staged is not None

    def take_staged(self) -> list[Mapping[str, Any]]:
        """The rows staged since the last call (none when not staging)."""
        rows, self._staged = (self._staged or []), ([] if self._staged is not None else None)
        return rows

    def write_staged(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Record ``rows`` (from :meth:`take_staged`) in ``session``'s transaction, idempotently by delivery
        id; returns the delivery ids newly recorded."""
        if not rows:
            return set()
        if session.connection().dialect.name != "postgresql":
            raise NotImplementedError("outbox rows are staged on PostgreSQL only")
        return _insert_new_pg(session, rows, self.clock())

    def _insert_new(self, rows: Sequence[Mapping[str, Any]], now: datetime) -> set[str]:
        with session_scope(self.engine) as session:
            existing = _recorded(session, [r["delivery_id"] for r in rows])
            new = [{**r, "sent_at": now} for r in rows if r["delivery_id"] not in existing]
            # Driver-level executemany: SQLAlchemy's per-row processing cost more than the INSERT.
            insert_rows(session, OutboxMessage.__table__, new)
        return {r["delivery_id"] for r in new}

    def __repr__(self) -> str:
        return f"OutboxRecorder(database={self.engine.url.render_as_string(hide_password=True)!r})"


def _insert_new_pg(session: Session, rows: Sequence[Mapping[str, Any]], now: datetime) -> set[str]:
    """PostgreSQL: insert the rows whose delivery id is not recorded yet, in one statement; returns those
    delivery ids."""
    table = OutboxMessage.__table__
    names = (*_COLUMNS, "sent_at")
    columns = [[row[name] for row in rows] for name in _COLUMNS]
    columns.append([aware(now)] * len(rows))
    quoted = ", ".join(f'"{name}"' for name in names)
    inserted = session.connection().exec_driver_sql(
        f"INSERT INTO outbox ({quoted}) SELECT * FROM {pg_recordset(table, names)} "
        "ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id",
        (pg_json_rows(columns),),
    )
    return {row[0] for row in inserted}


def _recorded(session: Session, ids: list[str]) -> set[str]:
    """The delivery ids among ``ids`` already in the outbox (one query; on SQLite written for the
    driver)."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        query = f"SELECT delivery_id FROM outbox WHERE delivery_id IN ({', '.join('?' * len(ids))})"
        return {row[0] for row in connection.exec_driver_sql(query, tuple(ids))}
    table = OutboxMessage.__table__
    return set(session.execute(select(table.c.delivery_id).where(table.c.delivery_id.in_(ids))).scalars())


def list_outbox(
    session: Session, *, channel: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict[str, Any]]:
    """Outbox rows, newest first, as ``{"channel", "customer_id", "to", "template", "subject", "body",
    "sent_at", "delivery_id", "payload"}``."""
    table = OutboxMessage.__table__
    query = select(table).order_by(table.c.sent_at.desc(), table.c.id.desc()).limit(limit).offset(offset)
    if channel:
        query = query.where(table.c.channel == channel)
    return [
        {
            "channel": row.channel,
            "customer_id": row.customer_id,
            "to": row.recipient,
            "template": row.template,
            "subject": row.subject,
            "body": row.body,
            "sent_at": row.sent_at,
            "delivery_id": row.delivery_id,
            "payload": row.payload,
        }
        for row in session.execute(query)
    ]
