"""Driver-level bulk inserts for the high-volume tables (events, identities, carts, orders, rejections).

SQLAlchemy's per-parameter processing cost more than the database's own insert work at ingest volumes,
so rows are serialised here once (JSON with orjson, timestamps in each backend's form) and handed to
the driver's ``executemany``. Only used for plain INSERTs of known columns; everything else goes through
SQLAlchemy as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import JSON, Table
from sqlalchemy.orm import Session

from profiles.db import UTCDateTime, sqlite_timestamp


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: Omni stores timezone-aware UTC timestamps only")
    return value


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _identity(value: Any) -> Any:
    return value


@lru_cache(maxsize=64)
def _plan(
    table: Table, columns: tuple[str, ...], dialect: str
) -> tuple[str, tuple[Callable[[Any], Any], ...]]:
    placeholders = []
    converters: list[Callable[[Any], Any]] = []
    for name in columns:
        column_type = table.c[name].type
        if isinstance(column_type, UTCDateTime):
            converters.append(sqlite_timestamp if dialect == "sqlite" else _aware)
            placeholders.append("?" if dialect == "sqlite" else "%s")
        elif isinstance(column_type, JSON):
            converters.append(_json)
            placeholders.append("?" if dialect == "sqlite" else "%s::jsonb")
        else:
            converters.append(_identity)
            placeholders.append("?" if dialect == "sqlite" else "%s")
    quoted = ", ".join(f'"{name}"' for name in columns)
    sql = f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join(placeholders)})'
    return sql, tuple(converters)


def insert_rows(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts with the same keys) into ``table`` in one driver-level executemany."""
    if not rows:
        return
    columns = tuple(rows[0])
    connection = session.connection()
    dialect = connection.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        connection.execute(table.insert(), list(rows))
        return
    sql, converters = _plan(table, columns, dialect)
    params = [
        tuple(convert(row[name]) for name, convert in zip(columns, converters, strict=True)) for row in rows
    ]
    connection.exec_driver_sql(sql, params)
