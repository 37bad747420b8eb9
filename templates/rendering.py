"""Rendering message templates for customers.

Templates live in ``templates/<channel>/`` (``OMNI_TEMPLATES_DIR`` overrides the folder), one file per
part, named ``<name>.<part>.j2``:

| channel | parts | |
| --- | --- | --- |
| email | ``subject`` (required), ``html`` and/or ``txt`` | HTML autoescaped |
| sms | ``txt`` | checked against segment length: a warning past one segment, an error past 1,600 chars |
| push | ``title``, ``body`` | |
| webhook | ``json`` | a JSON object (build values with ``tojson``): the payload another system receives |

Files starting with ``_`` are layouts and partials (``{% extends "email/_layout.html.j2" %}``).
The environment is a Jinja2 ``SandboxedEnvironment`` with ``StrictUndefined``: a template that uses data
the customer does not have (no open cart, no first name) fails that customer's render with a
:class:`RenderError` naming the template, the customer and the missing value; a template that wants a
fallback says so (``{{ customer.first_name | default("there") }}``).

Context (see :func:`build_contexts`): ``customer`` (id, first_name, last_name, name, email, phone, locale,
timezone; keys without a value are absent), ``cart`` (the open cart: items with name, sku, price,
quantity, line_total; total, currency, item_count), ``order`` (the latest pickup order not yet picked
up, with its ``store``), ``store`` (always defined, None when no store is the customer's: the store of
:func:`profiles.stores.customer_stores` — home store, else last in-store purchase or pickup, else nearest
— with name, address, full_address, phone, hours, hours_today and open_today (on the customer's local
day), opening_hours, source), ``unsubscribe_url`` (signed, see ``sequences.unsubscribe``),
``links`` (shop, cart, order: UTM-tagged), ``brand``, ``now`` (in the customer's timezone). Filters:
``money(currency)``, ``utm(content=None)``, ``datetime(fmt)``.

Interface for the sequence engine:

- ``render(session, template_name, customer_id, *, now, settings=None) -> Rendered`` (raises
  :class:`RenderError`);
- ``render_many(session, template_name, customer_ids, *, now, settings=None) -> dict[int, Rendered |
  RenderError]``: the same for a batch, with a handful of set-based queries per batch whatever its size;
  never raises for a template's fault (unknown, not compiling, over a render limit: every customer gets
  a RenderError with the reason), only for the database's;
- ``Rendered.messages(delivery_id) -> list[connectors.Message]`` (push: one per device token, the
  first keeps ``delivery_id``, the others get ``delivery_id#2``, ``#3``...).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import string
import time
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache, update_wrapper, wraps
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    UndefinedError,
    nodes,
    pass_context,
    pass_environment,
    pass_eval_context,
)
from jinja2 import filters as jinja_filters
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from connectors.base import Message

BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent
CHANNEL_PARTS = {
    "email": ("subject", "html", "txt"),
    "sms": ("txt",),
    "push": ("title", "body"),
    "webhook": ("json",),
}
REQUIRED_PARTS = {"email": ("subject",), "sms": ("txt",), "push": ("title", "body"), "webhook": ("json",)}
SMS_MAX_CHARS = 1600
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "CAD": "CA$", "AUD": "A$", "JPY": "¥"}
CHUNK = 1000

# GSM 03.38: the basic set counts one septet, the extension set two; anything else means UCS-2.
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")
GSM7 = frozenset(GSM7_BASIC | GSM7_EXTENDED)


class RenderError(Exception):
    """A template that cannot be rendered for a customer (missing data, no address, bad template, a
    render limit)."""

    def __init__(
        self, template: str, customer_id: int | None, reason: str, *, kind: str = "template"
    ) -> None:
        who = f" for customer {customer_id}" if customer_id is not None else ""
        super().__init__(f"cannot render {template}{who}: {reason}")
        self.template = template
        self.customer_id = customer_id
        self.reason = reason
        # data (the customer lacks something the template needs), template (broken or unsafe), or the
        # limit that was hit: time, output, size, range, arithmetic, format, items.
        self.kind = kind


@dataclass
class Rendered:
    template: str
    channel: str
    customer_id: int | None
    recipients: list[str]
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    title: str | None = None
    unsubscribe_url: str | None = None
    sms_segments: int | None = None
    # webhook: the JSON object the receiving system gets (the connector's ``data``)
    data: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def messages(self, delivery_id: str, *, to: str | None = None) -> list[Message]:
        """The connector messages for this render (``to`` overrides the recipients, e.g. a test send)."""
        recipients = [to] if to else self.recipients
        return [
            Message(
                delivery_id=delivery_id if index == 0 else f"{delivery_id}#{index + 1}",
                channel=self.channel,
                to=recipient,
                customer_id=self.customer_id,
                template=self.template,
                subject=self.subject,
                html=self.html,
                text=self.text,
                title=self.title,
                unsubscribe_url=self.unsubscribe_url,
                categories=(self.template.replace("/", "_"),),
                data=self.data if self.data is not None else {"template": self.template},
            )
            for index, recipient in enumerate(recipients)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    channel: str
    parts: tuple[str, ...]


# --- formatting helpers (filters) ----------------------------------------------------------------------


def money(value: Any, currency: str | None = "USD") -> str:
    amount = float(value or 0)
    code = (currency or "USD").upper()
    symbol = CURRENCY_SYMBOLS.get(code)
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {code}"


def add_utm(url: str, *, source: str = "omni", medium: str, campaign: str, content: str | None = None) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("utm_")]
    query += [("utm_source", source), ("utm_medium", medium), ("utm_campaign", campaign)]
    if content:
        query.append(("utm_content", content))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), parts.fragment))


def sms_segments(text: str) -> int:
    """Segments an SMS body takes: GSM-7 (160 / 153 per part) or UCS-2 (70 / 67 per part)."""
    if not text:
        return 0
    chars = set(text)
    if chars <= GSM7:
        # One septet each, and one more for each character of the extension set.
        septets = len(text) + sum(text.count(ch) for ch in chars & GSM7_EXTENDED)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(text.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)


def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


# --- the environment -----------------------------------------------------------------------------------


def templates_dir(settings: Any = None) -> Path:
    if settings is None:
        from omni.core.settings import get_settings

        settings = get_settings()
    return Path(settings.templates_dir) if settings.templates_dir else BUILTIN_TEMPLATES_DIR


# --- limits --------------------------------------------------------------------------------------------
#
# A template is code a marketer writes: it must not be able to take a tick down. Every render runs under a
# budget (a deadline and an output cap, per render of one customer) and every operation that could build a
# huge value from a small template is checked *before* it allocates: ``range`` size, ``**`` / ``*`` results
# (big integers, repeated strings and lists), ``+`` and ``~`` concatenation, ``%`` / ``format`` widths,
# string methods that grow their input (``center``, ``ljust``, ``replace``, ``join``, ``expandtabs`` ...),
# filters that do (``center``, ``indent``, ``replace``, ``join``, ``format``, ``batch``, ``slice``,
# ``wordwrap``, ``round``), ``lipsum``, and list / dict growth through their methods. Loops check the
# deadline on every iteration, calls and operators on every use. A render over a limit fails that
# customer's render with a :class:`RenderError` saying which limit; nothing raises out of ``render_many``.


@dataclass(frozen=True)
class RenderLimits:
    seconds: float = 0.5  # per render of one customer (all parts of the template)
    string_chars: int = 1_000_000  # any one string (or a list's text) a template builds
    items: int = 100_000  # any one list / dict a template builds or grows
    range_items: int = 10_000  # range(...)
    int_bits: int = 4096  # integers (about 1,233 digits)
    format_width: int = 1_000  # a width or precision in '%' / str.format / the format filter
    lipsum_paragraphs: int = 20
    lipsum_words: int = 200
    wordwrap_chars: int = 200_000


LIMITS = RenderLimits()
# Output of one render (all parts together), by channel: an email is at most 1 MB; an SMS is checked
# against SMS_MAX_CHARS after rendering, a push payload is a few KB at most.
OUTPUT_LIMITS = {"email": 1_000_000, "sms": 10_000, "push": 4_000}
# A template that runs out of time for this many customers of a batch is not run for the rest of it
# (each would cost the full deadline): they fail at once with the same reason.
TIME_FAILURES_PER_BATCH = 3


class LimitExceeded(SecurityError):
    """A template went over one of the render limits (``kind``: time, output, size, range, arithmetic,
    format, items)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Budget:
    __slots__ = ("deadline", "output", "output_limit", "seconds")

    def __init__(self, seconds: float, output_limit: int) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.output = 0
        self.output_limit = output_limit


