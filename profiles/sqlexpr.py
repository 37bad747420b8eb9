"""SQL expressions that differ by dialect, for the store's rules and the audience compiler.

Where SQLite and PostgreSQL need different SQL for the same meaning (set membership, JSON access, text
ordering), a :class:`DialectSwitch` carries both forms and the statement compiles to the right one for
the engine it runs on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Select, exists, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal


class DialectSwitch(ColumnElement):
    """One expression per dialect; ``default`` (the SQLite form) for any dialect not named."""

    # Cacheable: its cache key is its class, both forms and its type, so a build compiles its statement
    # once per process and shape rather than at every run.
    inherit_cache = True
    _traverse_internals = [
        ("default", InternalTraversal.dp_clauseelement),
        ("by_dialect", InternalTraversal.dp_string_clauseelement_dict),
        ("type", InternalTraversal.dp_type),
    ]

    def __init__(self, default: ColumnElement, type_: Any = None, **by_dialect: ColumnElement) -> None:
        self.default = default
        self.by_dialect = by_dialect
        self.type = type_ if type_ is not None else default.type
        # A predicate renders as itself, not as ``(...) = 1`` on SQLite (which would hide an IN from
        # SQLite's planner).
        self._is_implicitly_boolean = isinstance(self.type, Boolean)

    def get_children(self, **kw: Any):
        return [self.default, *self.by_dialect.values()]


@compiles(DialectSwitch)
def _compile_switch(element: DialectSwitch, compiler: Any, **kw: Any) -> str:
    chosen = element.by_dialect.get(compiler.dialect.name, element.default)
    return compiler.process(chosen, **kw)


def in_set(customer_id: Any, ids: Select, *, pg_exists: bool = True) -> ColumnElement:
    """``customer_id`` is among the ids ``ids`` returns (its first column).

    SQLite: ``IN (subquery)``, which it evaluates once into a temporary index. PostgreSQL:
    ``EXISTS`` against the subquery, which it plans as a semi-join (anti-join under NOT) or, inside
    OR, as an indexed lookup, rather than a NOT IN that degrades badly past ``work_mem``.
    """
    sqlite = customer_id.in_(ids)
    if not pg_exists:
        return sqlite
    sub = ids.subquery()
    pg = exists(select(literal(1)).select_from(sub).where(list(sub.c)[0] == customer_id))
    return DialectSwitch(sqlite, Boolean(), postgresql=pg)


def has_text(expr: Any) -> ColumnElement:
    """``expr`` is neither NULL nor empty."""
    return (expr.is_not(None)) & (expr != "")
