"""What every ``omni`` command shares: options, output (human or ``--json``) and exit codes.

Exit codes: 0 success, 1 runtime failure, 2 bad input or usage. With ``--json``, stdout holds exactly
one JSON document; messages and progress go to stderr.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

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
        return datetime.now(UTC)
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
    from profiles.db import get_engine, require_schema

    engine = get_engine(database_url)
    if require:
        require_schema(engine)
    return engine


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Turn known exceptions into a one-line message and the contract's exit code."""
    from audiences.definitions import DefinitionError
    from profiles.db import SchemaNotReady

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BadInput as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        except DefinitionError as exc:  # an audience, sequence or campaign file: file, path and reason
            fail(f"invalid definition: {exc}", EXIT_BAD_INPUT)
        except (SchemaNotReady, Failure) as exc:
            fail(str(exc), EXIT_FAILURE)
        except OperationalError as exc:
            fail(f"cannot use the profile store: {exc.orig}", EXIT_FAILURE)
        except SQLAlchemyError as exc:
            fail(f"database error: {exc}", EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]
