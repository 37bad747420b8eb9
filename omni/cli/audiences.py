"""Audience commands: list, show, build, members."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.syntax import Syntax
from rich.table import Table

from omni.cli.common import (
    BadInput,
    DatabaseUrlOption,
    JsonOption,
    NowOption,
    console,
    err_console,
    handle_errors,
    open_store,
    parse_now,
    print_json,
)
from omni.core.settings import get_settings

audiences_app = typer.Typer(
    help="Audiences: who a campaign or sequence is for (definitions in audiences/*.yaml).",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(audiences_app, name="audiences")


def _definitions() -> dict:
    from audiences import load_audiences

    # An invalid file is reported by handle_errors (exit 2).
    return load_audiences(get_settings().audiences_dir)


def _definition(definitions: dict, name: str):
    if name not in definitions:
        known = ", ".join(sorted(definitions)) or "none"
        raise BadInput(f"unknown audience {name!r} (known: {known})")
    return definitions[name]


def _fmt_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


@audiences_app.command("list")
@handle_errors
def list_audiences(database_url: DatabaseUrlOption = None, json: JsonOption = False) -> None:
    """Every audience with its description, and its size and time at the last build."""
    from audiences import last_builds

    definitions = _definitions()
    engine = open_store(database_url)
    builds = last_builds(engine)
    rows = []
    for name, definition in sorted(definitions.items()):
        build = builds.get(name) or {}
        rows.append(
            {
                "name": name,
                "description": definition.description,
                "depends_on": definition.dependencies,
                "size": build.get("size"),
                "built_at": build.get("built_at"),
                "entered": build.get("entered"),
                "exited": build.get("exited"),
                "duration_ms": build.get("duration_ms"),
            }
        )
    if json:
        print_json(rows)
        return
    from audiences.definitions import audiences_directory

    folder = audiences_directory(get_settings().audiences_dir)
    table = Table(title=f"Audiences in {folder} ({len(rows)})", title_justify="left")
    for column in ("name", "description", "last size", "last build"):
        table.add_column(column, overflow="fold")
    for row in rows:
        size = "-" if row["size"] is None else str(row["size"])
        table.add_row(row["name"], row["description"], size, _fmt_time(row["built_at"]))
    console.print(table)


@audiences_app.command("show")
@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Audience name.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """The definition as written and the SQL it compiles to for the store's database (windows at --now)."""
    from audiences import compile_audience, render_sql

    definitions = _definitions()
    definition = _definition(definitions, name)
    at = parse_now(now)
    engine = open_store(database_url, require=False)
    sql = render_sql(compile_audience(definition, now=at, definitions=definitions), engine.dialect)
    if json:
        print_json(
            {
                "name": definition.name,
                "description": definition.description,
                "source": definition.source,
                "depends_on": definition.dependencies,
                "definition": definition.text,
                "dialect": engine.dialect.name,
                "now": at,
                "sql": sql,
            }
        )
        return
    console.print(f"[bold]{definition.name}[/]  ({definition.source})", highlight=False)
    if definition.description:
        console.print(definition.description, highlight=False)
    console.print()
    _print_code((definition.text or "").rstrip(), "yaml")
    console.print()
    console.print(f"[bold]SQL[/] ({engine.dialect.name}, now = {at.isoformat()}):")
    _print_code(sql, "sql")


def _print_code(code: str, lexer: str) -> None:
    """Highlighted, and soft-wrapped: no line breaks are added inside a line and nothing is cut off,
    so YAML and SQL copied from the terminal (or a pipe) stay valid."""
    text = Syntax(code, lexer).highlight(code)
    text.rstrip()
    console.print(text, soft_wrap=True)


@audiences_app.command("build")
@handle_errors
def build(
    names: Annotated[
        list[str] | None,
        typer.Argument(
            help="Audiences to build (default: all); the audiences they refer to are built first."
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Rebuild audiences at --now: members, and who entered and exited since the last build.

    A build at a --now earlier than the last build (say, after a preview with --now in the future)
    replaces the history after that time: the latest build in time always wins."""
    from audiences import build_audience, build_order

    definitions = _definitions()
    for name in names or []:
        _definition(definitions, name)
    at = parse_now(now)
    engine = open_store(database_url)
    results = {}
    for name in build_order(definitions, names or None):
        result = build_audience(engine, name, now=at, definitions=definitions)
        results[name] = result
        if not json:  # the results, on stdout as each audience is built
            console.print(
                f"{name}: {result.size} members, {result.entered} entered, {result.exited} exited "
                f"({result.duration_ms} ms)",
                highlight=False,
                markup=False,
            )
    if json:
        print_json({name: result.as_dict() for name, result in results.items()})


@audiences_app.command("members")
@handle_errors
def members_command(
    name: Annotated[str, typer.Argument(help="Audience name.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Members per page.")] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Members to skip.")] = 0,
) -> None:
    """Current members as of the last build (customer id, email, when they entered), oldest first."""
    from audiences import members

    _definition(_definitions(), name)
    engine = open_store(database_url)
    total, rows = members(engine, name, limit=limit, offset=offset)
    if json:
        print_json(rows)
        return
    table = Table(
        title=f"{name}: members {offset + 1 if rows else 0}-{offset + len(rows)} of {total}",
        title_justify="left",
    )
    for column in ("customer", "email", "entered"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["customer_id"]), row["email"] or "", _fmt_time(row["entered_at"]))
    console.print(table)
    if offset + len(rows) < total:
        err_console.print(f"next page: --offset {offset + len(rows)}", highlight=False)
