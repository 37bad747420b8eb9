"""``omni campaigns``: list campaigns, send one now, or schedule a Prefect run of it."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
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

if TYPE_CHECKING:
    from sequences.definitions import CampaignDefinition

campaigns_app = typer.Typer(help="One-off campaigns (campaigns/*.yaml).", no_args_is_help=True)
DEPLOYMENT = "send-campaign/send-campaign"


def register(app: typer.Typer) -> None:
    app.add_typer(campaigns_app, name="campaigns")


HOW_TO_SET_THE_API = (
    "start a server (`prefect server start`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api` "
    "(or `prefect config set PREFECT_API_URL=...`); see the README, Deploying with Prefect"
)


def configured_prefect_api() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile, read without importing
    Prefect (which takes a second or more and creates ~/.prefect)."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    if "prefect.settings" in sys.modules:  # already imported (a test harness, the demo): ask it
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL")
    return str(value).strip() if value else None


def reachable_prefect_api(timeout: float = 2.0) -> str:
    """The configured Prefect API's URL once its /health answers; Failure (exit 1) within ``timeout``
    otherwise."""
    import httpx

    url = configured_prefect_api()
    if not url:
        raise Failure(
            "no Prefect API is configured (PREFECT_API_URL is not set), and a scheduled run needs a server "
            f"that keeps it until its time: {HOW_TO_SET_THE_API}"
        )
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise Failure(
            f"no Prefect API answers at {url} ({type(exc).__name__}): start it, or correct PREFECT_API_URL; "
            f"{HOW_TO_SET_THE_API}"
        ) from None
    if response.status_code != 200:
        raise Failure(
            f"the Prefect API at {url} answered {response.status_code} to /health: is it Prefect's?"
        )
    return url


def _definitions(settings: Settings) -> dict[str, CampaignDefinition]:
    from sequences.definitions import load_campaigns

    return load_campaigns(settings.campaigns_dir)  # an invalid file is reported by handle_errors (exit 2)


@campaigns_app.command("list")
@handle_errors
def campaigns_list(json: JsonOption = False) -> None:
    """Every campaign: audience, channel, template, send time."""
    settings = get_settings()
    items = [c.model_dump() for c in _definitions(settings).values()]
    if json:
        print_json(items)
        return
    from sequences.definitions import campaigns_directory

    # Campaigns live in the working directory by default: say where they were looked for.
    folder = campaigns_directory(settings.campaigns_dir)
    table = Table(title=f"Campaigns in {folder} ({len(items)})", title_justify="left")
    for column in ("name", "audience", "channel", "template", "send_at"):
        table.add_column(column)
    for c in items:
        table.add_row(
            escape(c["name"]),
            escape(c["audience"]),
            c["channel"],
            escape(c["template"]),
            c["send_at"].isoformat() if c["send_at"] else "-",
        )
    console.print(table)


@campaigns_app.command("send")
@handle_errors
def campaigns_send(
    name: Annotated[str, typer.Argument(help="The campaign.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
) -> None:
    """Send a campaign now, without Prefect (what the send-campaign flow does). Sending again sends
    nothing new."""
    from connectors import ConnectorConfigError
    from flows.common import load_settings
    from sequences.campaigns import UnknownCampaign, send_campaign
    from sequences.reports import DeliveryHalted

    settings = load_settings()
    definitions = _definitions(settings)
    engine = open_store(database_url)
    halted = None
    try:
        created, report = send_campaign(
            engine, name, now=parse_now(now), settings=settings, campaigns=definitions
        )
    except UnknownCampaign as exc:
        raise BadInput(str(exc)) from None
    except ConnectorConfigError as exc:
        raise Failure(f"connector not configured: {exc}") from None
    except DeliveryHalted as exc:  # what went out is shown, then the command fails with the reason
        created, report, halted = exc.created, exc.report, exc
    counts = report.campaigns[name].as_dict()
    if json:
        print_json({"campaign": name, "created": created, **counts, "halted": report.halted})
    else:
        console.print(
            f"campaign {name}: {created} new deliveries; sent {counts['sent']}, postponed "
            f"{counts['postponed']} (quiet hours or frequency cap), skipped for consent "
            f"{counts['skipped_consent']}, failed {counts['failed']}, unknown {counts['unknown']}",
            highlight=False,
            markup=False,
        )
    if halted is not None:
        raise Failure(str(halted))


@campaigns_app.command("schedule")
@handle_errors
def campaigns_schedule(
    name: Annotated[str, typer.Argument(help="The campaign.")],
    at: Annotated[
        str | None, typer.Option("--at", help="When (ISO-8601; default: the campaign's send_at).")
    ] = None,
    json: JsonOption = False,
) -> None:
    """Create a scheduled Prefect flow run of the send-campaign deployment (needs a Prefect server:
    PREFECT_API_URL, and `prefect --no-prompt deploy --all`)."""
    definitions = _definitions(get_settings())
    if name not in definitions:
        raise BadInput(f"unknown campaign {name!r} (known: {', '.join(sorted(definitions)) or 'none'})")
    when = parse_now(at) if at else definitions[name].send_at
    if when is None:
        raise BadInput(f"campaign {name!r} has no send_at: give --at TIME")
    # Before Prefect is even imported: without a reachable server, Prefect would start a temporary one
    # (seconds, and state under ~/.prefect) that forgets the scheduled run when the command ends.
    api_url = reachable_prefect_api()
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    try:
        flow_run = run_deployment(name=DEPLOYMENT, parameters={"name": name}, scheduled_time=when, timeout=0)
    except ObjectNotFound:
        raise Failure(
            f"deployment {DEPLOYMENT!r} not found on the Prefect API at {api_url}: deploy the flows from the "
            "Omni checkout (`prefect work-pool create omni-process --type process`, then "
            "`prefect --no-prompt deploy --all`)"
        ) from None
    if json:
        print_json(
            {
                "campaign": name,
                "flow_run_id": str(flow_run.id),
                "flow_run_name": flow_run.name,
                "scheduled_time": when,
                "state": flow_run.state.name if flow_run.state else None,
            }
        )
        return
    console.print(
        f"scheduled campaign {name} for {when.isoformat()}: flow run {flow_run.name} ({flow_run.id})",
        highlight=False,
        markup=False,
    )
    err_console.print(
        "In the Prefect UI: Deployments > send-campaign > Run > Custom run, set the parameter `name` and a "
        "start time; the run waits under Flow Runs as Scheduled until then (a worker must be running).",
        highlight=False,
        markup=False,
    )
