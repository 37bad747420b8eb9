"""Audience definitions: the YAML schema, its validation and loading.

One audience a file (``audiences/<name>.yaml``)::

    name: cart_abandoners
    description: Open cart idle for an hour, nothing bought since.
    where:
      all:
        - cart: {status: open, value: {gt: 0}, idle_for: 1h, no_order_after_activity: true}
        - reachable: email

A condition is a mapping with exactly one *kind* key (``trait``, ``event``, ``cart``, ``order``,
``reachable``, ``consent``, ``channels_used``, ``audience``, ``sql``, or ``all`` / ``any`` / ``not``).
Kinds whose subject is a name take it as the kind's value and their options beside it
(``{event: Order Completed, within: 7d}``); the others take a mapping (``{cart: {status: open}}``).

Everything is checked at load (by :mod:`omni.core.definitions`, the loader of every kind of definition):
an invalid definition raises :class:`DefinitionError` naming the file, the path inside it
(``where.all[1].event.within``) and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from omni.core.channels import CONSENT_CHANNELS, TOUCHPOINTS
from omni.core.definitions import (
    DefinitionError,
    DefinitionModel,
    Duration,
    Text,
    first_error,
    format_loc,
    load_folder,
    parse_duration,
    snake_case,
    validate_definition,
)
from profiles.models import CartStatus, Fulfillment, OrderStatus

Scalar = str | int | float | bool

# A key of a dotted path into a JSON document (traits, properties).
PATH_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_$@\- ]+$")

# Profile columns a ``trait`` condition can name directly; every other name is a key of ``traits``.
PROFILE_FIELDS = ("email", "phone", "first_name", "last_name", "locale", "timezone", "home_store_id")
CART_STATUSES = tuple(status.value for status in CartStatus)
ORDER_STATUSES = tuple(status.value for status in OrderStatus)
FULFILLMENTS = tuple(fulfillment.value for fulfillment in Fulfillment)


# --- operators --------------------------------------------------------------------------------------


class ValueOps(DefinitionModel):
    """Comparisons on a value (a profile field, a trait, an event property). Several are ANDed.

    The type of the value written decides the comparison: a number compares with numbers only, a
    string with strings only, a boolean with booleans only. ``ne`` is the negation of ``eq``: a
    missing value is "not equal". ``contains`` is a case-sensitive substring of a string, or an
    element of an array.
    """

    eq: Scalar | None = None
    ne: Scalar | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in")
    gt: int | float | str | None = None
    gte: int | float | str | None = None
    lt: int | float | str | None = None
    lte: int | float | str | None = None
    exists: bool | None = None
    contains: Scalar | None = None

    @field_validator("gt", "gte", "lt", "lte", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a comparison needs a number or a string, not true/false")
        return value

    @field_validator("in_")
    @classmethod
    def _non_empty(cls, value: list | None) -> list | None:
        if value is not None and not value:
            raise ValueError("'in' needs at least one value")
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> ValueOps:
        if not self.used():
            raise ValueError(
                "no operator: expected one or more of eq, ne, in, gt, gte, lt, lte, exists, contains"
            )
        return self

    def used(self) -> dict[str, Any]:
        return {("in" if k == "in_" else k): v for k, v in self.__dict__.items() if v is not None}


class CountOps(DefinitionModel):
    """A threshold on a count (of events, orders, channels). ``{eq: 0}`` means "none"."""

    eq: int | None = Field(default=None, ge=0)
    ne: int | None = Field(default=None, ge=0)
    gt: int | None = Field(default=None, ge=0)
    gte: int | None = Field(default=None, ge=0)
    lt: int | None = Field(default=None, ge=0)
    lte: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _at_least_one(self) -> CountOps:
        if not self.used():
            raise ValueError("no threshold: expected one or more of eq, ne, gt, gte, lt, lte")
        return self

    def used(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def holds(self, n: int) -> bool:
        checks = {
            "eq": lambda v: n == v,
            "ne": lambda v: n != v,
            "gt": lambda v: n > v,
            "gte": lambda v: n >= v,
            "lt": lambda v: n < v,
            "lte": lambda v: n <= v,
        }
        return all(checks[k](v) for k, v in self.used().items())


AT_LEAST_ONE = CountOps(gte=1)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_path(path: str) -> str:
    keys = path.split(".")
    for key in keys:
        if not PATH_KEY_PATTERN.match(key):
            raise ValueError(
                f"bad path {path!r}: keys are letters, digits, '_', '-', '$', '@' or spaces, joined by '.'"
            )
    return path


def _numeric_ops(ops: ValueOps | None, field: str) -> ValueOps | None:
    """Numeric columns (cart value, item count, order total) compare with numbers only."""
    if ops is not None:
        for op, value in ops.used().items():
            if op in ("exists", "contains"):
                raise ValueError(f"{field} is a number: {op} does not apply")
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
                raise ValueError(f"{field} is a number: {op} needs a number")
    return ops


def _value_ops(value: Any) -> Any:
    """A filter value: a mapping of operators, or a plain value meaning ``eq``."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, list):
        return {"in": value}
    return {"eq": value}


