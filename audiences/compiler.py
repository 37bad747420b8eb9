"""The audience compiler: a condition becomes one SQLAlchemy ``Select`` of customer ids.

The statement means the same on SQLite and PostgreSQL. Where the two dialects need different SQL
(JSON access, set membership, text ordering), a :class:`profiles.sqlexpr.DialectSwitch` carries both
forms and the dialect picks one when the statement is compiled, so the ``Select`` itself is dialect-free.

``reachable`` and ``consent`` conditions are the store's one rule (:mod:`profiles.consent`), the same
SQL the dispatcher and the renderer use.

Time windows are computed in Python from the explicit ``now`` and bound as parameters (never SQL date
functions), which keeps SQLite's text timestamps and PostgreSQL's ``timestamptz`` comparisons identical.
Every window is inclusive at both ends: ``within: 7d`` matches ``now - 7d <= t <= now``; nothing after
``now`` is ever seen, so a build "as of" an earlier ``now`` ignores later events and orders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    column,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from audiences.definitions import (
    AllOf,
    AnyOf,
    AudienceDefinition,
    AudienceRef,
    CartCondition,
    ChannelsUsedCondition,
    Condition,
    ConsentCondition,
    CountOps,
    DefinitionError,
    EventCondition,
    Not,
    OrderCondition,
    ReachableCondition,
    SqlCondition,
    TraitCondition,
    ValueOps,
    parse_condition,
    referenced_audiences,
)
from profiles.consent import consent_allowed_sql, reachable_sql
from profiles.db import UTCDateTime
from profiles.models import AudienceMembership, Cart, Customer, Event, Order, is_touchpoint
from profiles.segment import ORDER_COMPLETED
from profiles.sqlexpr import DialectSwitch, has_text, in_set

customers = Customer.__table__
events = Event.__table__
carts = Cart.__table__
orders = Order.__table__
memberships = AudienceMembership.__table__


# --- JSON values, typed -----------------------------------------------------------------------------


def _sqlite_path(keys: list[str]) -> str:
    return "$" + "".join(f'."{key}"' for key in keys)


class JsonPath:
    """Typed access to one value inside a JSON column. A value of another type reads as NULL."""

    def __init__(self, column: Any, path: str) -> None:
        self.column = column
        self.keys = path.split(".")
        self.sqlite_path = literal(_sqlite_path(self.keys), String)

    def _pg_value(self) -> Any:
        return func.jsonb_extract_path(self.column, *[literal(k, String) for k in self.keys])

    def _pg_text(self) -> Any:
        return func.jsonb_extract_path_text(self.column, *[literal(k, String) for k in self.keys])

    def _sqlite_type(self) -> Any:
        return func.json_type(self.column, self.sqlite_path)

    def kind(self) -> ColumnElement:
        """'number', 'string', 'boolean', 'array', 'object', 'null', or NULL when missing."""
        sqlite_type = self._sqlite_type()
        sqlite = case(
            (sqlite_type.in_(["integer", "real"]), literal("number")),
            (sqlite_type == "text", literal("string")),
            (sqlite_type.in_(["true", "false"]), literal("boolean")),
            else_=sqlite_type,
        )
        return DialectSwitch(sqlite, String(), postgresql=func.jsonb_typeof(self._pg_value()))

    def text(self) -> ColumnElement:
        sqlite = case(
            (self._sqlite_type() == "text", func.json_extract(self.column, self.sqlite_path)), else_=None
        )
        pg = case((func.jsonb_typeof(self._pg_value()) == "string", self._pg_text()), else_=None)
        return DialectSwitch(sqlite, String(), postgresql=pg)

    def number(self) -> ColumnElement:
        sqlite = case(
            (self._sqlite_type().in_(["integer", "real"]), func.json_extract(self.column, self.sqlite_path)),
            else_=None,
        )
        pg = case((func.jsonb_typeof(self._pg_value()) == "number", cast(self._pg_text(), Float)), else_=None)
        return DialectSwitch(sqlite, Float(), postgresql=pg)

    def boolean(self) -> ColumnElement:
        """'true' / 'false' for a JSON boolean."""
        sqlite_type = self._sqlite_type()
        sqlite = case((sqlite_type.in_(["true", "false"]), sqlite_type), else_=None)
        pg = case((func.jsonb_typeof(self._pg_value()) == "boolean", self._pg_text()), else_=None)
        return DialectSwitch(sqlite, String(), postgresql=pg)

    def typed(self, value: Any) -> tuple[ColumnElement, Any]:
        """The accessor matching ``value``'s type, and ``value`` as it compares there."""
        if isinstance(value, bool):
            return self.boolean(), "true" if value else "false"
        if isinstance(value, int | float):
            return self.number(), float(value)
        return self.text(), str(value)

    def array_has(self, value: Any) -> ColumnElement:
        """The value is an array with an element equal to ``value`` (same type)."""
        each = func.json_each(self.column, self.sqlite_path).table_valued("value", "type")
        if isinstance(value, bool):
            element = each.c.type == ("true" if value else "false")
        elif isinstance(value, int | float):
            element = and_(each.c.type.in_(["integer", "real"]), each.c.value == float(value))
        else:
            element = and_(each.c.type == "text", each.c.value == str(value))
        sqlite = and_(
            self._sqlite_type() == "array", exists(select(literal(1)).select_from(each).where(element))
        )
        pg = and_(
            func.jsonb_typeof(self._pg_value()) == "array",
            self._pg_value().op("@>", return_type=Boolean)(cast(literal(json.dumps([value])), JSONB)),
        )
        return DialectSwitch(sqlite, Boolean(), postgresql=pg)


