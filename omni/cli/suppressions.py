"""``omni suppressions list | lift`` and ``omni feedback unmatched``: what the deliverability rules hold.

- ``omni suppressions list``: the addresses no message may go to (hard bounces), newest first;
- ``omni suppressions lift ADDRESS``: an operator's call to make an address reachable again;
- ``omni feedback unmatched``: the events SendGrid and Twilio posted that Omni kept without a match (an
  unknown delivery id or phone number, or not an event), for a person to look at.
"""

from __future__ import annotations

from datetime import datetime
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
    parse_now,
    print_json,
)

suppressions_app = typer.Typer(
    help="Suppressed addresses: hard bounces no message goes to, whoever holds the address.",
    no_args_is_help=True,
)
feedback_app = typer.Typer(
    help="What SendGrid and Twilio posted to `omni serve`'s feedback webhooks.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(suppressions_app, name="suppressions")
    app.add_typer(feedback_app, name="feedback")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _check_kind(kind: str | None) -> None:
    from profiles.consent import SUPPRESSIBLE  # the address kinds: email, phone

    if kind is not None and kind not in SUPPRESSIBLE:
        raise BadInput(f"unknown address kind {kind!r} (expected {' or '.join(SUPPRESSIBLE)})")


def _kind_of(address: str, kind: str | None) -> str:
    _check_kind(kind)
    return kind or ("email" if "@" in address else "phone")


def _normalized(address: str, kind: str) -> str:
    from omni.core.settings import get_settings
    from profiles.segment import normalize_email, normalize_phone

    if kind == "email":
        value = normalize_email(address)
    else:
        value = normalize_phone(address, get_settings().default_phone_region)
    if not value:
        raise BadInput(f"{address!r} is not {'an email address' if kind == 'email' else 'a phone number'}")
    return value


@suppressions_app.command("list")
@handle_errors
def suppressions_list(
    kind: Annotated[str | None, typer.Option("--kind", help="email or phone.")] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent suppressions to show.")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """Suppressed addresses, newest first: address, kind, reason, source, when, and the provider's words."""
    from profiles.db import session_scope
    from profiles.suppression import list_suppressions

    _check_kind(kind)
    engine = open_store(database_url)
    with session_scope(engine) as session:
        rows = list_suppressions(session, kind=kind, limit=limit, offset=offset)
    if json:
        print_json(rows)
        return
    table = Table(title=f"Suppressed addresses ({len(rows)} shown)", title_justify="left")
    for column in ("address", "kind", "reason", "source", "when", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["address"],
            row["kind"],
            row["reason"],
            row["source"],
            _when(row["created_at"]),
            (row["detail"] or "")[:160],
        )
    console.print(table)


@suppressions_app.command("lift")
@handle_errors
def suppressions_lift(
    address: Annotated[str, typer.Argument(help="The email address or phone number (E.164, or national).")],
    kind: Annotated[
        str | None, typer.Option("--kind", help="email or phone (default: email when it has an @).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
) -> None:
    """Lift the suppression of an address: messages may go to it again (consent still decides). Exits 2
    when the address is not suppressed."""
    from profiles.db import session_scope
    from profiles.suppression import customers_with_each, lift_suppression

    kind = _kind_of(address, kind)
    value = _normalized(address, kind)
    engine = open_store(database_url)
    with session_scope(engine) as session:
        lifted = lift_suppression(session, kind, value)
        if lifted is None:
            raise BadInput(f"{kind} {value} is not suppressed")
        holders = customers_with_each(session, kind, [value]).get(value, [])
    if json:
        print_json({"lifted": lifted, "customers": holders})
        return
    console.print(
        f"Lifted the suppression of {kind} {value} ({lifted['reason']} from {lifted['source']}, "
        f"since {_when(lifted['created_at'])}). Customers holding it: "
        f"{', '.join(map(str, holders)) or 'none'}.",
        highlight=False,
        markup=False,
    )


@feedback_app.command("unmatched")
@handle_errors
def feedback_unmatched(
    provider: Annotated[str | None, typer.Option("--provider", help="sendgrid or twilio.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Received at or after this time (ISO-8601).")
    ] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent events to show.")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """Provider events kept without a match, newest first: unknown_delivery (no delivery has the id it
    names), unknown_number (no customer has the sender's phone), invalid (not an event). --json adds
    each event's payload as the provider sent it."""
    from profiles.db import session_scope
    from profiles.feedback import SENDGRID, TWILIO, unmatched_events

    if provider is not None and provider not in (SENDGRID, TWILIO):
        raise BadInput(f"unknown provider {provider!r} (expected {SENDGRID} or {TWILIO})")
    try:
        after = parse_now(since) if since is not None else None
    except BadInput:
        raise BadInput(f"--since {since!r} is not an ISO-8601 time (e.g. 2026-06-02T10:00:00Z)") from None
    engine = open_store(database_url)
    with session_scope(engine) as session:
        rows = unmatched_events(session, provider=provider, since=after, limit=limit, offset=offset)
    if json:
        print_json(rows)
        return
    table = Table(title=f"Unmatched provider events ({len(rows)} shown)", title_justify="left")
    for column in ("received", "provider", "kind", "outcome", "delivery id", "address", "event key"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            _when(row["received_at"]),
            row["provider"],
            row["kind"],
            row["outcome"],
            row["delivery_id"] or "",
            row["address"] or "",
            row["event_key"],
        )
    console.print(table)
