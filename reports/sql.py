"""The SQL fragments that differ between SQLite and PostgreSQL, for the report's statements.

Timestamps: PostgreSQL keeps ``timestamptz``; SQLite keeps naive-UTC text in one fixed format
(``YYYY-MM-DD HH:MM:SS.ffffff``, :func:`profiles.db.sqlite_timestamp`), which compares as time. A
window is added to a column without leaving that format: on SQLite the whole seconds are shifted with
``strftime`` and the microseconds carried over as text (``strftime`` alone would round them to
milliseconds), so ``later <= earlier + window`` is exact to the microsecond on both databases. Windows
are whole seconds (:func:`whole_seconds`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import literal_column

from profiles.bulk import sql_string
from profiles.db import sqlite_timestamp
from profiles.models import is_touchpoint


def whole_seconds(window: timedelta) -> timedelta:
    """The window rounded to whole seconds (at least one)."""
    return timedelta(seconds=max(1, round(window.total_seconds())))


@dataclass
class Sql:
    """The dialect, the report's bound parameters and the fragments that differ by dialect."""

    dialect: str
    params: dict[str, Any] = field(default_factory=dict)
    _spans: dict[str, int] = field(default_factory=dict)

    @property
    def pg(self) -> bool:
        return self.dialect == "postgresql"

    def ts(self, value: datetime) -> Any:
        return value if self.pg else sqlite_timestamp(value)

    def bind_time(self, name: str, value: datetime) -> None:
        self.params[name] = self.ts(value)

    def bind_span(self, name: str, span: timedelta) -> None:
        """A window (whole seconds) usable as ``plus(expr, name)`` / ``minus(expr, name)``."""
        span = whole_seconds(span)
        self._spans[name] = int(span.total_seconds())
        if self.pg:
            self.params[name] = span

    def bind(self, name: str, value: Any) -> None:
        self.params[name] = value

    def _shift(self, expr: str, span: str, sign: str) -> str:
        if self.pg:
            return f"({expr} {sign} CAST(:{span} AS interval))"
        seconds = self._spans[span]
        shifted = f"strftime('%Y-%m-%d %H:%M:%S', substr({expr}, 1, 19), '{sign}{seconds} seconds')"
        return f"({shifted} || substr({expr}, 20))"

    def plus(self, expr: str, span: str = "window") -> str:
        return self._shift(expr, span, "+")

    def minus(self, expr: str, span: str = "window") -> str:
        return self._shift(expr, span, "-")

    def prop(self, column: str, key_param: str) -> str:
        """The text of ``column``'s top-level property named by the bound parameter ``key_param``."""
        if self.pg:
            return f"({column} ->> CAST(:{key_param} AS text))"
        path = f"{key_param}_path"
        self.params[path] = '$."' + str(self.params[key_param]).replace('"', '\\"') + '"'
        return f"CAST(json_extract({column}, :{path}) AS TEXT)"

    def scan(self, table: str, alias: str) -> str:
        """``table`` read front to back. SQLite would otherwise answer a time range on ``events`` with a
        skip-scan of ``(name, occurred_at)`` and a random read of each row it finds, ten times slower
        than reading the table once; PostgreSQL chooses for itself."""
        return f"{table} {alias}" if self.pg else f"{table} {alias} NOT INDEXED"

    @staticmethod
    def touchpoint(alias: str) -> str:
        """The event ``alias`` is one of the customer's own touchpoints: on a touchpoint channel
        (``omni.core.channels.TOUCHPOINTS``; not ``omni``, where Omni records an operator's decisions) and
        not an event Omni wrote about them (``profiles.models.is_touchpoint``: a message it sent them, staff
        looking them up)."""
        rule = is_touchpoint(literal_column(f"{alias}.name"), literal_column(f"{alias}.channel"))
        return f"({rule.compile(compile_kwargs={'literal_binds': True})})"

    @staticmethod
    def literal(value: str) -> str:
        return sql_string(value)

    @staticmethod
    def literals(values: Any) -> str:
        return ", ".join(sql_string(v) for v in values)