def _ordered(expr: ColumnElement) -> ColumnElement:
    """Text ordering by code point on both dialects (PostgreSQL's default collation is locale-aware)."""
    return DialectSwitch(expr, expr.type, postgresql=expr.collate("C"))


def _substring(haystack: ColumnElement, needle: str) -> ColumnElement:
    """Case-sensitive substring test, the same on both dialects."""
    return DialectSwitch(
        func.instr(haystack, needle) > 0, Boolean(), postgresql=func.strpos(haystack, needle) > 0
    )


def _compare(expr: ColumnElement, op: str, value: Any, *, text: bool) -> ColumnElement:
    if text:
        expr = _ordered(expr)
    return {
        "gt": lambda: expr > value,
        "gte": lambda: expr >= value,
        "lt": lambda: expr < value,
        "lte": lambda: expr <= value,
    }[op]()


def _json_ops(column: Any, path: str, ops: ValueOps) -> ColumnElement:
    json_value = JsonPath(column, path)
    predicates = []
    for op, value in ops.used().items():
        if op == "exists":
            present = func.coalesce(json_value.kind(), "null") != "null"
            predicates.append(present if value else not_(present))
        elif op in ("eq", "ne"):
            accessor, typed = json_value.typed(value)
            equal = func.coalesce(accessor == typed, false())
            predicates.append(equal if op == "eq" else not_(equal))
        elif op == "in":
            options = []
            for item in value:
                accessor, typed = json_value.typed(item)
                options.append(accessor == typed)
            predicates.append(or_(*options))
        elif op == "contains":
            options = [json_value.array_has(value)]
            if isinstance(value, str):
                options.append(_substring(json_value.text(), value))
            predicates.append(or_(*options))
        else:
            accessor, typed = json_value.typed(value)
            predicates.append(_compare(accessor, op, typed, text=isinstance(typed, str)))
    return and_(*predicates)


def _column_ops(expr: Any, ops: ValueOps, *, text: bool) -> ColumnElement:
    predicates = []
    for op, value in ops.used().items():
        if op == "exists":
            present = has_text(expr) if text else expr.is_not(None)
            predicates.append(present if value else not_(present))
        elif op == "eq":
            predicates.append(func.coalesce(expr == value, false()))
        elif op == "ne":
            predicates.append(not_(func.coalesce(expr == value, false())))
        elif op == "in":
            predicates.append(expr.in_(value))
        elif op == "contains":
            predicates.append(func.coalesce(_substring(expr, str(value)), false()))
        else:
            predicates.append(_compare(expr, op, value, text=text))
    return and_(*predicates)


# --- sets of customers ------------------------------------------------------------------------------


def _count_predicate(expr: Any, ops: CountOps) -> ColumnElement:
    compare = {
        "eq": lambda v: expr == v,
        "ne": lambda v: expr != v,
        "gt": lambda v: expr > v,
        "gte": lambda v: expr >= v,
        "lt": lambda v: expr < v,
        "lte": lambda v: expr <= v,
    }
    return and_(*[compare[k](v) for k, v in ops.used().items()])


