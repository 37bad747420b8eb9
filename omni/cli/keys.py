"""``omni keys create | list | revoke``: the API keys of ``omni serve``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from omni.cli.common import (
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

keys_app = typer.Typer(
    help="API keys of `omni serve`: write keys send events (each names its source), read keys read profiles.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


@keys_app.command("create")
@handle_errors
def keys_create(
    source: Annotated[
        str,
        typer.Option(
            "--source", help="What sends with the key (web, app, pos-lisbon ...); recorded on its events."
        ),
    ],
    scope: Annotated[
        str, typer.Option("--scope", help="write: send events (tracking API); read: profile API and pages.")
    ] = "write",
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Create a key and print it, once: only its hash is stored. Without --json, stdout holds just the key."""
    from profiles.apikeys import create_key
    from profiles.db import session_scope

    engine = open_store(database_url)
    with session_scope(engine) as session:
        key, plaintext = create_key(session, source=source, scope=scope, now=parse_now(now))
    if json:
        print_json({"key": plaintext, **key.to_dict()})
        return
    err_console.print(
        f"Created {key.scope} key {key.id} for source {key.source!r}. It is shown once; keep it now:",
        highlight=False,
    )
    typer.echo(plaintext)


@keys_app.command("list")
@handle_errors
def keys_list(
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    active: Annotated[bool, typer.Option("--active", help="Leave revoked keys out.")] = False,
) -> None:
    """Every key: id, prefix (its first characters), source, scope, created, revoked. Never the key."""
    from profiles.apikeys import list_keys
    from profiles.db import session_scope

    engine = open_store(database_url)
    with session_scope(engine) as session:
        keys = list_keys(session, include_revoked=not active)
    if json:
        print_json([key.to_dict() for key in keys])
        return
    table = Table(title=f"API keys ({len(keys)})", title_justify="left")
    for column in ("id", "prefix", "source", "scope", "created", "revoked"):
        table.add_column(column)
    for key in keys:
        table.add_row(
            str(key.id),
            key.prefix,
            key.source,
            str(key.scope),
            key.created_at.strftime("%Y-%m-%d %H:%M"),
            key.revoked_at.strftime("%Y-%m-%d %H:%M") if key.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
@handle_errors
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id or prefix (from `omni keys list`), or the key.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Revoke a key: the server refuses it (401) from its next request on. Revoking twice is harmless."""
    from profiles.apikeys import revoke_key
    from profiles.db import session_scope

    engine = open_store(database_url)
    with session_scope(engine) as session:
        revoked = revoke_key(session, key, now=parse_now(now))
    if json:
        print_json(revoked.to_dict())
        return
    console.print(f"Revoked {revoked.scope} key {revoked.id} ({revoked.prefix}…, source {revoked.source!r}).")
