"""Driver-level SQL for the per-batch statements of a sequence tick (SQLite and PostgreSQL).

A tick touches every delivery and enrollment several times (create, claim, record, advance). Written
with SQLAlchemy's per-row parameter processing (``executemany`` of a compiled UPDATE, expanding ``IN``
lists), those statements cost more in Python than in the database, so the hot ones are written here
once, in each backend's own form, and handed to the driver:

- ``IN`` lists: ``IN (?, ?, ...)`` on SQLite, ``= ANY(%s::type[])`` (one array parameter) on PostgreSQL;
- many-row UPDATEs: ``executemany`` of one ``UPDATE ... WHERE key = ?`` on SQLite, one
  ``UPDATE ... FROM unnest(...)`` on PostgreSQL;
- many-row INSERTs that skip rows violating a unique key: ``executemany`` of ``INSERT ... ON CONFLICT DO
  NOTHING`` on SQLite, one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` on PostgreSQL.

Values are converted once per column the way the column types do it (timestamps as naive-UTC text on
SQLite, aware datetimes on PostgreSQL), so rows written here read back exactly as rows written through
SQLAlchemy. Statements are plain SQL with no literal ``%``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from operator import itemgetter
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from profiles.bulk import aware as _aware
from profiles.bulk import identity as _identity
from profiles.db import UTCDateTime, sqlite_timestamp

_PG_DIALECT = postgresql.dialect()


# A tick writes the same few timestamps (its ``now``, a wait's end) on thousands of rows: convert each once.
_sqlite_ts = lru_cache(maxsize=4096)(sqlite_timestamp)


@lru_cache(maxsize=256)
def _converter(table: Table, column: str, pg: bool) -> Callable[[Any], Any]:
    if isinstance(table.c[column].type, UTCDateTime):
        return _aware if pg else _sqlite_ts
    return _identity


@lru_cache(maxsize=256)
def _pg_array_type(table: Table, column: str) -> str:
    return f"{table.c[column].type.compile(dialect=_PG_DIALECT)}[]"


class Driver:
    """The session's connection, spoken to in its driver's own SQL (SQLite or PostgreSQL)."""

    def __init__(self, session: Session) -> None:
        self.connection = session.connection()
        name = self.connection.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise NotImplementedError(f"the profile store runs on SQLite or PostgreSQL, not {name}")
        self.pg = name == "postgresql"
        self.mark = "%s" if self.pg else "?"
        self.true = "true" if self.pg else "1"

    # --- values --------------------------------------------------------------------------------------

    def ts(self, value: datetime | None) -> Any:
        """A timestamp as a parameter."""
        return _aware(value) if self.pg else _sqlite_ts(value)

    @staticmethod
    def read_ts(value: Any) -> datetime | None:
        """A timestamp read from the driver, as an aware UTC datetime (what ``UTCDateTime`` returns)."""
        if value is None:
            return None
        if isinstance(value, str):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def unindexed(self, column: str) -> str:
        """``column`` in a condition that must not pick the index on it. Given ``id IN (...) AND status =
        'pending'``, SQLite without statistics, and PostgreSQL with statistics from when the table was
        small, take the index on the status and read every pending row, each batch of a tick; what a
        batch looks up is its keys. ``+column`` (SQLite) and ``column || ''`` (PostgreSQL) are the same
        value, and rule the index out."""
        return f"({column} || '')" if self.pg else f"+{column}"

    def in_(self, values: Sequence[Any], array_type: str = "bigint[]") -> tuple[str, list[Any]]:
        """``(sql, params)`` of a membership test against ``values`` (to follow a column name)."""
        if self.pg:
            return f"= ANY({self.mark}::{array_type})", [list(values)]
        return f"IN ({', '.join('?' * len(values))})", list(values)

    # --- statements ----------------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.connection.exec_driver_sql(sql, tuple(params))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row a query returns, fetched at once (iterating fetches them one call at a time)."""
        return self.connection.exec_driver_sql(sql, tuple(params)).all()

    def _convert(self, table: Table, names: Sequence[str], columns: Sequence[Sequence[Any]]) -> list[Any]:
        """Each column's values as the driver takes them (converted column by column: a call per value
        only where the type needs one)."""
        converted: list[Any] = []
        for name, values in zip(names, columns, strict=True):
            convert = _converter(table, name, self.pg)
            converted.append(values if convert is _identity else list(map(convert, values)))
        return converted

    def update_many(
        self,
        table: Table,
        match: Sequence[str],
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        where: str = "",
    ) -> int:
        """For each row ``(*match values, *column values)``: ``UPDATE table SET columns WHERE match [AND
        where]``. ``where`` is a fixed condition on the table's columns (no parameters). Returns how many
        rows were updated."""
        rows = list(rows)
        if not rows:
            return 0
        names = [*match, *columns]
        values = self._convert(table, names, list(zip(*rows, strict=True)))
        extra = f" AND {where}" if where else ""
        n = len(match)
        if self.pg:
            unnest = ", ".join(f"%s::{_pg_array_type(table, name)}" for name in names)
            aliases = ", ".join(f"v{i}" for i in range(len(names)))
            assignments = ", ".join(f'"{name}" = v.v{n + i}' for i, name in enumerate(columns))
            conditions = " AND ".join(f'"{table.name}"."{name}" = v.v{i}' for i, name in enumerate(match))
            return self.connection.exec_driver_sql(
                f'UPDATE "{table.name}" SET {assignments} FROM unnest({unnest}) AS v({aliases}) '
                f"WHERE {conditions}{extra}",
                tuple(list(column) for column in values),
            ).rowcount
        # SQLite: one UPDATE per row (executemany), SET parameters first, then the WHERE ones.
        assignments = ", ".join(f'"{name}" = ?' for name in columns)
        conditions = " AND ".join(f'"{name}" = ?' for name in match)
        return self.connection.exec_driver_sql(
            f'UPDATE "{table.name}" SET {assignments} WHERE {conditions}{extra}',
            list(zip(*values[n:], *values[:n], strict=True)),
        ).rowcount

    def insert_ignore(self, table: Table, rows: Sequence[dict[str, Any]]) -> int:
        """INSERT ``rows`` (dicts with the same keys), skipping those that violate a unique constraint;
        returns how many were inserted."""
        if not rows:
            return 0
        names = list(rows[0])
        getter = itemgetter(*names)
        tuples = map(getter, rows) if len(names) > 1 else ((getter(row),) for row in rows)
        values = self._convert(table, names, list(zip(*tuples, strict=True)))
        quoted = ", ".join(f'"{name}"' for name in names)
        if self.pg:
            unnest = ", ".join(f"%s::{_pg_array_type(table, name)}" for name in names)
            result = self.connection.exec_driver_sql(
                f'INSERT INTO "{table.name}" ({quoted}) SELECT * FROM unnest({unnest}) '
                "ON CONFLICT DO NOTHING",
                tuple(list(column) for column in values),
            )
            return result.rowcount
        result = self.connection.exec_driver_sql(
            f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join("?" * len(names))}) '
            "ON CONFLICT DO NOTHING",
            list(zip(*values, strict=True)),
        )
        return result.rowcount
