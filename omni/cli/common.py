"""What every ``omni`` command shares: options, output (human or ``--json``) and exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage. With ``--json``, stdout holds exactly
one JSON document; messages and progress go to stderr.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, NoReturn, TypeVar

import click
import orjson
import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from typer.core import TyperGroup

from omni.core.clock import utcnow

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="OMNI_DATABASE_URL",
        help="Profile store URL (default: sqlite:///omni.db in the working directory).",
        show_envvar=True,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document to stdout and nothing else there.")
]
NowOption = Annotated[
    str | None,
    typer.Option("--now", help="Act as if it were this time (ISO-8601; default: the current time, UTC)."),
]


class BadInput(Exception):
    """Input or usage a person must correct: exit code 2."""


class Failure(Exception):
    """A runtime failure: exit code 1."""


def parse_now(value: str | None) -> datetime:
    if value is None:
        return utcnow()
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadInput(f"--now {value!r} is not an ISO-8601 time (e.g. 2026-06-02T10:00:00Z)") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(value: Any) -> str:
    return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()


def print_json(value: Any) -> None:
    typer.echo(to_json(value))


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def open_store(database_url: str | None, *, require: bool = True) -> Engine:
    """The store at ``database_url`` (``--database-url``; default: the settings'), its schema checked
    unless ``require`` is false."""
    from omni.core.settings import get_settings
    from profiles.db import get_engine, require_schema

    engine = get_engine(database_url or get_settings().database_url)
    if require:
        require_schema(engine)
    return engine


F = TypeVar("F", bound=Callable[..., Any])

DEBUG_HINT = "run again with --debug (or OMNI_DEBUG=1) to see the traceback"


_debug = False


def set_debug(value: bool) -> None:
    """Set by ``omni --debug`` (or ``OMNI_DEBUG=1``) at every invocation."""
    global _debug
    _debug = value


def debug_enabled() -> bool:
    """``omni --debug`` or ``OMNI_DEBUG=1``: let exceptions through with their traceback."""
    return _debug or os.environ.get("OMNI_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def classify_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for the errors Omni knows, None for anything else.

    Input a person must correct (a definition, an unknown name, a missing file, a bad value) is 2; the
    store, a provider, a connector's missing settings or another runtime failure is 1.
    """
    from audiences.build import UnknownAudience
    from audiences.definitions import DefinitionError
    from profiles.db import SchemaNotReady

    if isinstance(exc, BadInput):
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, Failure | SchemaNotReady):
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, DefinitionError):  # an audience, sequence or campaign file: file, path and reason
        return EXIT_BAD_INPUT, f"invalid definition: {exc}"
    if isinstance(exc, OperationalError):
        return EXIT_FAILURE, f"cannot use the profile store: {exc.orig}"
    if isinstance(exc, SQLAlchemyError):
        return EXIT_FAILURE, f"database error: {exc}"
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "ConnectorConfigError" in names:  # the environment's settings (OMNI_*), as `campaigns send` says
        return EXIT_FAILURE, f"connector not configured: {exc}"
    if isinstance(exc, UnknownAudience) or names & {"UnknownSequence", "UnknownCampaign"}:
        return EXIT_BAD_INPUT, str(exc)
    if names & {"RenderError", "DeliveryHalted"}:
        return (EXIT_BAD_INPUT if "RenderError" in names else EXIT_FAILURE), str(exc)
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        if exc.strerror and exc.filename:
            return EXIT_BAD_INPUT, f"{exc.strerror}: {exc.filename}"
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, PermissionError):
        return EXIT_FAILURE, f"permission denied: {exc.filename or exc}"
    if isinstance(exc, ValueError):  # bad values: settings, --now, a definition's content ...
        return EXIT_BAD_INPUT, " ".join(str(exc).split()) or type(exc).__name__
    return None


def report_error(exc: BaseException) -> NoReturn:
    """Print one line on stderr and exit: the contract's code for a known error, 1 (with how to see the
    traceback) for anything unexpected."""
    known = classify_error(exc)
    if known is not None:
        fail(known[1], known[0])
    detail = " ".join(str(exc).split())
    fail(f"unexpected {type(exc).__name__}{': ' + detail if detail else ''} ({DEBUG_HINT})", EXIT_FAILURE)


def handle_errors(func: F) -> F:
    """Turn known exceptions into a one-line message and the contract's exit code (see
    :func:`classify_error`); anything else goes on to the top-level guard (:class:`GuardedGroup`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            if debug_enabled() or classify_error(exc) is None:
                raise
            report_error(exc)

    return wrapper  # type: ignore[return-value]


class GuardedGroup(TyperGroup):
    """The top-level ``omni`` group: no command ends in a raw traceback. Known errors print one line on
    stderr with exit code 2 (bad input) or 1 (runtime failure); unexpected ones print one line and how to
    see the traceback (``--debug`` or ``OMNI_DEBUG=1``, which let every exception through)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            report_error(exc)
