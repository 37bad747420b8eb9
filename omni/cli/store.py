"""Profile-store commands: init, ingest, profile, consent, rejected, stores."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import func, select

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
from omni.core.channels import CONSENT_CHANNELS, OMNI_CHANNEL, TOUCHPOINTS
from omni.core.settings import get_settings
from omni.core.statuses import ConsentStatus

PROGRESS_MIN_BYTES = 1 << 20  # show a progress bar for inputs of 1 MB and more

profile_app = typer.Typer(help="Look at unified customer profiles.", no_args_is_help=True)
consent_app = typer.Typer(
    help="Record marketing consent by hand (e.g. after a call-centre request).", no_args_is_help=True
)
rejected_app = typer.Typer(help="Payloads that could not be stored, with the reason.", no_args_is_help=True)
stores_app = typer.Typer(help="Physical stores (home store, pickup, hours).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("ingest")(ingest)
    app.add_typer(profile_app, name="profile")
    app.add_typer(consent_app, name="consent")
    app.add_typer(rejected_app, name="rejected")
    app.add_typer(stores_app, name="stores")


@handle_errors
def init(database_url: DatabaseUrlOption = None, json: JsonOption = False) -> None:
    """Create or upgrade the profile store's schema (safe to run again)."""
    from profiles.db import current_revision, upgrade_schema
    from sequences.unsubscribe import ensure_unsubscribe_secret

    engine = open_store(database_url, require=False)
    before = current_revision(engine)
    upgrade_schema(engine)
    ensure_unsubscribe_secret(engine)
    after = current_revision(engine)
    url = engine.url.render_as_string(hide_password=True)
    if json:
        print_json(
            {"database_url": url, "revision": after, "previous_revision": before, "changed": before != after}
        )
    elif before == after:
        console.print(f"Profile store at {url} is up to date (revision {after}).")
    else:
        console.print(f"Profile store at {url} is at revision {after} (was {before or 'empty'}).")