def _thresholded(
    customer_col: Any, rows: Select, counted: Any, ops: CountOps, customer_id: Any
) -> ColumnElement:
    """Customers for whom the number of ``rows`` (or of distinct ``counted``) meets ``ops``.

    ``rows`` selects ``customer_col`` with the filters applied. A threshold that zero meets (``eq: 0``,
    ``lt: 2``) is computed as "not among those whose count fails", so customers with no rows at all match.
    """
    used = ops.used()
    if counted is None and used in ({"gte": 1}, {"gt": 0}):
        return in_set(customer_id, rows)
    if counted is None and used in ({"eq": 0}, {"lt": 1}, {"lte": 0}):
        return not_(in_set(customer_id, rows))
    amount = func.count() if counted is None else func.count(counted.distinct())
    grouped = rows.group_by(customer_col)
    if ops.holds(0):
        return not_(in_set(customer_id, grouped.having(not_(_count_predicate(amount, ops)))))
    return in_set(customer_id, grouped.having(_count_predicate(amount, ops)))


def _window(column: Any, now: datetime, within: timedelta | None, between: tuple | None) -> list:
    if within is not None:
        return [column >= now - within, column <= now]
    if between is not None:
        nearest, farthest = between
        return [column >= now - farthest, column <= now - nearest]
    return [column <= now]


class _Compiler:
    def __init__(self, now: datetime, definitions: Mapping[str, AudienceDefinition] | None) -> None:
        if now.tzinfo is None:
            raise ValueError(f"naive datetime {now!r}: pass a timezone-aware now")
        self.now = now
        self.definitions = definitions
        self.customer_id = customers.c.id

    def predicate(self, condition: Condition) -> ColumnElement:
        method = getattr(self, f"_{condition.kind}")
        return method(condition)

    def _all(self, condition: AllOf) -> ColumnElement:
        return and_(*[self.predicate(item) for item in condition.items])

    def _any(self, condition: AnyOf) -> ColumnElement:
        return or_(*[self.predicate(item) for item in condition.items])

    def _not(self, condition: Not) -> ColumnElement:
        return not_(self.predicate(condition.item))

    def _trait(self, condition: TraitCondition) -> ColumnElement:
        if condition.is_profile_field:
            return _column_ops(customers.c[condition.name], condition.ops, text=True)
        return _json_ops(customers.c.traits, condition.name, condition.ops)

    def _event(self, condition: EventCondition) -> ColumnElement:
        filters = [
            events.c.name.in_(condition.name)
            if len(condition.name) > 1
            else events.c.name == condition.name[0],
            *_window(events.c.occurred_at, self.now, condition.within, condition.between),
        ]
        if condition.channel:
            filters.append(events.c.channel.in_(condition.channel))
        for path, ops in condition.where.items():
            filters.append(_json_ops(events.c.properties, path, ops))
        rows = select(events.c.customer_id).where(*filters)
        return _thresholded(events.c.customer_id, rows, None, condition.count, self.customer_id)

    def _cart(self, condition: CartCondition) -> ColumnElement:
        filters = [carts.c.started_at <= self.now]
        if condition.status:
            filters.append(carts.c.status.in_(condition.status))
        if condition.value is not None:
            filters.append(_column_ops(carts.c.value, condition.value, text=False))
        if condition.item_count is not None:
            filters.append(_column_ops(carts.c.item_count, condition.item_count, text=False))
        if condition.idle_for is not None:
            filters.append(carts.c.updated_at <= self.now - condition.idle_for)
        if condition.active_within is not None:
            filters.append(carts.c.updated_at >= self.now - condition.active_within)
            filters.append(carts.c.updated_at <= self.now)
        if condition.no_order_after_activity:
            # At the same instant an order counts as after the activity (it converts the cart).
            later_order = (
                select(literal(1))
                .where(
                    events.c.customer_id == carts.c.customer_id,
                    events.c.name == ORDER_COMPLETED,
                    events.c.occurred_at >= carts.c.updated_at,
                    events.c.occurred_at <= self.now,
                )
                .correlate(carts)
            )
            filters.append(not_(exists(later_order)))
        return in_set(self.customer_id, select(carts.c.customer_id).where(*filters))

    def _order(self, condition: OrderCondition) -> ColumnElement:
        filters = [orders.c.placed_at <= self.now]
        for field in ("channel", "fulfillment", "status"):
            values = getattr(condition, field)
            if values:
                filters.append(orders.c[field].in_(values))
        if condition.total is not None:
            filters.append(_column_ops(orders.c.total, condition.total, text=False))
        if condition.within is not None:
            filters.append(orders.c.placed_at >= self.now - condition.within)
        if condition.older_than is not None:
            filters.append(orders.c.placed_at <= self.now - condition.older_than)
        if condition.ready_for is not None:
            filters.append(orders.c.ready_at <= self.now - condition.ready_for)
        rows = select(orders.c.customer_id).where(*filters)
        return _thresholded(orders.c.customer_id, rows, None, condition.count, self.customer_id)

    def _reachable(self, condition: ReachableCondition) -> ColumnElement:
        return reachable_sql(condition.channel, customers)

    def _consent(self, condition: ConsentCondition) -> ColumnElement:
        return consent_allowed_sql(condition.channel, self.customer_id)

    def _channels_used(self, condition: ChannelsUsedCondition) -> ColumnElement:
        filters = _window(events.c.occurred_at, self.now, condition.within, None)
        # The customer's touchpoints only: the messages Omni sent them are not channels they used.
        filters.append(is_touchpoint(events.c.name))
        if condition.channels:
            filters.append(events.c.channel.in_(condition.channels))
        rows = select(events.c.customer_id).where(*filters)
        return _thresholded(
            events.c.customer_id, rows, events.c.channel, condition.count_ops(), self.customer_id
        )

    def _audience(self, condition: AudienceRef) -> ColumnElement:
        if self.definitions is not None and condition.name not in self.definitions:
            known = ", ".join(sorted(self.definitions)) or "none"
            raise DefinitionError(
                "<condition>", "audience", f"unknown audience {condition.name!r} (known: {known})"
            )
        members = select(memberships.c.customer_id).where(
            memberships.c.audience == condition.name, memberships.c.exited_at.is_(None)
        )
        return in_set(self.customer_id, members)

    def _sql(self, condition: SqlCondition) -> ColumnElement:
        clause = text(condition.query)
        names = set(clause._bindparams)
        if names - {"now"}:
            raise DefinitionError(
                "<condition>",
                "sql",
                f"unknown parameter(s) {', '.join(sorted(names - {'now'}))}: only :now is bound",
            )
        if "now" in names:
            clause = clause.bindparams(bindparam("now", self.now, type_=UTCDateTime()))
        # The query names its column as it likes, so membership is a plain IN on both dialects.
        return in_set(self.customer_id, clause.columns(column("customer_id")), pg_exists=False)


