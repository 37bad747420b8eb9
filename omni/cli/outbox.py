"""``omni outbox list``: what the default outbox connector "sent"."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from omni.cli.common import (
    BadInput,
    DatabaseUrlOption,
    JsonOption,
    console,
    handle_errors,
    open_store,
    print_json,
)
from omni.core.channels import SEND_CHANNELS, Channel

outbox_app = typer.Typer(
    help="Messages recorded by the outbox connector (the default).", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(outbox_app, name="outbox")


@outbox_app.command("list")
@handle_errors
def outbox_list(
    channel: Annotated[str | None, typer.Option("--channel", help=", ".join(SEND_CHANNELS) + ".")] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent messages to show.")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """Messages in the outbox, newest first, exactly as they would have gone out."""
    from profiles.db import session_scope
    from profiles.outbox import list_outbox

    if channel is not None and channel not in SEND_CHANNELS:
        raise BadInput(f"unknown channel {channel!r} (expected one of {', '.join(SEND_CHANNELS)})")
    engine = open_store(database_url)
    with session_scope(engine) as session:
        rows = list_outbox(session, channel=channel, limit=limit, offset=offset)
    if json:
        print_json(rows)
        return
    table = Table(title=f"Outbox ({len(rows)} shown)", title_justify="left")
    for column in ("sent at", "channel", "customer", "to", "template", "subject / body"):
        table.add_column(column, overflow="fold")
    for row in rows:
        summary = row["subject"] or ""
        body = (row["body"] or "").strip().replace("\n", " ")
        if body and row["channel"] != Channel.EMAIL:  # an email's body is the whole message
            summary = f"{summary}: {body}" if summary else body
        table.add_row(
            row["sent_at"].strftime("%Y-%m-%d %H:%M:%S"),
            row["channel"],
            str(row["customer_id"] or ""),
            row["to"] or "",
            row["template"] or "",
            summary[:160],
        )
    console.print(table)
