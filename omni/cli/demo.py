"""``omni demo``: seed a retailer in an empty store and walk the flagship journeys through simulated days.

The seeding and the simulation live in :mod:`omni.cli.demo_data`; this module runs them and prints each
tick (rich) or, with ``--json``, one JSON document. Each tick runs the ``run_sequences`` Prefect flow
when it is available (a temporary Prefect server is started unless ``PREFECT_API_URL`` points at one),
else the sequence engine directly; ``--no-prefect`` forces the latter.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from omni.cli.common import (
    EXIT_BAD_INPUT,
    DatabaseUrlOption,
    JsonOption,
    console,
    fail,
    handle_errors,
    print_json,
)

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from omni.core.settings import Settings

WHAT = {"bought_online": "bought online", "bought_in_store": "bought at the till", "picked_up": "picked up"}
# PREFECT.md §1: quiet runs of a temporary server.
PREFECT_QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL": "WARNING",
    "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL": "WARNING",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@handle_errors
def demo(
    database_url: DatabaseUrlOption = None,
    customers: Annotated[
        int, typer.Option("--customers", min=10, max=20_000, help="Shoppers to seed.")
    ] = 300,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed: the same seed tells the same story.")
    ] = 42,
    prefect: Annotated[
        bool,
        typer.Option(
            "--prefect/--no-prefect",
            help="Run each tick as the run_sequences Prefect flow (default, when it exists) or call the "
            "sequence engine directly.",
        ),
    ] = True,
    json: JsonOption = False,
) -> None:
    """Seed a retailer in an empty store and walk the flagship journeys over three simulated days.

    Three stores and their shoppers' web, app and till histories; then the abandoned-cart and pickup
    journeys run through ticks at T, T + 1 day and T + 3 days, while some shoppers buy online or at
    the till in between. Prints what each channel received and who exited, and why.
    """
    from sqlalchemy import func, select

    from flows.common import load_settings
    from omni.cli.demo_data import (
        BUY_IF_HELD_OUT,
        BUY_IF_MESSAGED,
        closing_report,
        engine_tick,
        run_demo,
        summary_paragraph,
    )
    from profiles.db import create_store_engine, session_scope, upgrade_schema
    from profiles.models import Customer
    from sequences.unsubscribe import ensure_unsubscribe_secret

    started = time.perf_counter()
    settings = load_settings()
    engine = create_store_engine(database_url or settings.database_url)
    try:
        upgrade_schema(engine)
        ensure_unsubscribe_secret(engine)
        with session_scope(engine) as session:
            existing = session.execute(select(func.count()).select_from(Customer.__table__)).scalar_one()
        if existing:
            where = engine.url.render_as_string(hide_password=True)
            fail(
                f"the store at {where} already has {existing} customers: the demo seeds its own retailer. "
                "Run it in an empty directory or pass --database-url pointing at a new store.",
                EXIT_BAD_INPUT,
            )
        tick = None
        using = "the sequence engine"
        stack = contextlib.ExitStack()
        if prefect and _flow_available():
            tick = stack.enter_context(_flow_tick(engine.url.render_as_string(hide_password=False)))
            using = "the run_sequences Prefect flow"
        if tick is None:
            tick = engine_tick(engine, settings)
        with stack:
            if not json:
                console.print(
                    Panel.fit(
                        f"Seeding a retailer: {customers} shoppers, 3 stores (New York, Chicago, Lisbon), "
                        f"then three ticks through {using}.\nEvery channel goes to the local outbox "
                        "(`omni outbox list`); nothing leaves this machine.",
                        title="omni demo",
                    )
                )
            document = run_demo(
                engine,
                customers=customers,
                seed=seed,
                tick=tick,
                on_tick=None if json else _print_tick,
            )
            at = datetime.fromisoformat(document["ticks"][-1]["at"])
            directory = _report_directory(engine, settings)
            if using.startswith("the run_sequences"):
                document["report"] = _flow_report(engine, at, directory)
            else:
                document["report"] = closing_report(engine, settings, now=at, directory=directory)
        seconds = time.perf_counter() - started
        document["ran_with"] = "prefect" if using.startswith("the run_sequences") else "engine"
        document["seconds"] = round(seconds, 2)
        if json:
            print_json(document)
            return
        console.print()
        console.print(Panel(summary_paragraph(document, seconds), title="Summary", title_align="left"))
        console.print(
            f"[bold]Did the journeys pay?[/] (the shoppers are simulated: messaged ones buy with probability "
            f"{' then '.join(f'{p:.0%}' for p in BUY_IF_MESSAGED)}, held-out ones "
            f"{' then '.join(f'{p:.0%}' for p in BUY_IF_HELD_OUT)}, between the ticks)",
            highlight=False,
        )
        for sentence in document["report"]["sentences"]:
            console.print(f"  • {escape(sentence)}", highlight=False)
        console.print(
            f"The report with charts: [bold]{escape(document['report']['html'])}[/] (also: [bold]omni report"
            "[/], and [bold]omni serve[/] shows the newest at /reports/latest).",
            highlight=False,
        )
        console.print(
            "Look closer: [bold]omni outbox list --channel sms[/], [bold]omni sequences status "
            "abandoned_cart[/], [bold]omni profile show[/] [italic]EMAIL[/]."
        )
    finally:
        engine.dispose()


def _report_directory(engine: Engine, settings: Settings) -> Path:
    """Where the demo writes its HTML report: ``report_dir``, beside the demo's store when it is a SQLite
    file and the folder is relative (the demo's own folder), else as configured."""
    from reports.html import report_dir

    directory = report_dir(settings)
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not directory.is_absolute() and database and database != ":memory:":
        return Path(database).resolve().parent / directory
    return directory


def _flow_report(engine: Engine, at: datetime, directory: Path) -> dict[str, Any]:
    """The closing report through the ``build-report`` flow (its artifacts under the ``demo`` prefix)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        from flows.report import build_report

        document = build_report(
            database_url=engine.url.render_as_string(hide_password=False),
            now=at,
            report_dir=str(directory),
            artifact_prefix="demo",
        )
    return {key: document[key] for key in ("html", "sentences", "journeys")}


def _flow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flows.run_sequences") is not None


@contextlib.contextmanager
def _flow_tick(database_url: str) -> Iterator[Any]:
    """A tick function running the ``run_sequences`` flow, with Prefect kept quiet (PREFECT.md §1)."""
    saved = {name: os.environ.get(name) for name in [*PREFECT_QUIET, "PREFECT_HOME"]}
    for name, value in PREFECT_QUIET.items():
        os.environ.setdefault(name, value)
    if not os.environ.get("PREFECT_API_URL") and "prefect" not in sys.modules:
        os.environ.setdefault("PREFECT_HOME", os.path.abspath(".prefect"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from flows.run_sequences import run_sequences

        def tick(at: Any) -> dict[str, Any]:
            # The flow's own log lines and Prefect's console output would interleave with ours.
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                # Its own artifact keys: a demo against a configured Prefect API never overwrites the
                # production run-sequences artifacts.
                return run_sequences(
                    now=at,
                    names=["abandoned_cart", "pickup_ready"],
                    database_url=database_url,
                    artifact_prefix="demo",
                )

        logging.getLogger("prefect").setLevel(logging.ERROR)
        yield tick
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _print_tick(result: dict[str, Any]) -> None:
    from sequences.reports import STEP_COLUMNS

    console.print()
    console.rule(
        f"[bold]Tick {result['label']}[/]  ({result['at'].replace('T', ' ').replace('+00:00', ' UTC')})"
    )
    happened = result["happened"]
    if happened:
        counts = Counter(h["what"] for h in happened)
        summary = ", ".join(f"{n} {WHAT[w]}" for w, n in counts.items())
        console.print(f"[bold]Since the last tick:[/] {summary}.")
        for h in happened[:4]:
            where = f" at {h['store']}" if h["what"] != "bought_online" else ""
            console.print(
                f"  • {escape(h['name'] or '?')} (customer {h['customer_id']}) {WHAT[h['what']]}{where}"
            )
        if len(happened) > 4:
            console.print(f"  … and {len(happened) - 4} more")
    for name, report in result["report"].get("sequences", {}).items():
        parts = [f"{report['enrolled']} enrolled"]
        if report["held_out"]:
            parts.append(f"{report['held_out']} held out")
        if report["exited"]:
            parts.append(f"{report['exited']} exited")
        if report["completed"]:
            parts.append(f"{report['completed']} completed")
        steps = []
        for step, counts in report["steps"].items():
            # The tick's own words for each count (customers sent, added, removed; deliveries postponed).
            bits = [
                f"{counts[key]} {label.lower()}" for key, label in STEP_COLUMNS.items() if counts.get(key)
            ]
            if bits:
                steps.append(f"{step}: {', '.join(bits)}")
        line = f"[bold]{name}[/]: {', '.join(parts)}"
        if steps:
            line += f" — {'; '.join(steps)}"
        console.print(line)

    from omni.cli.demo_data import AUDIENCE_CHANNELS

    channels = result["channels"]
    updates = sum(channels.get(channel, 0) for channel in AUDIENCE_CHANNELS)
    messages = result["messages"] - updates
    title = f"What the channels received ({messages} messages, {updates} ad-audience updates)"
    table = Table(title=title, title_justify="left")
    table.add_column("channel")
    table.add_column("count", justify="right")
    table.add_column("recipient", overflow="fold")
    table.add_column("subject / first line", overflow="fold")
    for channel, count in channels.items():
        examples = [e for e in result["examples"] if e["channel"] == channel]
        if not examples:
            table.add_row(channel, str(count), "", "[dim]nothing[/]")
            continue
        for i, example in enumerate(examples):
            table.add_row(
                channel if i == 0 else "",
                str(count) if i == 0 else "",
                escape(example["to"] or ""),
                escape(_shorten(example["line"] or "", 120)),
            )
        table.add_section()
    console.print(table)

    exits = result["exits"]
    if exits:
        console.print(f"[bold]Exited ({len(exits)}):[/]")
        for row in exits[:6]:
            console.print(
                f"  • {escape(row['name'] or '?')} ({escape(row['email'] or str(row['customer_id']))}) "
                f"left [italic]{row['sequence']}[/]: {escape(row['detail'])}"
            )
        if len(exits) > 6:
            causes = Counter(WHAT.get(e["cause"], e["cause"]) for e in exits[6:])
            console.print(
                f"  … and {len(exits) - 6} more ({', '.join(f'{n} {w}' for w, n in causes.items())})"
            )
    else:
        console.print("[bold]Exited:[/] nobody")


__all__ = ["demo", "register"]