class Window(DefinitionModel):
    """A time window relative to ``now``: ``within: 7d`` or ``between: [30d, 7d]`` (both ends inclusive)."""

    within: Duration | None = None
    between: tuple[timedelta, timedelta] | None = None

    @field_validator("between", mode="before")
    @classmethod
    def _between(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise ValueError("between needs two durations, e.g. [30d, 7d]")
        return tuple(sorted(parse_duration(v) for v in value))

    @model_validator(mode="after")
    def _one(self) -> Window:
        if self.within is not None and self.between is not None:
            raise ValueError("give either within or between, not both")
        return self


# --- condition kinds --------------------------------------------------------------------------------


class TraitCondition(DefinitionModel):
    kind: Literal["trait"] = "trait"
    name: str
    ops: ValueOps

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_path(value.removeprefix("traits."))

    @model_validator(mode="after")
    def _profile_text(self) -> TraitCondition:
        if self.is_profile_field:
            for op, value in self.ops.used().items():
                values = value if isinstance(value, list) else [value]
                if op != "exists" and any(not isinstance(v, str) for v in values):
                    raise ValueError(f"{self.name} is text: {op} needs a string")
        return self

    @property
    def is_profile_field(self) -> bool:
        return self.name in PROFILE_FIELDS


class EventCondition(Window):
    kind: Literal["event"] = "event"
    name: list[str]
    where: dict[str, ValueOps] = Field(default_factory=dict)
    channel: list[Literal[TOUCHPOINTS]] | None = None  # type: ignore[valid-type]
    count: CountOps = AT_LEAST_ONE

    _names = field_validator("name", "channel", mode="before")(classmethod(lambda cls, v: _one_or_many(v)))

    @field_validator("where", mode="before")
    @classmethod
    def _where(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ValueError("where needs a mapping of property paths to values or operators")
        return {_check_path(str(k)): _value_ops(v) for k, v in value.items()}


class CartCondition(DefinitionModel):
    """A cart of the customer that meets every filter given."""

    kind: Literal["cart"] = "cart"
    status: list[Literal[CART_STATUSES]] | None = None  # type: ignore[valid-type]
    value: ValueOps | None = None
    item_count: ValueOps | None = None
    idle_for: Duration | None = None  # last cart activity at least this long before now
    active_within: Duration | None = None  # last cart activity at most this long before now
    no_order_after_activity: bool = False  # no Order Completed (any channel) at or after the last activity

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # ``value_gte: 1`` (as in the design) is ``value: {gte: 1}``.
        if isinstance(data, Mapping):
            data = dict(data)
            for field in ("value", "item_count"):
                for op in ("eq", "ne", "gt", "gte", "lt", "lte"):
                    short = f"{field}_{op}"
                    if short in data:
                        ops = dict(data.get(field) or {})
                        ops[op] = data.pop(short)
                        data[field] = ops
        return data

    _status = field_validator("status", mode="before")(classmethod(lambda cls, v: _one_or_many(v)))

    @field_validator("value", "item_count", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return None if value is None else _value_ops(value)

    @model_validator(mode="after")
    def _numeric(self) -> CartCondition:
        _numeric_ops(self.value, "value")
        _numeric_ops(self.item_count, "item_count")
        return self


class OrderCondition(DefinitionModel):
    """Orders of the customer (placed at or before ``now``) that meet every filter, and how many."""

    kind: Literal["order"] = "order"
    channel: list[Literal[TOUCHPOINTS]] | None = None  # type: ignore[valid-type]
    fulfillment: list[Literal[FULFILLMENTS]] | None = None  # type: ignore[valid-type]
    status: list[Literal[ORDER_STATUSES]] | None = None  # type: ignore[valid-type]
    total: ValueOps | None = None
    within: Duration | None = None  # placed at most this long before now
    older_than: Duration | None = None  # placed at least this long before now
    ready_for: Duration | None = None  # ready for pickup at least this long before now
    count: CountOps = AT_LEAST_ONE

    _lists = field_validator("channel", "fulfillment", "status", mode="before")(
        classmethod(lambda cls, v: _one_or_many(v))
    )

    @field_validator("total", mode="before")
    @classmethod
    def _total(cls, value: Any) -> Any:
        return None if value is None else _value_ops(value)

    @model_validator(mode="after")
    def _numeric(self) -> OrderCondition:
        _numeric_ops(self.total, "total")
        return self


class ReachableCondition(DefinitionModel):
    kind: Literal["reachable"] = "reachable"
    channel: Literal[CONSENT_CHANNELS]  # type: ignore[valid-type]


class ConsentCondition(DefinitionModel):
    kind: Literal["consent"] = "consent"
    channel: Literal[CONSENT_CHANNELS]  # type: ignore[valid-type]


class ChannelsUsedCondition(CountOps):
    kind: Literal["channels_used"] = "channels_used"
    within: Duration | None = None
    channels: list[Literal[TOUCHPOINTS]] | None = None  # type: ignore[valid-type]

    def count_ops(self) -> CountOps:
        return CountOps(**self.used())

    def used(self) -> dict[str, int]:
        return {
            k: v
            for k, v in self.__dict__.items()
            if k in ("eq", "ne", "gt", "gte", "lt", "lte") and v is not None
        }


class AudienceRef(DefinitionModel):
    kind: Literal["audience"] = "audience"
    name: str


class SqlCondition(DefinitionModel):
    """A reviewed escape hatch: a SELECT returning customer ids (one column). ``:now`` is bound."""

    kind: Literal["sql"] = "sql"
    query: str
    reviewed_by: str

    @field_validator("query")
    @classmethod
    def _select(cls, value: str) -> str:
        text = value.strip().rstrip(";").strip()
        if not re.match(r"(?is)^(select|with)\b", text):
            raise ValueError("sql must be a SELECT (or WITH ... SELECT) returning customer ids")
        if ";" in text:
            raise ValueError("sql must be a single statement (no ';')")
        return text


class AllOf(DefinitionModel):
    kind: Literal["all"] = "all"
    items: tuple[Condition, ...]


class AnyOf(DefinitionModel):
    kind: Literal["any"] = "any"
    items: tuple[Condition, ...]


class Not(DefinitionModel):
    kind: Literal["not"] = "not"
    item: Condition


Condition = (
    AllOf
    | AnyOf
    | Not
    | TraitCondition
    | EventCondition
    | CartCondition
    | OrderCondition
    | ReachableCondition
    | ConsentCondition
    | ChannelsUsedCondition
    | AudienceRef
    | SqlCondition
)
for _model in (AllOf, AnyOf, Not):
    _model.model_rebuild()

# kind -> (model, the field the kind's value fills when it is not a mapping, or None: mapping only)
KINDS: dict[str, tuple[type[BaseModel], str | None]] = {
    "trait": (TraitCondition, "name"),
    "event": (EventCondition, "name"),
    "cart": (CartCondition, None),
    "order": (OrderCondition, None),
    "reachable": (ReachableCondition, "channel"),
    "consent": (ConsentCondition, "channel"),
    "channels_used": (ChannelsUsedCondition, None),
    "audience": (AudienceRef, "name"),
    "sql": (SqlCondition, "query"),
}
COMBINATORS = ("all", "any", "not")


def parse_condition(raw: Any, *, file: str = "<condition>", path: str = "where") -> Condition:
    """Validate one condition (as it appears in YAML) into its model, or raise DefinitionError."""
    if not isinstance(raw, Mapping):
        raise DefinitionError(file, path, f"a condition must be a mapping, got {type(raw).__name__}")
    kinds = [k for k in raw if k in KINDS or k in COMBINATORS]
    known = ", ".join([*COMBINATORS, *KINDS])
    if not kinds:
        keys = ", ".join(map(str, raw)) or "nothing"
        raise DefinitionError(file, path, f"unknown condition ({keys}): expected one of {known}")
    if len(kinds) > 1:
        raise DefinitionError(
            file, path, f"one condition per mapping, found {', '.join(kinds)}: combine them with all/any"
        )
    kind = kinds[0]
    value = raw[kind]
    here = f"{path}.{kind}"
    if kind in COMBINATORS:
        extra = [k for k in raw if k != kind]
        if extra:
            raise DefinitionError(file, f"{path}.{extra[0]}", f"unknown option beside {kind}")
        if kind == "not":
            return Not(item=parse_condition(value, file=file, path=here))
        if not isinstance(value, list) or not value:
            raise DefinitionError(file, here, f"{kind} needs a non-empty list of conditions")
        items = tuple(parse_condition(v, file=file, path=f"{here}[{i}]") for i, v in enumerate(value))
        return AllOf(items=items) if kind == "all" else AnyOf(items=items)

    model, primary = KINDS[kind]
    siblings = {k: v for k, v in raw.items() if k != kind}
    if isinstance(value, Mapping):
        if siblings:
            raise DefinitionError(file, f"{path}.{next(iter(siblings))}", f"unknown option beside {kind}")
        body, base = dict(value), here
    elif primary is None:
        raise DefinitionError(file, here, f"{kind} needs a mapping of options")
    else:
        body, base = {primary: value, **siblings}, path
    if kind == "trait":
        ops = {k: v for k, v in body.items() if k != "name"}
        body = {"name": body.get("name"), "ops": ops}
    try:
        return model.model_validate(body)  # type: ignore[return-value]
    except ValidationError as exc:
        loc, message = first_error(exc)
        if kind == "trait" and loc[:1] == ("ops",):
            loc = loc[1:]
        if loc[:1] == (primary,) and base == path:
            loc = (kind, *loc[1:])
        raise DefinitionError(file, format_loc(base, loc), message) from None


def referenced_audiences(condition: Condition) -> list[tuple[str, str]]:
    """(audience name, path) of every ``audience`` condition inside ``condition``."""
    found: list[tuple[str, str]] = []

    def walk(node: Condition, path: str) -> None:
        if isinstance(node, AllOf | AnyOf):
            for i, item in enumerate(node.items):
                walk(item, f"{path}.{node.kind}[{i}]")
        elif isinstance(node, Not):
            walk(node.item, f"{path}.not")
        elif isinstance(node, AudienceRef):
            found.append((node.name, f"{path}.audience"))

    walk(condition, "where")
    return found


class AudienceDefinition(DefinitionModel):
    name: str
    description: str = ""
    where: Condition
    source: str = "<memory>"
    text: str | None = None  # the YAML as written, for `omni audiences show`

    @property
    def dependencies(self) -> list[str]:
        return sorted({name for name, _ in referenced_audiences(self.where)})


AudienceName = snake_case("an audience name")


class AudienceFile(DefinitionModel):
    """An audience file as written. The name defaults to the file's (``default_name`` in the context),
    and must be it; ``where`` is checked by :func:`parse_condition`, which names paths inside it."""

    name: AudienceName
    description: Text = ""
    where: Any = Field(default=None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any, info: ValidationInfo) -> Any:
        default = (info.context or {}).get("default_name")
        if isinstance(data, Mapping) and "name" not in data and default is not None:
            return {**data, "name": default}
        return data

    @field_validator("name")
    @classmethod
    def _file_name(cls, value: str, info: ValidationInfo) -> str:
        default = (info.context or {}).get("default_name")
        if default is not None and value != default:
            raise ValueError(f"name {value!r} must match the file name ({default}.yaml)")
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("missing: the condition that defines the audience")
        return value


def parse_definition(
    raw: Any, *, file: str, default_name: str | None = None, text: str | None = None
) -> AudienceDefinition:
    """One audience definition from its parsed YAML."""
    written = validate_definition(AudienceFile, raw, file=file, context={"default_name": default_name})
    return AudienceDefinition(
        name=written.name,
        description=written.description.strip(),
        where=parse_condition(written.where, file=file, path="where"),
        source=file,
        text=text,
    )


def check_references(definitions: Mapping[str, AudienceDefinition]) -> None:
    """Every ``audience`` reference names a known audience, and there is no cycle between them."""
    for definition in definitions.values():
        for name, path in referenced_audiences(definition.where):
            if name not in definitions:
                known = ", ".join(sorted(definitions)) or "none"
                raise DefinitionError(definition.source, path, f"unknown audience {name!r} (known: {known})")
    dependency_order(definitions)


def dependency_order(
    definitions: Mapping[str, AudienceDefinition], names: Iterable[str] | None = None
) -> list[str]:
    """``names`` (default: all) and the audiences they refer to, each after the ones it refers to."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        if state.get(name) == "done":
            return
        definition = definitions[name]
        state[name] = "visiting"
        stack = [*stack, name]
        for dependency, path in referenced_audiences(definition.where):
            if dependency not in definitions:
                raise DefinitionError(definition.source, path, f"unknown audience {dependency!r}")
            if state.get(dependency) == "visiting":
                cycle = " -> ".join([*stack[stack.index(dependency) :], dependency])
                raise DefinitionError(definition.source, path, f"cycle between audiences: {cycle}")
            visit(dependency, stack)
        state[name] = "done"
        order.append(name)

    for name in sorted(definitions) if names is None else names:
        if name not in definitions:
            raise KeyError(name)
        visit(name, [])
    return order


def builtin_directory() -> Path:
    return Path(__file__).parent


def audiences_directory(directory: Path | None = None) -> Path:
    """``directory``, or the built-in audiences' folder."""
    return builtin_directory() if directory is None else Path(directory)


def load_audiences(directory: Path | None = None) -> dict[str, AudienceDefinition]:
    """Every audience in ``directory`` (default: the built-in ones), validated, references and cycles
    checked. Raises DefinitionError."""
    definitions = load_folder(
        audiences_directory(directory),
        lambda raw, file, text: parse_definition(raw, file=file, default_name=Path(file).stem, text=text),
        kind="audience",
    )
    check_references(definitions)
    return definitions