def as_condition(condition: Condition | Mapping[str, Any]) -> Condition:
    if isinstance(condition, Mapping):
        return parse_condition(condition, path="condition")
    return condition


def compile_condition(
    condition: Condition | Mapping[str, Any],
    *,
    now: datetime,
    definitions: Mapping[str, AudienceDefinition] | None = None,
) -> Select:
    """The ids of the customers (never merged-away ones) meeting ``condition`` at ``now``.

    ``condition`` is a parsed condition or a plain mapping as written in YAML. ``audience``
    references read the current members of that audience (its last build); with ``definitions``
    given, an unknown one raises :class:`DefinitionError`.
    """
    parsed = as_condition(condition)
    if definitions is not None:
        for name, path in referenced_audiences(parsed):
            if name not in definitions:
                raise DefinitionError("<condition>", path, f"unknown audience {name!r}")
    predicate = _Compiler(now, definitions).predicate(parsed)
    return select(customers.c.id.label("customer_id")).where(customers.c.merged_into.is_(None), predicate)


def compile_audience(
    definition: AudienceDefinition,
    *,
    now: datetime,
    definitions: Mapping[str, AudienceDefinition] | None = None,
) -> Select:
    return compile_condition(definition.where, now=now, definitions=definitions)


def render_sql(statement: Select, dialect: Any) -> str:
    """The statement as SQL for ``dialect``, with parameters inlined where they can be (for people)."""
    try:
        return str(statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    except Exception:  # noqa: BLE001 - some types cannot be rendered inline; show them as parameters
        compiled = statement.compile(dialect=dialect)
        params = ", ".join(f"{k}={v!r}" for k, v in compiled.params.items())
        return f"{compiled}\n-- parameters: {params}"


__all__ = ["JsonPath", "compile_audience", "compile_condition", "render_sql"]
