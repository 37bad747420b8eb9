"""The sandbox templates render in: Jinja2's ``SandboxedEnvironment`` with ``StrictUndefined``, under
render limits.

A template is code a marketer writes: it must not be able to take a tick down. Every render runs under a
budget (a deadline and an output cap, per render of one customer) and every operation that could build a
huge value from a small template is checked *before* it allocates: ``range`` size, ``**`` / ``*`` results
(big integers, repeated strings and lists), ``+`` and ``~`` concatenation, ``%`` / ``format`` widths,
string methods that grow their input (``center``, ``ljust``, ``replace``, ``join``, ``expandtabs`` ...),
filters that do (``center``, ``indent``, ``replace``, ``join``, ``format``, ``batch``, ``slice``,
``wordwrap``, ``round``), ``lipsum``, and list / dict growth through their methods. Loops check the
deadline on every iteration, calls and operators on every use. A render over a limit raises
:class:`LimitExceeded` saying which limit (``templates.rendering`` makes it that customer's
``RenderError``).
"""

from __future__ import annotations

import gc
import itertools
import math
import re
import string
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, update_wrapper, wraps
from pathlib import Path
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    nodes,
    pass_environment,
    pass_eval_context,
)
from jinja2 import filters as jinja_filters
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from templates.filters import FILTERS


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
# A template that runs out of time for this many customers of a batch is not run for the rest of it
# (each would cost the full deadline): they fail at once with the same reason.
TIME_FAILURES_PER_BATCH = 3


class LimitExceeded(SecurityError):
    """A template went over one of the render limits (``kind``: time, output, size, range, arithmetic,
    format, items)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _GarbageCollectionClock(threading.local):
    """CPU time each thread spent in the garbage collector.

    A collection runs in whichever thread's allocation triggered it and walks the whole process's heap:
    in a big process (a shard worker beside seven others, a long test session) a full collection takes
    longer than a render's whole budget, and it is not the template's doing."""

    started: float | None = None
    spent: float = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.thread_time()
        elif self.started is not None:
            self.spent += time.thread_time() - self.started
            self.started = None


_GC_CLOCK = _GarbageCollectionClock()
# A render's own CPU time, garbage collections included, may reach this many times its budget.
GC_ALLOWANCE = 10
gc.callbacks.append(_GC_CLOCK)


class Budget:
    """What one render (all parts of a template, for one customer) may still spend.

    The time limit is on the CPU time of the rendering thread, less what it spent collecting the
    process's garbage: wall-clock time also counts waiting for the GIL or the CPU, and a full collection
    walks every object of the process; on a busy machine (several shard workers in one process) either
    made well-behaved templates fail. ``deadline`` is a cheap wall-clock bound checked first; when it
    passes, :meth:`out_of_time` reads the thread's CPU time and moves the deadline by the time spent
    waiting or collecting."""

    __slots__ = ("cpu_start", "deadline", "gc_start", "output", "output_limit", "seconds")

    def __init__(self, seconds: float, output_limit: int) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cpu_start = time.thread_time()
        self.gc_start = _GC_CLOCK.spent
        self.output = 0
        self.output_limit = output_limit

    def cpu_used(self) -> float:
        """CPU time the render itself used so far (garbage collection excluded)."""
        return time.thread_time() - self.cpu_start - (_GC_CLOCK.spent - self.gc_start)

    def out_of_time(self) -> bool:
        """Called once the wall-clock deadline passed: True when the render used up its CPU time (or,
        collections included, :data:`GC_ALLOWANCE` times that: a template cannot hide a runaway loop
        behind collections it provokes)."""
        if time.thread_time() - self.cpu_start >= self.seconds * GC_ALLOWANCE:
            return True
        left = self.seconds - self.cpu_used()
        if left <= 0:
            return True
        self.deadline = time.monotonic() + left
        return False

    def check_time(self) -> None:
        if time.monotonic() > self.deadline and self.out_of_time():
            raise LimitExceeded("time", f"the render took longer than {self.seconds:g} s")


BUDGET: ContextVar[Budget | None] = ContextVar("omni_render_budget", default=None)


def _tick() -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.check_time()


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
    budget = BUDGET.get()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        if time.monotonic() > budget.deadline:
            budget.check_time()
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
        budget = BUDGET.get()
        if budget is not None:
            budget.check_time()
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
    """The sandbox loading templates from ``directory`` (one per folder, for the life of the process)."""
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
    env.filters.update(FILTERS)
    env.filters = {
        name: f if name in UNGUARDED_FILTERS else _guard_filter(f) for name, f in env.filters.items()
    }
    return env


def render_limited(template: Template, context: Mapping[str, Any], budget: Budget) -> str:
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
