"""Loading marketer-written definitions (audiences, sequences, campaigns): YAML files, durations and
percentages, and errors that name the file, the path inside it and the reason.

One loader for every kind: a folder of ``*.yaml`` / ``*.yml`` files (:func:`load_folder`), each
validated by a pydantic model of its kind (a :class:`DefinitionModel`, with the field types below);
a ``ValidationError`` becomes a :class:`DefinitionError` naming the first bad path
(:func:`validate_definition`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

DURATION_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
DEFINITION_SUFFIXES = (".yaml", ".yml")


class DefinitionError(ValueError):
    """An invalid definition: ``file``, ``path`` inside it and ``reason``."""

    def __init__(self, file: str, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason
        where = f"{file}: {path}" if path else file
        super().__init__(f"{where}: {reason}")


def parse_duration(value: Any) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` (a number and one unit) to a timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = DURATION_PATTERN.match(value)
        if match:
            amount, unit = float(match.group(1)), match.group(2)
            return timedelta(**{DURATION_UNITS[unit]: amount})
    raise ValueError(f"bad duration {value!r}: expected a number and a unit s, m, h, d or w (e.g. 7d)")


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_percent(value: Any) -> float:
    """``10%``, ``10`` or ``2.5%`` to a number between 0 and 100."""
    text = str(value).strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        result = float(number)
    except ValueError:
        raise ValueError(f"expected a percentage like 10%, got {value!r}") from None
    if not 0 <= result <= 100:
        raise ValueError(f"a percentage must be between 0% and 100%, got {value!r}")
    return result


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("a duration must be positive")
    return value


def snake_case(what: str, *, max_length: int = 200) -> Any:
    """The type of a lower_snake_case name (``cart_abandoners``) of at most ``max_length`` characters;
    ``what`` names it in the error (``a sequence name``)."""
    pattern = re.compile(rf"^[a-z][a-z0-9_]{{0,{max_length - 1}}}$")

    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"{what} is lower_snake_case, got {value!r}")
        return value

    return Annotated[str, BeforeValidator(check)]


# Field types of definition models.
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]
Percent = Annotated[float, BeforeValidator(parse_percent)]
# Free text; an empty YAML value (``description:``) is no text.
Text = Annotated[str, BeforeValidator(lambda value: "" if value is None else value)]


def format_loc(base: str, loc: Iterable[Any]) -> str:
    """A pydantic error location as the path a marketer reads: ``steps[2].send.channel``."""
    path = base
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            part = "in" if part == "in_" else part
            path += f".{part}" if path else str(part)
    return path


def first_error(exc: ValidationError) -> tuple[tuple, str]:
    """The location and a readable message of the first error of ``exc``. An unknown key comes first:
    a misspelt key is why the one it was meant to be is missing."""
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    # Not what the marketer wrote: pydantic's labels of validators and literals, and the tags of a
    # discriminated union (written ``<tag>`` by convention here).
    loc = tuple(
        p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal[", "<")))
    )
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if error["type"] == "extra_forbidden":
        message = "unknown option"
    elif error["type"] == "literal_error":
        message = f"{error.get('input')!r} is not allowed: {message.lower()}"
    elif error["type"] in ("model_type", "dict_type"):
        given = error.get("input")
        message = f"expected a mapping, got {'nothing' if given is None else type(given).__name__}"
    return loc, message


def definition_error(
    exc: ValidationError, *, file: str, base: str = "", model: type[BaseModel] | None = None
) -> DefinitionError:
    """``exc`` as a DefinitionError naming ``file`` and the path of its first error under ``base``. With
    the ``model`` that raised it, an unknown key says which keys are known there."""
    loc, message = first_error(exc)
    known = _known_keys(model, loc) if model is not None and message == "unknown option" else None
    if known:
        message = f"unknown key (expected {', '.join(known)})"
    return DefinitionError(file, format_loc(base, loc), message)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _models_in(arg)]


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys known beside the unknown one at ``loc``: those of the model ``loc`` leads to from
    ``model``; None where that cannot be told (a union of models)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        models = _models_in(field.annotation) if field is not None else []
        if len(models) != 1:
            return None
        model = models[0]
    return [field.alias or name for name, field in model.model_fields.items()]


class DefinitionModel(BaseModel):
    """The base of definition models: a key the model does not know is an error, and a loaded
    definition does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def validate_definition(
    model: type[M], raw: Any, *, file: str, base: str = "", context: dict[str, Any] | None = None
) -> M:
    """``raw`` (parsed YAML) validated by ``model``; DefinitionError naming ``file`` and the path (under
    ``base``) of the first error. ``context`` reaches the validators (what a definition refers to)."""
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as exc:
        raise definition_error(exc, file=file, base=base, model=model) from None


def read_yaml(path: Path) -> tuple[Any, str]:
    """The parsed YAML of ``path`` and its text; DefinitionError (with the line) when it cannot be."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DefinitionError(file, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DefinitionError(file, "", "not UTF-8 text") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise DefinitionError(file, where, f"invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    return raw, text


def definition_files(directory: Path) -> list[Path]:
    """The definition files of ``directory`` in name order."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in DEFINITION_SUFFIXES)


class Named(Protocol):
    name: str


D = TypeVar("D", bound=Named)


def load_folder(
    directory: Path,
    parse: Callable[[Any, str, str], D],
    *,
    kind: str,
    where: Callable[[D], str] = lambda d: getattr(d, "file", None) or getattr(d, "source", ""),
    missing_ok: bool = False,
) -> dict[str, D]:
    """Every definition file of ``directory`` parsed by ``parse(raw, file, text)``, by name. Two files
    defining the same name, an unreadable file, bad YAML: DefinitionError naming the file. A missing
    folder is an error unless ``missing_ok`` (campaigns: a project with none)."""
    folder = Path(directory)
    if not folder.is_dir():
        if missing_ok:
            return {}
        raise DefinitionError(str(folder), "", f"no such directory of {kind} definitions")
    found: dict[str, D] = {}
    for path in definition_files(folder):
        raw, text = read_yaml(path)
        definition = parse(raw, str(path), text)
        if definition.name in found:
            raise DefinitionError(
                str(path),
                "name",
                f"{kind} {definition.name!r} is also defined in {where(found[definition.name])}",
            )
        found[definition.name] = definition
    return found
