"""Driver-level SQL for the per-batch statements of a sequence tick (SQLite and PostgreSQL).

A tick touches every delivery and enrollment several times (create, claim, record, advance). Written
with SQLAlchemy's per-row parameter processing (``executemany`` of a compiled UPDATE, expanding ``IN``
lists), those statements cost more in Python than in the database, so the hot ones are written here
once, in each backend's own form, and handed to the driver:

- ``IN`` lists: ``IN (?, ?, ...)`` on SQLite, ``= ANY(%s::type[])`` on PostgreSQL, the array bound as
  one text literal (:func:`profiles.db.pg_array_literal`);
- many-row UPDATEs: ``executemany`` of one ``UPDATE ... WHERE key = ?`` on SQLite, one
  ``UPDATE ... FROM json_to_recordset(%s)`` on PostgreSQL;
- many-row INSERTs that skip rows violating a unique key: ``executemany`` of ``INSERT ... ON CONFLICT DO
  NOTHING`` on SQLite, one ``INSERT ... SELECT FROM json_to_recordset(%s) ON CONFLICT DO NOTHING`` on
  PostgreSQL.

On PostgreSQL a batch's rows travel as ONE JSON parameter (:func:`profiles.db.pg_json_rows`, serialised
by orjson) rather than as one array parameter per column, which psycopg dumps value by value in Python
(ten times the process's time for a 1,000-row UPDATE, measured), and one statement per batch is one
round trip. The join to the rows is a lookup by key whatever the table's statistics say.

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

from sqlalchemy import BigInteger, ColumnElement, Table, Text, any_, bindparam, cast
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from profiles.bulk import aware as _aware
from profiles.bulk import identity as _identity
from profiles.db import UTCDateTime, pg_array_literal, pg_json_rows, pg_recordset, sqlite_timestamp

# A tick writes the same few timestamps (its ``now``, a wait's end) on thousands of rows: convert each once.
_sqlite_ts = lru_cache(maxsize=4096)(sqlite_timestamp)


@lru_cache(maxsize=256)
def _converter(table: Table, column: str, pg: bool) -> Callable[[Any], Any]:
    if isinstance(table.c[column].type, UTCDateTime):
        return _aware if pg else _sqlite_ts
    return _identity


_pg_recordset = lru_cache(maxsize=256)(pg_recordset)


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
            return f"= ANY({self.mark}::{array_type})", [pg_array_literal(values)]
        return f"IN ({', '.join('?' * len(values))})", list(values)

    def among(self, column: Any, values: Sequence[int]) -> ColumnElement:
        """``column IN values`` (integers) for a SQLAlchemy statement. On PostgreSQL ``column =
        ANY(CAST(%s AS BIGINT[]))`` with one text parameter: an expanding ``IN`` renders a placeholder per
        value, so each 1,000-value statement was a new SQL text for psycopg to parse (it caches short
        ones only) and for the server to plan."""
        if self.pg:
            return column == any_(
                cast(bindparam(None, pg_array_literal(values), type_=Text), ARRAY(BigInteger))
            )
        return column.in_(values)

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
            if where:
                # Opaque to the planner (a CASE gets a default selectivity): as a plain condition,
                # statistics from before this tick moved the rows (none parked yet, say) made it expect
                # one matching row, and it rescanned the JSON rows once per row of the table (a 30,000-
                # customer tick spent 147 s in one such UPDATE). So the table is costed at its size and
                # joined to the rows by key.
                extra = f" AND CASE WHEN {where} THEN true END"
            assignments = ", ".join(f'"{name}" = v.v{n + i}' for i, name in enumerate(columns))
            conditions = " AND ".join(f'"{table.name}"."{name}" = v.v{i}' for i, name in enumerate(match))
            return self.connection.exec_driver_sql(
                f'UPDATE "{table.name}" SET {assignments} FROM {_pg_recordset(table, tuple(names))} '
                f"WHERE {conditions}{extra}",
                (pg_json_rows(values),),
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
            result = self.connection.exec_driver_sql(
                f'INSERT INTO "{table.name}" ({quoted}) SELECT * FROM {_pg_recordset(table, tuple(names))} '
                "ON CONFLICT DO NOTHING",
                (pg_json_rows(values),),
            )
            return result.rowcount
        result = self.connection.exec_driver_sql(
            f'INSERT INTO "{table.name}" ({quoted}) VALUES ({", ".join("?" * len(names))}) '
            "ON CONFLICT DO NOTHING",
            list(zip(*values, strict=True)),
        )
        return result.rowcount