_BUDGET: ContextVar[_Budget | None] = ContextVar("omni_render_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None and time.monotonic() > budget.deadline:
        raise LimitExceeded("time", f"the render took longer than {budget.seconds:g} s")


def _size(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` has; stops counting past ``limit`` (shared and cyclic
    references are counted each time they are reached, as ``str`` prints them)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() * 0.302 + 2
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):
            total += 14
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        else:
            total += 32
        if total > limit:
            return int(total)
    return int(total)


def _check_value(value: Any, what: str = "a value") -> None:
    limit = LIMITS.string_chars
    if isinstance(value, str):
        if len(value) > limit:
            raise LimitExceeded("size", f"{what} of {len(value):,} chars is over the limit of {limit:,}")
    elif isinstance(value, list | tuple | dict | set | frozenset | Namespace):
        if _size(value, limit) > limit:
            raise LimitExceeded("size", f"{what} would print over {limit:,} chars")


def _check_result(value: Any, what: str = "a result") -> None:
    if isinstance(value, str):
        _check_value(value, what)
    elif isinstance(value, list | tuple | dict | set | frozenset) and len(value) > LIMITS.items:
        raise LimitExceeded("items", f"{what} of {len(value):,} items is over the limit of {LIMITS.items:,}")


def _check_length(length: float, what: str) -> None:
    if length > LIMITS.string_chars:
        raise LimitExceeded(
            "size", f"{what} would be {int(length):,} chars, over the limit of {LIMITS.string_chars:,}"
        )


def _check_width(value: Any, what: str) -> None:
    if isinstance(value, int) and value > LIMITS.string_chars:
        raise LimitExceeded("size", f"{what} {value:,} is over the limit of {LIMITS.string_chars:,}")


def _check_pow(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        bits = right * math.log2(abs(left))
        if bits > LIMITS.int_bits:
            raise LimitExceeded(
                "arithmetic", f"a power of about {int(bits):,} bits is over the limit of {LIMITS.int_bits:,}"
            )


def _check_mul(left: Any, right: Any) -> None:
    if isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if isinstance(right, int) and isinstance(left, str | list | tuple):
        times = max(int(right), 0)
        if isinstance(left, str):
            _check_length(len(left) * times, "a repeated string")
        else:
            if len(left) * times > LIMITS.items:
                raise LimitExceeded(
                    "items",
                    f"a repeated list of {len(left) * times:,} items is over the limit of {LIMITS.items:,}",
                )
            _check_length(_size(left, LIMITS.string_chars) * times, "a repeated list")
    elif isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > LIMITS.int_bits + 1:
            raise LimitExceeded("arithmetic", f"a product of over {LIMITS.int_bits:,} bits")


def _check_add(left: Any, right: Any) -> None:
    if isinstance(left, str) and isinstance(right, str):
        _check_length(len(left) + len(right), "a string")
    elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
        if len(left) + len(right) > LIMITS.items:
            raise LimitExceeded(
                "items", f"a list of {len(left) + len(right):,} items is over the limit of {LIMITS.items:,}"
            )


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def _check_percent(fmt: str, args: Any) -> None:
    """``fmt % args`` (the ``%`` operator and the ``format`` filter): widths, precisions and the result."""
    fields = 0
    widest = 0
    for width, precision, conversion in _PERCENT_SPEC.findall(fmt):
        if conversion == "%":
            continue
        fields += 1
        for number in (width, precision):
            if number == "*":
                raise LimitExceeded("format", "'*' widths are not allowed in templates")
            if number and int(number) > LIMITS.format_width:
                raise LimitExceeded(
                    "format",
                    f"a format width of {int(number):,} is over the limit of {LIMITS.format_width:,}",
                )
            widest = max(widest, int(number or 0))
    if fields:
        values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,)
        largest = max((_size(v, LIMITS.string_chars) for v in values), default=0)
        _check_length(len(fmt) + fields * (largest + widest), "a formatted string")


_FORMATTER = string.Formatter()


def _check_brace_format(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """``fmt.format(...)``: widths and precisions, and the result's size."""
    fields = 0
    for _, field_name, spec, _ in _FORMATTER.parse(fmt):
        if field_name is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise LimitExceeded("format", "nested format specs are not allowed in templates")
        for number in re.findall(r"\d+", spec or ""):
            if int(number) > LIMITS.format_width:
                raise LimitExceeded(
                    "format",
                    f"a format width of {int(number):,} is over the limit of {LIMITS.format_width:,}",
                )
    if fields:
        largest = max((_size(v, LIMITS.string_chars) for v in (*args, *kwargs.values())), default=0)
        _check_length(len(fmt) + fields * (largest + LIMITS.format_width), "a formatted string")


def _check_replace(s: str, old: str, new: str, count: Any = None) -> None:
    times = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    _check_length(len(s) + times * (len(new) - len(old)), "a replaced string")


def _bounded_list(value: Any) -> list[Any]:
    if isinstance(value, list):
        items = value
    else:
        items = list(itertools.islice(iter(value), LIMITS.items + 1))
    if len(items) > LIMITS.items:
        raise LimitExceeded("items", f"over {LIMITS.items:,} items")
    return items


def _check_join(separator: str, items: Sequence[Any]) -> None:
    total = len(separator) * max(len(items) - 1, 0)
    for item in items:
        total += _size(item, LIMITS.string_chars)
        _check_length(total, "a joined string")


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a string's method that can grow it; returns the (possibly materialised) args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_width(args[0] if args else kwargs.get("width"), f"str.{name} width")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _check_length(len(s) + s.count("\t") * size, "an expanded string")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
    elif name == "join" and args:
        items = _bounded_list(args[0])
        _check_join(s, items)
        args = (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) if isinstance(v, str) else 1 for v in args[0].values()), default=1)
        _check_length(len(s) * max(longest, 1), "a translated string")
    return args


def _guard_iter(iterable: Any) -> Iterator[Any]:
    """Every ``{% for %}`` loop iterates through this: the deadline is checked on every iteration."""
    budget = _BUDGET.get()
    if budget is None:
        yield from iterable
        return
    deadline = budget.deadline
    for item in iterable:
        if time.monotonic() > deadline:
            raise LimitExceeded("time", f"the render took longer than {budget.seconds:g} s")
        yield item


def _safe_range(*args: int) -> range:
    rng = range(*args)
    try:
        size = len(rng)
    except OverflowError:
        size = LIMITS.range_items + 1
    if size > LIMITS.range_items:
        raise LimitExceeded("range", f"a range of {size:,} items is over the limit of {LIMITS.range_items:,}")
    return rng


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if not (isinstance(n, int) and 0 <= n <= LIMITS.lipsum_paragraphs):
        raise LimitExceeded("size", f"lipsum takes at most {LIMITS.lipsum_paragraphs} paragraphs")
    if not (isinstance(max, int) and isinstance(min, int) and 0 < min <= max <= LIMITS.lipsum_words):
        raise LimitExceeded("size", f"lipsum paragraphs take at most {LIMITS.lipsum_words} words")
    return generate_lorem_ipsum(n, html, min, max)


_SCALARS = frozenset({int, float, bool, type(None)})
_STRINGS = frozenset({str, Markup})


def _finalize(value: Any) -> Any:
    """Every ``{{ ... }}`` value, before it is printed."""
    kind = type(value)
    if kind in _STRINGS:
        if len(value) > LIMITS.string_chars:
            _check_value(value, "a printed value")
    elif kind not in _SCALARS:
        _check_value(value, "a printed value")
    return value


# Filters that can build more than they are given: checked before they run.
@pass_eval_context
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    _check_replace(str(s), str(old), str(new), count)
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join_filter(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = _bounded_list(value)
    _check_join(str(d), items)
    return jinja_filters.sync_do_join(eval_ctx, items, d, attribute)


def _center_filter(value: Any, width: int = 80) -> str:
    _check_width(width, "center width")
    return jinja_filters.do_center(value, width)


def _indent_filter(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    per_line = len(width) if isinstance(width, str) else int(width)
    _check_length(len(text) + (text.count("\n") + 1) * max(per_line, 0), "an indented string")
    return jinja_filters.do_indent(s, width, first, blank)


@pass_environment
def _wordwrap_filter(
    environment: Any,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = str(s)
    if len(text) > LIMITS.wordwrap_chars:
        raise LimitExceeded("size", f"wordwrap takes at most {LIMITS.wordwrap_chars:,} chars")
    lines = len(text) // max(int(width), 1) + 1
    _check_length(len(text) + lines * len(wrapstring or environment.newline_sequence), "a wrapped string")
    return jinja_filters.do_wordwrap(environment, s, width, break_long_words, wrapstring, break_on_hyphens)


def _format_filter(value: Any, *args: Any, **kwargs: Any) -> str:
    _check_percent(str(value), kwargs or args)
    return jinja_filters.do_format(value, *args, **kwargs)


def _batch_filter(value: Any, linecount: int, fill_with: Any = None) -> Any:
    if not isinstance(linecount, int) or not 0 < linecount <= LIMITS.items:
        raise LimitExceeded("items", f"batch takes 1 to {LIMITS.items:,} items per batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice_filter(value: Any, slices: int, fill_with: Any = None) -> Any:
    if not isinstance(slices, int) or not 0 < slices <= LIMITS.items:
        raise LimitExceeded("items", f"slice takes 1 to {LIMITS.items:,} slices")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


def _round_filter(value: Any, precision: int = 0, method: str = "common") -> Any:
    if not isinstance(precision, int) or abs(precision) > 100:
        raise LimitExceeded("arithmetic", "round takes a precision between -100 and 100")
    return jinja_filters.do_round(value, precision, method)


GUARDED_FILTERS = {
    "replace": _replace_filter,
    "join": _join_filter,
    "center": _center_filter,
    "indent": _indent_filter,
    "wordwrap": _wordwrap_filter,
    "format": _format_filter,
    "batch": _batch_filter,
    "slice": _slice_filter,
    "round": _round_filter,
}


# Filters that never build more than a few times what they are given, nor print a container: not wrapped.
UNGUARDED_FILTERS = frozenset(
    {"money", "utm", "datetime", "default", "d", "length", "count", "int", "float", "abs", "filesizeformat"}
)


def _guard_filter(function: Any) -> Any:
    """Any other filter: the deadline, the size of what it is given and of what it returns."""

    @wraps(function)  # keeps Jinja's pass_context / pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and time.monotonic() > budget.deadline:
            raise LimitExceeded("time", f"the render took longer than {budget.seconds:g} s")
        for value in args:
            if type(value) not in _SCALARS:
                _check_value(value, "a filter's input")
        for value in kwargs.values():
            if type(value) not in _SCALARS:
                _check_value(value, "a filter's argument")
        result = function(*args, **kwargs)
        if type(result) not in _SCALARS:
            _check_result(result, "a filter's result")
        return result

    return guarded


class _Codegen(CodeGenerator):
    """Jinja's code generator, with every loop's iterable wrapped in :func:`_guard_iter` and every ``~``
    concatenation checked before it is built."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        guarded = nodes.Call(
            nodes.EnvironmentAttribute("omni_guard_iter", lineno=node.lineno),
            [node.iter],
            [],
            None,
            None,
            lineno=node.lineno,
        )
        guarded.set_environment(self.environment)
        node.iter = guarded
        super().visit_For(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func_name = "markup_join"
        else:
            func_name = "str_join"
        self.write(f"environment.omni_concat({func_name}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_DICT_ATTRIBUTES = frozenset(dir(dict))
_BUILTIN_METHOD = type("".join)


class _Sandbox(SandboxedEnvironment):
    """The sandbox, with the render limits above, reading ``customer.first_name`` from a plain dict
    without an exception first.

    Jinja's ``a.b`` tries the attribute ``b`` and, when there is none, the item ``a["b"]``. A context is
    plain dicts, which have no attributes but their methods: the sandbox raised and caught an
    ``AttributeError`` for each of the ~35 values a message reads, the largest cost of a render. For a
    plain dict and a name that is not one of its attributes, this goes straight to the item, with the
    same result; anything else takes the sandbox's own path (and its checks).
    """

    code_generator_class = _Codegen
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    omni_guard_iter = staticmethod(_guard_iter)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A template's globals as one plain dict rather than a ChainMap over the environment's: every
        # render copies them into its context, and copying a ChainMap (in Python) cost a third of a
        # render. The environment's globals are set once, before any template is loaded.
        return {**self.globals, **(d or {})}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "**":
            _check_pow(left, right)
        elif operator == "*":
            _check_mul(left, right)
        elif operator == "+":
            _check_add(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        result = self.binop_table[operator](left, right)
        if type(result) is int and result.bit_length() > LIMITS.int_bits:
            raise LimitExceeded("arithmetic", f"a number of over {LIMITS.int_bits:,} bits")
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if __obj is _guard_iter:
            return _guard_iter(*args)
        _tick()
        for value in args:
            if isinstance(value, str):
                _check_value(value, "an argument")
        owner = __obj.__self__ if type(__obj) is _BUILTIN_METHOD else None
        if isinstance(owner, str):
            args = _check_str_method(owner, __obj.__name__, args, kwargs)
        elif isinstance(owner, list) and __obj.__name__ == "extend" and args and hasattr(args[0], "__len__"):
            if len(owner) + len(args[0]) > LIMITS.items:
                raise LimitExceeded("items", f"a list of over {LIMITS.items:,} items")
        result = super().call(__context, __obj, *args, **kwargs)
        _check_result(result)
        if isinstance(owner, list | dict | set) and len(owner) > LIMITS.items:
            raise LimitExceeded("items", f"a {type(owner).__name__} of over {LIMITS.items:,} items")
        return result

    def wrap_str_format(self, value: Any) -> Any:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__
        is_format_map = value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            _tick()
            if is_format_map:
                mapping = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else {}
                _check_brace_format(fmt, (), mapping)
            else:
                _check_brace_format(fmt, args, kwargs)
            result = wrapper(*args, **kwargs)
            _check_value(result, "a formatted string")
            return result

        return update_wrapper(checked, value)

    @staticmethod
    def omni_concat(join: Any, parts: tuple) -> str:
        _tick()
        total = 0
        for part in parts:
            total += len(part) if isinstance(part, str) else _size(part, LIMITS.string_chars)
            _check_length(total, "a concatenated string")
        return join(parts)


@lru_cache(maxsize=8)
def environment(directory: Path) -> SandboxedEnvironment:
    env = _Sandbox(
        loader=FileSystemLoader(str(directory)),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name) and name.endswith((".html.j2", ".html")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        # Compiled templates are kept for the life of the process (a flow run or a CLI command): checking
        # every file on disk for each customer's render was the largest cost of a tick.
        auto_reload=False,
        cache_size=1000,
        finalize=_finalize,
    )
    env.globals["range"] = _safe_range
    env.globals["lipsum"] = _lipsum
    env.filters.update(GUARDED_FILTERS)
    env.filters["money"] = money
    env.filters["utm"] = _utm_filter
    env.filters["datetime"] = lambda value, fmt="%a %d %b, %H:%M": value.strftime(fmt) if value else ""
    env.filters = {
        name: f if name in UNGUARDED_FILTERS else _guard_filter(f) for name, f in env.filters.items()
    }
    return env


def _render_limited(template: Template, context: Mapping[str, Any], budget: _Budget) -> str:
    """``template.render(context)`` within the budget: the output is counted as it is produced, a few
    pieces at a time (each piece is at most one printed value, itself limited)."""
    pieces = template.root_render_func(template.new_context(dict(context)))
    out: list[str] = []
    while True:
        batch = list(itertools.islice(pieces, 16))
        if not batch:
            return "".join(out)
        budget.output += sum(map(len, batch))
        if budget.output > budget.output_limit:
            raise LimitExceeded("output", f"the output is over the limit of {budget.output_limit:,} chars")
        out += batch


@pass_context
def _utm_filter(context: Any, url: str, content: str | None = None) -> str:
    """``{{ "https://shop.example.com/p/1" | utm("hero") }}``: medium = channel, campaign = template."""
    return add_utm(
        url,
        medium=context.get("channel") or "email",
        campaign=context.get("campaign") or "omni",
        content=content,
    )


def list_templates(settings: Any = None, directory: Path | None = None) -> list[TemplateInfo]:
    """Every template in the folder, by name (``email/abandoned_cart``), with its parts."""
    directory = directory or templates_dir(settings)
    found: dict[str, set[str]] = {}
    for channel in CHANNEL_PARTS:
        folder = directory / channel
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.j2")):
            if path.name.startswith("_"):
                continue
            stem, _, part = path.name[: -len(".j2")].rpartition(".")
            if stem and part in CHANNEL_PARTS[channel]:
                found.setdefault(f"{channel}/{stem}", set()).add(part)
    return [
        TemplateInfo(
            name, name.split("/")[0], tuple(p for p in CHANNEL_PARTS[name.split("/")[0]] if p in parts)
        )
        for name, parts in sorted(found.items())
    ]


def find_template(name: str, settings: Any = None, directory: Path | None = None) -> TemplateInfo:
    for info in list_templates(settings, directory):
        if info.name == name:
            return info
    known = ", ".join(i.name for i in list_templates(settings, directory)) or "none"
    raise RenderError(name, None, f"no such template (known: {known})")


# --- rendering -----------------------------------------------------------------------------------------


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def render_parts(
    info: TemplateInfo,
    context: dict[str, Any],
    *,
    directory: Path,
    customer_id: int | None = None,
    templates: Mapping[str, Template] | None = None,
) -> dict[str, str]:
    """Render every part of a template with ``context`` within the render limits (one budget for all
    the parts); :class:`RenderError` on missing data, a broken template or a limit — never anything else.

    ``templates``: parts already loaded (:func:`load_parts`), so a batch looks each one up once.
    """
    env = environment(directory)
    parts: dict[str, str] = {}
    budget = _Budget(LIMITS.seconds, OUTPUT_LIMITS.get(info.channel, OUTPUT_LIMITS["email"]))
    token = _BUDGET.set(budget)
    try:
        for part in info.parts:
            try:
                template = (templates or {}).get(part) or env.get_template(f"{info.name}.{part}.j2")
                parts[part] = _render_limited(template, context, budget)
            except LimitExceeded as exc:
                raise RenderError(
                    info.name, customer_id, f"{part}: over a limit: {exc}", kind=exc.kind
                ) from None
            except UndefinedError as exc:
                raise RenderError(
                    info.name, customer_id, f"{part}: missing data: {exc.message}{_hint(exc)}", kind="data"
                ) from None
            except SecurityError as exc:
                raise RenderError(info.name, customer_id, f"{part}: unsafe template: {exc}") from None
            except TemplateNotFound as exc:
                raise RenderError(info.name, customer_id, f"{part}: template file not found: {exc}") from None
            except TemplateError as exc:
                raise RenderError(info.name, customer_id, f"{part}: template error: {exc}") from None
            except RecursionError:
                raise RenderError(
                    info.name, customer_id, f"{part}: template error: too deeply nested (recursion)"
                ) from None
            except MemoryError:
                raise RenderError(
                    info.name, customer_id, f"{part}: over a limit: out of memory", kind="size"
                ) from None
            except Exception as exc:  # noqa: BLE001 - any error of a template is that render's failure
                raise RenderError(
                    info.name, customer_id, f"{part}: error while rendering: {_describe(exc)}"
                ) from None
    finally:
        _BUDGET.reset(token)
    for part in REQUIRED_PARTS[info.channel]:
        if part not in parts:
            raise RenderError(info.name, customer_id, f"the template has no {part} part")
    if info.channel == "email" and "html" not in parts and "txt" not in parts:
        raise RenderError(info.name, customer_id, "an email template needs an html or txt part")
    return parts


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def load_parts(info: TemplateInfo, *, directory: Path) -> dict[str, Template]:
    """The compiled template of each part that loads; a part that does not is left out, and
    :func:`render_parts` reports its error for each customer as before."""
    return _load_parts(info, directory=directory)[0]


def _load_parts(info: TemplateInfo, *, directory: Path) -> tuple[dict[str, Template], str | None]:
    """The compiled parts, and the reason the template cannot be rendered for anyone (a part that does
    not compile or load), or None."""
    env = environment(directory)
    loaded: dict[str, Template] = {}
    broken: str | None = None
    for part in info.parts:
        try:
            loaded[part] = env.get_template(f"{info.name}.{part}.j2")
        except TemplateNotFound as exc:
            broken = broken or f"{part}: template file not found: {exc}"
        except TemplateError as exc:
            broken = broken or f"{part}: template error: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. a RecursionError compiling a pathological template
            broken = broken or f"{part}: template error: {_describe(exc)}"
    return loaded, broken


def _hint(exc: UndefinedError) -> str:
    message = exc.message or ""
    for key, hint in (
        ("'cart'", "the customer has no open cart"),
        ("'order'", "the customer has no pickup order waiting"),
        ("first_name", "the customer has no first name"),
        (
            "'None' has no attribute",
            "a value the customer may not have is empty, e.g. no store is theirs: guard it with "
            "{% if store %} ... {% else %} ... {% endif %}",
        ),
    ):
        if key in message:
            return f" ({hint})"
    return ""


def assemble(
    info: TemplateInfo,
    parts: dict[str, str],
    *,
    customer_id: int | None,
    recipients: list[str],
    context: dict,
) -> Rendered:
    rendered = Rendered(
        template=info.name,
        channel=info.channel,
        customer_id=customer_id,
        recipients=recipients,
        unsubscribe_url=context.get("unsubscribe_url"),
    )
    if info.channel == "email":
        rendered.subject = _collapse(parts["subject"])
        if not rendered.subject:
            raise RenderError(info.name, customer_id, "the subject is empty")
        rendered.html = parts.get("html")
        rendered.text = parts["txt"].strip() + "\n" if "txt" in parts else None
    elif info.channel == "sms":
        text = parts["txt"].strip()
        if not text:
            raise RenderError(info.name, customer_id, "the SMS body is empty")
        if len(text) > SMS_MAX_CHARS:
            raise RenderError(info.name, customer_id, f"the SMS is {len(text)} chars, over {SMS_MAX_CHARS}")
        rendered.text = text
        rendered.sms_segments = sms_segments(text)
        if rendered.sms_segments > 1:
            rendered.warnings.append(
                f"the SMS takes {rendered.sms_segments} segments ({len(text)} chars): it is billed as many"
            )
    elif info.channel == "webhook":
        try:
            document = json.loads(parts["json"])
        except ValueError as exc:
            raise RenderError(info.name, customer_id, f"the webhook body is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise RenderError(info.name, customer_id, "the webhook body is not a JSON object")
        rendered.data = document
    else:
        rendered.title = _collapse(parts["title"])
        rendered.text = _collapse(parts["body"])
        if not rendered.title or not rendered.text:
            raise RenderError(info.name, customer_id, "the push title or body is empty")
    return rendered


def render_context(
    template_name: str, context: dict[str, Any], *, settings: Any = None, recipients: Sequence[str] = ()
) -> Rendered:
    """Render a template with a context built elsewhere (tests, previews)."""
    directory = templates_dir(settings)
    info = find_template(template_name, settings, directory)
    customer_id = (context.get("customer") or {}).get("id")
    parts = render_parts(info, context, directory=directory, customer_id=customer_id)
    return assemble(info, parts, customer_id=customer_id, recipients=list(recipients), context=context)


def render(
    session: Session, template_name: str, customer_id: int, *, now: datetime, settings: Any = None
) -> Rendered:
    """Render ``template_name`` for one customer of the store. Raises :class:`RenderError`."""
    outcome = render_many(session, template_name, [customer_id], now=now, settings=settings)[customer_id]
    if isinstance(outcome, RenderError):
        raise outcome
    return outcome


def render_many(
    session: Session, template_name: str, customer_ids: Iterable[int], *, now: datetime, settings: Any = None
) -> dict[int, Rendered | RenderError]:
    """Render a template for many customers: each gets its :class:`Rendered` or its :class:`RenderError`
    (missing data, a render limit...); the others go on. A template that cannot be rendered for anyone
    (unknown, a part that does not compile) gives every customer a RenderError with the reason, and a
    template that runs out of time for :data:`TIME_FAILURES_PER_BATCH` customers fails the rest of the
    batch at once. Nothing raises but the database (a failing query is not the customers' failure)."""
    ids = list(dict.fromkeys(customer_ids))
    if settings is None:
        from omni.core.settings import get_settings

        settings = get_settings()
    directory = templates_dir(settings)
    try:
        info = find_template(template_name, settings, directory)
    except RenderError as exc:
        return {c: RenderError(template_name, c, exc.reason) for c in ids}
    templates, broken = _load_parts(info, directory=directory)
    if broken is not None:
        return {c: RenderError(info.name, c, broken) for c in ids}
    errors: dict[int, RenderError] = {}
    try:
        contexts = build_contexts(
            session, ids, now=now, channel=info.channel, template=info.name, settings=settings, errors=errors
        )
    except SQLAlchemyError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug building contexts fails the batch's renders, visibly
        reason = f"cannot build the message context: {_describe(exc)}"
        return {c: RenderError(info.name, c, reason) for c in ids}
    outcomes: dict[int, Rendered | RenderError] = {}
    timeouts: list[RenderError] = []
    for customer_id in ids:
        context = contexts.get(customer_id)
        try:
            if customer_id in errors:
                raise errors[customer_id]
            if context is None:
                raise RenderError(info.name, customer_id, "no such customer", kind="data")
            if len(timeouts) >= TIME_FAILURES_PER_BATCH:
                raise RenderError(
                    info.name,
                    customer_id,
                    f"not rendered: the template ran out of time for {len(timeouts)} customers of this "
                    f"batch ({timeouts[0].reason})",
                    kind="time",
                )
            recipients = _recipients(info, context)
            parts = render_parts(
                info, context, directory=directory, customer_id=customer_id, templates=templates
            )
            outcomes[customer_id] = assemble(
                info, parts, customer_id=customer_id, recipients=recipients, context=context
            )
        except RenderError as exc:
            outcomes[customer_id] = exc
            if exc.kind == "time" and not exc.reason.startswith("not rendered"):
                timeouts.append(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. assembling an odd value: this customer's failure
            outcomes[customer_id] = RenderError(
                info.name, customer_id, f"error while rendering: {_describe(exc)}"
            )
    return outcomes


def _recipients(info: TemplateInfo, context: dict) -> list[str]:
    customer = context["customer"]
    if info.channel == "email":
        if not customer.get("email"):
            raise RenderError(info.name, customer["id"], "the customer has no email address", kind="data")
        return [customer["email"]]
    if info.channel == "sms":
        if not customer.get("phone"):
            raise RenderError(info.name, customer["id"], "the customer has no phone number", kind="data")
        return [customer["phone"]]
    if info.channel == "webhook":
        # The system the message is for: the store of the order it is about, else the customer's store.
        store = (context.get("order") or {}).get("store") or context.get("store")
        return [f"store:{store['id']}" if store else f"customer:{customer['id']}"]
    tokens = context.pop("_device_tokens", None) or []
    if not tokens:
        raise RenderError(info.name, customer["id"], "the customer has no device token", kind="data")
    return list(tokens)


# --- context -------------------------------------------------------------------------------------------


def _store_dict(store: Mapping[str, Any], local_now: datetime) -> dict[str, Any]:
    """A store as templates see it. Its "today" is the customer's local day (``local_now``, in the
    customer's timezone): the day the customer reads the message on."""
    from profiles.stores import stored_hours

    hours = stored_hours(store.get("hours"))
    today = DAYS[local_now.weekday()]
    address_parts = [
        store.get("address"),
        " ".join(p for p in (store.get("postal_code"), store.get("city")) if p),
        store.get("region"),
    ]
    value = {
        "id": store.get("id"),
        "name": store.get("name"),
        "address": store.get("address"),
        "city": store.get("city"),
        "region": store.get("region"),
        "postal_code": store.get("postal_code"),
        "country": store.get("country"),
        "phone": store.get("phone"),
        "email": store.get("email"),
        "timezone": store.get("timezone"),
        "hours": hours,
        # A day the hours do not give is closed; no hours at all: unknown (left out).
        "hours_today": hours.get(today, "closed") if hours else None,
        "open_today": hours.get(today, "closed") != "closed" if hours else None,
        "opening_hours": [
            {"day": name, "hours": hours.get(key, "closed")}
            for key, name in zip(DAYS, DAY_NAMES, strict=True)
        ]
        if hours
        else None,
        "full_address": ", ".join(p for p in address_parts if p) or None,
        "source": store.get("source"),
    }
    return {k: v for k, v in value.items() if v is not None}


def _copy_store(value: dict[str, Any]) -> dict[str, Any]:
    copied = dict(value)
    if "hours" in copied:
        copied["hours"] = dict(copied["hours"])
    if "opening_hours" in copied:
        copied["opening_hours"] = [dict(day) for day in copied["opening_hours"]]
    return copied


def _items(items: list) -> list[dict[str, Any]]:
    lines = []
    for item in items or []:
        quantity = item.get("quantity") or 1
        price = float(item.get("price") or 0)
        line = {
            "product_id": item.get("product_id"),
            "sku": item.get("sku"),
            "name": item.get("name") or item.get("sku") or item.get("product_id"),
            "price": price,
            "quantity": quantity,
            "line_total": round(price * quantity, 2),
        }
        lines.append({k: v for k, v in line.items() if v is not None})
    return lines


def build_contexts(
    session: Session,
    customer_ids: Sequence[int],
    *,
    now: datetime,
    channel: str,
    template: str,
    settings: Any,
    errors: dict[int, RenderError] | None = None,
) -> dict[int, dict[str, Any]]:
    """The template context of each customer, loaded with a few queries per 1,000 customers.

    ``store`` is always there: the customer's store by :func:`profiles.stores.customer_stores` (home
    store, else last in-store purchase or pickup, else nearest), or None. A customer whose context cannot
    be built (odd data) is left out, with the reason in ``errors``."""
    from profiles.models import Cart, Customer, Identity, IdentityKind, Order
    from profiles.stores import customer_stores, load_stores
    from sequences.unsubscribe import make_token, unsubscribe_secret, unsubscribe_url

    errors = {} if errors is None else errors
    secret = unsubscribe_secret(session, settings)
    campaign = template.split("/")[-1]
    customers_t, carts_t, orders_t, identities_t = (
        Customer.__table__,
        Cart.__table__,
        Order.__table__,
        Identity.__table__,
    )
    contexts: dict[int, dict[str, Any]] = {}
    default_zone = _zone(settings.default_timezone) or ZoneInfo("UTC")
    # The same for every customer of the batch: computed once (URL building was a large share of a render).
    shop_link = add_utm(settings.site_url, medium=channel, campaign=campaign)
    cart_link = add_utm(settings.site_url.rstrip("/") + "/cart", medium=channel, campaign=campaign)
    zones: dict[str | None, ZoneInfo | None] = {}
    local_nows: dict[ZoneInfo, datetime] = {}
    store_dicts: dict[str, dict[str, Any]] = {}

    def zone_of(name: str | None) -> ZoneInfo | None:
        if name not in zones:
            zones[name] = _zone(name)
        return zones[name]

    def store_context(store: Mapping[str, Any], zone: ZoneInfo, local_now: datetime) -> dict[str, Any]:
        # A store's details are the same for every customer at ``now``: built once, copied for each (a
        # template may not change what another customer's message says). Its "today" is the store's, or
        # the customer's when the store has no valid timezone.
        key = store["id"] if zone_of(store.get("timezone")) else f"{store['id']}@{zone.key}"
        if key not in store_dicts:
            store_dicts[key] = _store_dict({**store, "source": None}, local_now)
        copied = _copy_store(store_dicts[key])
        if store.get("source"):
            copied["source"] = store["source"]
        return copied

    # Only the columns a context uses: whole rows cost more to read (JSON traits, timestamps) than to render.
    customer_columns = [
        customers_t.c[name]
        for name in (
            "id",
            "first_name",
            "last_name",
            "email",
            "phone",
            "locale",
            "timezone",
            "context_timezone",
            "home_store_id",
        )
    ]
    cart_columns = [
        carts_t.c[name] for name in ("customer_id", "status", "items", "value", "currency", "updated_at")
    ]
    order_columns = [
        orders_t.c[name]
        for name in (
            "customer_id",
            "order_id",
            "status",
            "store_id",
            "total",
            "currency",
            "items",
            "placed_at",
            "ready_at",
        )
    ]
    for start in range(0, len(customer_ids), CHUNK):
        chunk = list(customer_ids[start : start + CHUNK])
        customers = {
            r.id: r
            for r in session.execute(select(*customer_columns).where(customers_t.c.id.in_(chunk))).all()
        }
        carts: dict[int, Any] = {}
        # The status is checked here, not in SQL: with "status = 'open'" SQLite would walk the (status,
        # updated_at) index through every open cart in the store instead of looking up these customers.
        for row in session.execute(
            select(*cart_columns).where(carts_t.c.customer_id.in_(chunk)).order_by(carts_t.c.updated_at)
        ).all():
            if row.status == "open":
                carts[row.customer_id] = row  # the latest open cart wins
        orders: dict[int, Any] = {}
        for row in session.execute(
            select(*order_columns)
            .where(
                orders_t.c.customer_id.in_(chunk),
                orders_t.c.fulfillment == "pickup",
                orders_t.c.status != "picked_up",
            )
            .order_by(orders_t.c.updated_at)
        ):
            current = orders.get(row.customer_id)
            # A ready order beats one still being prepared; otherwise the latest.
            if current is None or not (
                current.status == "ready_for_pickup" and row.status != "ready_for_pickup"
            ):
                orders[row.customer_id] = row
        tokens: dict[int, list[str]] = {}
        if channel == "push":
            # The kind is checked here, not in SQL (which would walk the (kind, value) index through every
            # device token in the store instead of looking up these customers).
            for row in session.execute(
                select(identities_t.c.customer_id, identities_t.c.kind, identities_t.c.value)
                .where(identities_t.c.customer_id.in_(chunk))
                .order_by(identities_t.c.created_at.desc(), identities_t.c.id.desc())
            ):
                if row.kind == IdentityKind.DEVICE_TOKEN.value:
                    tokens.setdefault(row.customer_id, []).append(row.value)
        their_stores = customer_stores(session, list(customers))
        order_stores = load_stores(session, {o.store_id for o in orders.values() if o.store_id})
        for customer_id in chunk:
            row = customers.get(customer_id)
            if row is None:
                continue
            try:
                context = _customer_context(
                    row,
                    store=their_stores.get(customer_id),
                    order=orders.get(customer_id),
                    order_store=order_stores.get(orders[customer_id].store_id)
                    if customer_id in orders and orders[customer_id].store_id
                    else None,
                    cart=carts.get(customer_id),
                    zone_of=zone_of,
                    default_zone=default_zone,
                    local_nows=local_nows,
                    now=now,
                    store_context=store_context,
                    settings=settings,
                    channel=channel,
                    campaign=campaign,
                    shop_link=shop_link,
                    cart_link=cart_link,
                    unsubscribe=unsubscribe_url(
                        settings.unsubscribe_base_url, make_token(secret, row.id, channel)
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - odd data of one customer fails that customer only
                errors[customer_id] = RenderError(
                    template, customer_id, f"cannot build the message context: {_describe(exc)}", kind="data"
                )
                continue
            if channel == "push":
                context["_device_tokens"] = tokens.get(customer_id, [])
            contexts[customer_id] = context
    return contexts


def _customer_context(
    row: Any,
    *,
    store: Mapping[str, Any] | None,
    order: Any,
    order_store: Mapping[str, Any] | None,
    cart: Any,
    zone_of: Any,
    default_zone: ZoneInfo,
    local_nows: dict[ZoneInfo, datetime],
    now: datetime,
    store_context: Any,
    settings: Any,
    channel: str,
    campaign: str,
    shop_link: str,
    cart_link: str,
    unsubscribe: str,
) -> dict[str, Any]:
    # The customer's timezone: the rule of sequences.policy.customer_timezones (traits, then the latest
    # context timezone, then the home store's, then the default).
    home = store if store is not None and store.get("source") == "home" else None
    zone = (
        zone_of(row.timezone)
        or zone_of(row.context_timezone)
        or (zone_of(home.get("timezone")) if home is not None else None)
        or default_zone
    )
    local_now = local_nows.get(zone)
    if local_now is None:
        local_now = local_nows[zone] = now.astimezone(zone)
    name = " ".join(p for p in (row.first_name, row.last_name) if p) or None
    customer = {
        "id": row.id,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "name": name,
        "email": row.email,
        "phone": row.phone,
        "locale": row.locale,
        "timezone": zone.key,
    }
    links = {"shop": shop_link}
    context: dict[str, Any] = {
        "customer": {k: v for k, v in customer.items() if v is not None},
        "brand": settings.brand_name,
        "now": local_now,
        "channel": channel,
        "campaign": campaign,
        "links": links,
        "unsubscribe_url": unsubscribe,
        # Always defined, possibly None: templates say {% if store %} ... {% else %} ... {% endif %}.
        "store": store_context(store, zone, local_now) if store is not None else None,
    }
    if cart is not None and cart.items:
        items = _items(cart.items)
        context["cart"] = {
            "items": items,
            "item_count": sum(int(i.get("quantity") or 0) for i in items),
            "total": float(cart.value or 0),
            "currency": cart.currency or "USD",
            "updated_at": cart.updated_at.astimezone(zone),
        }
        links["cart"] = cart_link
    if order is not None:
        order_context = {
            "order_id": order.order_id,
            "status": order.status,
            "ready": order.status == "ready_for_pickup",
            "total": float(order.total or 0),
            "currency": order.currency or "USD",
            "items": _items(order.items),
            "placed_at": order.placed_at.astimezone(zone) if order.placed_at else None,
            "ready_at": order.ready_at.astimezone(zone) if order.ready_at else None,
        }
        if order_store is not None:
            same = context["store"] is not None and context["store"].get("id") == order_store["id"]
            order_context["store"] = context["store"] if same else store_context(order_store, zone, local_now)
        context["order"] = {k: v for k, v in order_context.items() if v is not None}
        links["order"] = add_utm(
            f"{settings.site_url.rstrip('/')}/orders/{order.order_id}",
            medium=channel,
            campaign=campaign,
        )
    return context