@handle_errors
def ingest(
    paths: Annotated[
        list[str], typer.Argument(help="Files of JSON lines or JSON documents; '-' reads stdin.")
    ],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, max=100_000, help="Payloads per batch.")
    ] = None,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Ingest Segment-spec payloads (identify, track, page, screen, group, alias, batch).

    Bad payloads are kept in the store with the reason (see `omni rejected list`); the rest go on.
    """
    from profiles.ingest import IngestOptions, InputNotFound, ingest_files

    options = IngestOptions.of(get_settings())
    if batch_size is not None:
        options = replace(options, batch_size=batch_size)
    received_at = parse_now(now)
    engine = open_store(database_url)
    show = progress if progress is not None else err_console.is_terminal
    bar: Progress | None = None
    task = None

    def on_file(name: str, size: int | None) -> None:
        nonlocal task
        if bar is not None:
            task = bar.add_task(name, total=size if size and size >= PROGRESS_MIN_BYTES else None)

    def on_bytes(count: int) -> None:
        if bar is not None and task is not None:
            bar.advance(task, count)

    try:
        if show:
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )
            with bar:
                result = ingest_files(
                    engine, paths, options=options, now=received_at, on_bytes=on_bytes, on_file=on_file
                )
        else:
            result = ingest_files(engine, paths, options=options, now=received_at)
    except InputNotFound as exc:
        raise BadInput(str(exc)) from None
    if json:
        print_json(result.as_dict())
        return
    console.print(
        f"accepted [bold]{result.accepted}[/], duplicates [bold]{result.duplicates}[/], "
        f"rejected [bold]{result.rejected}[/] (of {result.read} payloads read)"
    )
    for source, reason in result.samples:
        err_console.print(f"  rejected {source}: {reason}", highlight=False, markup=False)
    if result.rejected > len(result.samples):
        err_console.print(f"  ... and {result.rejected - len(result.samples)} more")
    if result.rejected:
        err_console.print("  Rejected payloads are kept with their reason: `omni rejected list`.")


@profile_app.command("show")
@handle_errors
def profile_show(
    key: Annotated[
        str, typer.Argument(help="Customer id, email, phone, or any identity value (userId, anonymousId…).")
    ],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent events to show.")] = 50,
) -> None:
    """The unified profile and timeline of one customer across every channel."""
    from profiles.db import session_scope
    from profiles.lookup import resolve_customer_key
    from profiles.timeline import customer_view

    engine = open_store(database_url)
    with session_scope(engine) as session:
        customer_id = resolve_customer_key(session, key, default_region=get_settings().default_phone_region)
        if customer_id is None:
            raise BadInput(f"no customer matches {key!r} (tried customer id, email, phone and identities)")
        view = customer_view(session, customer_id, limit=limit)
    if json:
        print_json(view)
        return
    from sequences.definitions import step_labels

    settings = get_settings()
    _print_profile(view, step_labels(settings.sequences_dir, settings.audiences_dir))


def _fmt_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _print_profile(view: dict, steps: dict[str, tuple[str, ...]]) -> None:
    """``steps``: each sequence's step labels (:func:`sequences.definitions.step_labels`)."""
    from profiles.models import CartStatus
    from sequences.definitions import step_label

    c = view["customer"]
    name = " ".join(p for p in (c["first_name"], c["last_name"]) if p) or "(no name)"
    console.print(f"[bold]{escape(name)}[/]  customer {c['id']}", highlight=False)
    lines = [
        ("email", c["email"]),
        ("phone", c["phone"]),
        ("locale", c["locale"]),
        ("timezone", view["timezone"]),
        ("home store", (view["home_store"] or {}).get("name") or c["home_store_id"]),
        ("channels used", ", ".join(view["channels"])),
        ("merged from", ", ".join(map(str, view["merged_from"]))),
    ]
    for label, value in lines:
        if value:
            console.print(f"  {label:<14}{value}", highlight=False, markup=False)
    console.print(
        "  identities    " + ", ".join(f"{i['kind']}={i['value']}" for i in view["identities"]),
        highlight=False,
    )
    consent = ", ".join(
        f"{ch} {'yes' if v['allowed'] else 'no'} ({v['status']})" for ch, v in view["consents"].items()
    )
    console.print(f"  consent       {consent}", highlight=False, markup=False)
    open_carts = [cart for cart in view["carts"] if cart["status"] == CartStatus.OPEN]
    for cart in open_carts:
        items = (
            ", ".join(
                f"{i.get('name') or i.get('sku') or i.get('product_id')} x{i['quantity']}"
                for i in cart["items"]
            )
            or "empty"
        )
        console.print(
            f"  open cart     {cart['value']:.2f} {cart['currency'] or ''} - {items} "
            f"(last activity {_fmt_time(cart['updated_at'])})",
            highlight=False,
            markup=False,
        )
    for order in view["orders"][:5]:
        console.print(
            f"  order         {order['order_id']} {order['total']:.2f} via {order['channel']}, "
            f"{order['fulfillment']}, {order['status']} ({_fmt_time(order['placed_at'])})",
            highlight=False,
            markup=False,
        )
    for journey in view["journeys"]:
        if journey["open"]:
            at = step_label(steps, journey["sequence"], journey["step_index"])
            state = f"{journey['status']} at {at or 'step ' + str(journey['step_index'] + 1)}"
            if journey["next_run_at"]:
                state += f", next {_fmt_time(journey['next_run_at'])}"
        else:
            state = f"{journey['status']} {_fmt_time(journey['exited_at'])}" + (
                f" ({journey['exit_reason']})" if journey["exit_reason"] else ""
            )
        console.print(
            f"  journey       {journey['sequence']}: {state} (enrolled {_fmt_time(journey['enrolled_at'])})",
            highlight=False,
            markup=False,
            soft_wrap=True,  # one line per journey, whatever the terminal's width (scripts grep it)
        )
    for channel, message in view["last_messages"].items():
        what = message["subject"] or message["template"] or message["audience"] or message["event"]
        origin = message["sequence"] or message["campaign"]
        status = message.get("provider_status") or message["delivery_status"]
        console.print(
            f"  last {channel:<9}{_fmt_time(message['sent_at'])} {what}"
            + (f" ({origin}{'/' + message['step'] if message['step'] else ''})" if origin else "")
            + (f", {status}" if status else ""),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    table = Table(title="Timeline (newest first)", title_justify="left", show_lines=False)
    for column in ("time", "channel", "event", "details"):
        table.add_column(column)
    for event in view["events"]:
        table.add_row(
            _fmt_time(event["occurred_at"]),
            event["channel"],
            event["name"] or event["type"],
            event["summary"],
        )
    console.print(table)


@consent_app.command("set")
@handle_errors
def consent_set(
    key: Annotated[str, typer.Argument(help="Customer id, email, phone or identity value.")],
    channel: Annotated[str, typer.Argument(help=f"{', '.join(CONSENT_CHANNELS)}.")],
    status: Annotated[str, typer.Argument(help=f"{' or '.join(ConsentStatus)}.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
    source: Annotated[str, typer.Option("--source", help="Who or what recorded it.")] = "cli",
) -> None:
    """Record a consent decision by hand: an operator's decision takes effect at once (at --now,
    default the current time), whatever the time of the decision recorded before it."""
    from profiles.consent import ConsentDecision, consents_of
    from profiles.db import session_scope
    from profiles.lookup import resolve_customer_key
    from profiles.suppression import record_consents

    statuses = [s.value for s in ConsentStatus]
    if channel not in CONSENT_CHANNELS:
        raise BadInput(f"unknown channel {channel!r} (expected one of {', '.join(CONSENT_CHANNELS)})")
    if status not in statuses:
        raise BadInput(f"unknown status {status!r} (expected {' or '.join(statuses)})")
    at = parse_now(now)
    engine = open_store(database_url)
    with session_scope(engine) as session:
        customer_id = resolve_customer_key(session, key, default_region=get_settings().default_phone_region)
        if customer_id is None:
            raise BadInput(f"no customer matches {key!r}")
        # Through the one suppression rule: the decision and an Unsubscribed / Subscribed event on the
        # timeline, on the touchpoint the source names (`--source call_center`), else on Omni's own.
        record_consents(
            session,
            [ConsentDecision(customer_id, channel, status, f"cli:{source}", at)],
            now=at,
            touchpoint=source if source in TOUCHPOINTS else OMNI_CHANNEL,
            operator=True,
        )
        state = consents_of(session, customer_id)[channel]
    if json:
        print_json({"customer_id": customer_id, "channel": channel, **state})
    else:
        console.print(
            f"customer {customer_id}: {channel} is {state['status']} "
            f"({'allowed' if state['allowed'] else 'not allowed'}) as of {_fmt_time(state['updated_at'])}"
        )


@rejected_app.command("list")
@handle_errors
def rejected_list(
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0)] = 0,
) -> None:
    """Rejected payloads, newest first, with source, reason and the raw text."""
    from profiles.db import session_scope
    from profiles.models import RejectedEvent

    engine = open_store(database_url)
    table = RejectedEvent.__table__
    with session_scope(engine) as session:
        total = session.execute(select(func.count()).select_from(table)).scalar_one()
        rows = session.execute(select(table).order_by(table.c.id.desc()).limit(limit).offset(offset)).all()
    items = [dict(r._mapping) for r in rows]
    if json:
        print_json({"total": total, "items": items})
        return
    table_view = Table(title=f"Rejected payloads ({total} in all)", title_justify="left")
    for column in ("received", "source", "reason", "raw"):
        table_view.add_column(column, overflow="fold")
    for item in items:
        raw = item["raw"] if len(item["raw"]) <= 120 else item["raw"][:117] + "..."
        table_view.add_row(
            _fmt_time(item["received_at"]), escape(item["source"]), escape(item["reason"]), escape(raw)
        )
    console.print(table_view)


@stores_app.command("load")
@handle_errors
def stores_load(
    path: Annotated[Path, typer.Argument(help="JSON array or JSON lines of store records.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Create or update stores from a file (fields: id, name, address, city, region, postal_code,
    country, phone, email, timezone, hours, latitude, longitude)."""
    from profiles.db import session_scope
    from profiles.stores import StoreFileError, parse_stores, upsert_stores

    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        values = orjson.loads(text)
        values = values if isinstance(values, list) else [values]
        sources = [f"{path} [item {i}]" for i in range(len(values))]
    except orjson.JSONDecodeError:
        values, sources = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    values.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise BadInput(f"{path}:{number}: invalid JSON: {exc}") from None
                sources.append(f"{path}:{number}")
    try:
        records = parse_stores(values, sources)
    except StoreFileError as exc:
        raise BadInput(str(exc)) from None
    engine = open_store(database_url)
    with session_scope(engine) as session:
        count = upsert_stores(session, records, now=parse_now(now))
    if json:
        print_json({"loaded": count})
    else:
        console.print(f"loaded {count} stores")


@stores_app.command("list")
@handle_errors
def stores_list(database_url: DatabaseUrlOption = None, json: JsonOption = False) -> None:
    """Every store."""
    from profiles.db import session_scope
    from profiles.stores import list_stores

    engine = open_store(database_url)
    with session_scope(engine) as session:
        stores = [s.model_dump() for s in list_stores(session)]
    if json:
        print_json(stores)
        return
    table = Table(title=f"Stores ({len(stores)})", title_justify="left")
    for column in ("id", "name", "city", "timezone"):
        table.add_column(column)
    for s in stores:
        table.add_row(escape(s["id"]), escape(s["name"]), escape(s["city"] or ""), s["timezone"] or "")
    console.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
