"""Template commands: list, render (preview for a real customer), test-send (one real message)."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer
from rich.table import Table

from omni.cli.common import (
    BadInput,
    DatabaseUrlOption,
    Failure,
    JsonOption,
    NowOption,
    console,
    err_console,
    handle_errors,
    open_store,
    parse_now,
    print_json,
)
from omni.core.settings import Settings, get_settings

templates_app = typer.Typer(
    help="Message templates: list, preview for a customer, send a test.", no_args_is_help=True
)

CustomerOption = Annotated[
    str,
    typer.Option("--customer", help="Customer id, email, phone or any identity value.", show_default=False),
]


def register(app: typer.Typer) -> None:
    app.add_typer(templates_app, name="templates")


@templates_app.command("list")
@handle_errors
def templates_list(json: JsonOption = False) -> None:
    """Every template, by channel, with its parts."""
    from templates.rendering import list_templates, templates_dir

    directory = templates_dir(get_settings().templates_dir)
    templates = list_templates(directory)
    if json:
        print_json([{"name": t.name, "channel": t.channel, "parts": list(t.parts)} for t in templates])
        return
    table = Table(title=f"Templates in {directory}", title_justify="left")
    for column in ("name", "channel", "parts"):
        table.add_column(column)
    for t in templates:
        table.add_row(t.name, t.channel, ", ".join(t.parts))
    console.print(table)


def _render(database_url: str | None, name: str, customer: str, now: str | None, settings: Settings):
    from profiles.db import session_scope
    from profiles.lookup import resolve_customer_key
    from sequences.contexts import render
    from templates.rendering import RenderError, find_template

    at = parse_now(now)
    try:
        find_template(name, settings.templates_dir)
    except RenderError as exc:
        raise BadInput(str(exc)) from None
    engine = open_store(database_url)
    with session_scope(engine) as session:
        customer_id = resolve_customer_key(session, customer, default_region=settings.default_phone_region)
        if customer_id is None:
            raise BadInput(
                f"no customer matches {customer!r} (tried customer id, email, phone and identities)"
            )
        try:
            rendered = render(session, name, customer_id, now=at, settings=settings)
        except RenderError as exc:
            raise Failure(str(exc)) from None
    return engine, rendered


@templates_app.command("render")
@handle_errors
def templates_render(
    name: Annotated[str, typer.Argument(help="Template name, e.g. email/abandoned_cart.")],
    customer: CustomerOption,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Preview a template exactly as it would go out to a real customer of the store."""
    _, rendered = _render(database_url, name, customer, now, get_settings())
    if json:
        print_json(rendered.as_dict())
        return
    console.print(f"[bold]{rendered.template}[/] for customer {rendered.customer_id}", highlight=False)
    console.print(f"  to       {', '.join(rendered.recipients)}", highlight=False, markup=False)
    for label, value in (("subject", rendered.subject), ("title", rendered.title)):
        if value:
            console.print(f"  {label:<9}{value}", highlight=False, markup=False)
    if rendered.sms_segments:
        console.print(
            f"  segments {rendered.sms_segments} ({len(rendered.text or '')} chars)", highlight=False
        )
    if rendered.unsubscribe_url:
        console.print(
            f"  unsubscribe {rendered.unsubscribe_url}", highlight=False, markup=False, soft_wrap=True
        )
    # Bodies are soft-wrapped: links and HTML copied from the preview must work as sent.
    if rendered.text:
        console.rule("text" if rendered.channel == "email" else "body")
        console.print(rendered.text, highlight=False, markup=False, soft_wrap=True)
    if rendered.html:
        console.rule("html")
        console.print(rendered.html, highlight=False, markup=False, soft_wrap=True)
    for warning in rendered.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)


@templates_app.command("test-send")
@handle_errors
def templates_test_send(
    name: Annotated[str, typer.Argument(help="Template name, e.g. sms/pickup_reminder.")],
    customer: CustomerOption,
    to: Annotated[str, typer.Option("--to", help="Email address, phone number or device token to send to.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Render for a customer and send one message to --to through the channel's configured connector."""
    from connectors import ConnectorConfigError, Status, get_connector, send_batch
    from flows.common import load_settings
    from omni.core.channels import spec
    from profiles.db import session_scope
    from profiles.outbox import OutboxRecorder
    from profiles.segment import normalize_email, normalize_phone
    from sequences.contexts import messages_of
    from sequences.effects import apply_effects

    settings = load_settings()
    at = parse_now(now)
    engine, rendered = _render(database_url, name, customer, now, settings)
    address = to.strip()
    kind = spec(rendered.channel).address
    if kind == "email":
        address = normalize_email(address) or ""
        if "@" not in address:
            raise BadInput(f"--to {to!r} is not an email address")
    elif kind == "phone":
        address = normalize_phone(address, settings.default_phone_region) or ""
        if not address:
            raise BadInput(f"--to {to!r} is not a phone number")
    try:
        connector = get_connector(rendered.channel, settings, outbox=OutboxRecorder(engine, clock=lambda: at))
    except ConnectorConfigError as exc:
        raise Failure(str(exc)) from None
    delivery_id = f"test-send:{rendered.template}:{rendered.customer_id}:{uuid.uuid4().hex[:12]}"
    [message] = messages_of(rendered, delivery_id, to=address)
    try:
        report = send_batch(connector, [message])
    finally:
        connector.close()
    [result] = report.results
    if any(result.effects for result in report.results):
        with session_scope(engine) as session:
            apply_effects(session, report.results, now=at)
    document = {
        "template": rendered.template,
        "channel": rendered.channel,
        "customer_id": rendered.customer_id,
        "to": address,
        "connector": connector.provider,
        "delivery_id": delivery_id,
        "status": result.status.value,
        "provider_id": result.provider_id,
        "reason": result.reason,
        "retry_after": result.retry_after,
        "attempts": report.attempts,
    }
    if json:
        print_json(document)
    else:
        console.print(
            f"{rendered.template} to {address} via {connector.provider}: [bold]{result.status.value}[/]"
            + (f" ({result.provider_id})" if result.provider_id else "")
            + (f" - {result.reason}" if result.reason and result.status is not Status.SENT else ""),
            highlight=False,
        )
    if result.status is not Status.SENT:
        raise typer.Exit(1)
