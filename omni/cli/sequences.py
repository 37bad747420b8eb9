"""``omni sequences``: list the journeys, run a tick by hand, see where customers are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import func, select

from omni.cli.common import (
    BadInput,
    DatabaseUrlOption,
    Failure,
    JsonOption,
    NowOption,
    console,
    handle_errors,
    open_store,
    parse_now,
    print_json,
)
from omni.core.channels import spec
from omni.core.settings import Settings, get_settings
from omni.core.statuses import EnrollmentStatus

if TYPE_CHECKING:
    from sequences.definitions import SequenceDefinition

sequences_app = typer.Typer(help="Cross-channel journeys (sequences/*.yaml).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(sequences_app, name="sequences")


def _definitions(settings: Settings) -> dict[str, SequenceDefinition]:
    from audiences import load_audiences
    from sequences.definitions import load_sequences

    # An invalid file is reported by handle_errors (exit 2).
    return load_sequences(settings.sequences_dir, audiences=load_audiences(settings.audiences_dir))


def describe_step(step) -> str:
    from sequences.definitions import BranchStep, SendStep

    if isinstance(step, SendStep):
        what = step.audience if spec(step.channel).delivery == "audience" else step.template
        fallback = f" (fallback {step.fallback})" if step.fallback else ""
        return f"{step.id}: {step.channel} {what}{fallback}"
    if isinstance(step, BranchStep):
        return f"{step.id}: branch -> {step.then}" + (f" / {step.otherwise}" if step.otherwise else "")
    if step.duration is not None:
        from omni.core.definitions import format_duration

        return f"wait {format_duration(step.duration)}"
    return f"wait until {step.until:%H:%M} local time"


def render_tick(report: Any) -> None:
    """The tick as a table that reads at 80 columns: per sequence, who entered and left; per send step
    below it, only the counts something happened in (``--json`` has them all)."""
    from sequences.reports import ENTRY_COLUMNS, without_empty_columns

    steps = without_empty_columns(report.rows(), keep=("Sequence", "Step", "Sent"))
    counts = [key for key in (steps[0] if steps else {}) if key not in ("Sequence", "Step")]
    table = Table(title="Sequences tick", title_justify="left")
    table.add_column("Sequence / step", overflow="fold")
    for key in counts:
        table.add_column(key, justify="right", overflow="fold")
    for journey in report.journey_rows():
        entered = ", ".join(f"{journey[label]} {label.lower()}" for label in ENTRY_COLUMNS.values())
        table.add_row(f"[bold]{escape(journey['Sequence'])}[/]: {entered}", *("" for _ in counts))
        for row in steps:
            if row["Sequence"] == journey["Sequence"]:
                table.add_row(f"  {escape(row['Step'])}", *(str(row[key]) for key in counts))
    for row in steps:
        if row["Sequence"].startswith("campaign "):
            table.add_row(escape(row["Sequence"]), *(str(row[key]) for key in counts))
    console.print(table)
    if report.audiences:
        built = ", ".join(
            f"{name} {r['size']} (+{r['entered']} / -{r['exited']})" for name, r in report.audiences.items()
        )
        console.print(f"audiences rebuilt: {built}", highlight=False, markup=False)


@sequences_app.command("list")
@handle_errors
def sequences_list(database_url: DatabaseUrlOption = None, json: JsonOption = False) -> None:
    """Every sequence: trigger, steps, and customers in it now."""
    from profiles.db import session_scope
    from profiles.models import Enrollment

    settings = get_settings()
    definitions = _definitions(settings)
    engine = open_store(database_url)
    table = Enrollment.__table__
    with session_scope(engine) as session:
        counts: dict[str, dict[str, int]] = {}
        for sequence, status, count in session.execute(
            select(table.c.sequence, table.c.status, func.count()).group_by(table.c.sequence, table.c.status)
        ):
            counts.setdefault(sequence, {})[status] = count
    items = [
        {
            "name": s.name,
            "description": s.description.strip(),
            "trigger": {"audience": s.trigger_audience} if s.trigger_audience else {"event": s.trigger_event},
            "exit": s.exit.model_dump(exclude_defaults=True),
            "holdout_percent": s.holdout_percent,
            "steps": [describe_step(step) for step in s.steps],
            "enrollments": counts.get(s.name, {}),
            "file": s.file,
        }
        for s in definitions.values()
    ]
    if json:
        print_json(items)
        return
    from sequences.definitions import sequences_directory

    view = Table(
        title=f"Sequences in {sequences_directory(settings.sequences_dir)} ({len(items)})",
        title_justify="left",
        show_lines=True,
    )
    for column in ("name", "trigger", "steps", "active / completed / exited / held out"):
        view.add_column(column)
    for item in items:
        c = item["enrollments"]
        trigger = ", ".join(f"{k}: {v}" for k, v in item["trigger"].items())
        view.add_row(
            escape(item["name"]),
            escape(trigger),
            escape("\n".join(item["steps"])),
            " / ".join(
                str(c.get(status, 0))
                for status in (
                    EnrollmentStatus.ACTIVE,
                    EnrollmentStatus.COMPLETED,
                    EnrollmentStatus.EXITED,
                    EnrollmentStatus.HOLDOUT,
                )
            ),
        )
    console.print(view)


@sequences_app.command("run")
@handle_errors
def sequences_run(
    names: Annotated[list[str] | None, typer.Argument(help="Sequences to run (default: all).")] = None,
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
    now: NowOption = None,
    shards: Annotated[
        int,
        typer.Option(
            min=1,
            help="Walk and send in this many shards of the customers at once, one thread each "
            "(PostgreSQL; SQLite always runs one).",
        ),
    ] = 1,
) -> None:
    """Run one tick now (what the run-sequences deployment does every 5 minutes), without Prefect."""
    from connectors import ConnectorConfigError
    from flows.common import load_settings
    from sequences.reports import DeliveryHalted, ShardsFailed
    from sequences.tick import UnknownSequence, run_tick

    settings = load_settings()
    definitions = _definitions(settings)
    at = parse_now(now)
    engine = open_store(database_url)
    halted = None
    try:
        report = run_tick(
            engine, now=at, settings=settings, names=names or None, sequences=definitions, shards=shards
        )
    except UnknownSequence as exc:
        raise BadInput(str(exc)) from None
    except ConnectorConfigError as exc:
        raise Failure(f"connector not configured: {exc}") from None
    except (DeliveryHalted, ShardsFailed) as exc:  # the rest of the tick ran: show it, then fail
        report, halted = exc.report, exc
    if json:
        print_json(report.as_dict())
    else:
        render_tick(report)
    if halted is not None:
        raise Failure(str(halted))


@sequences_app.command("status")
@handle_errors
def sequences_status(
    name: Annotated[str, typer.Argument(help="The sequence.")],
    database_url: DatabaseUrlOption = None,
    json: JsonOption = False,
) -> None:
    """Where customers are in a sequence: enrollments by status and step, deliveries, exit reasons."""
    from sequences.tick import sequence_status

    definitions = _definitions(get_settings())
    if name not in definitions:
        raise BadInput(f"unknown sequence {name!r} (known: {', '.join(sorted(definitions)) or 'none'})")
    engine = open_store(database_url)
    status = sequence_status(engine, name)
    if json:
        print_json(status)
        return
    sequence = definitions[name]
    console.print(f"[bold]{escape(name)}[/]  {escape(sequence.description.strip())}")
    console.print(
        "enrollments: " + (", ".join(f"{k} {v}" for k, v in status["enrollments"].items()) or "none"),
        highlight=False,
        markup=False,
    )
    table = Table(title="Steps", title_justify="left")
    for column in ("#", "step", "active here", "deliveries"):
        table.add_column(column)
    for index, step in enumerate(sequence.steps):
        delivered = {k: v for k, v in status["deliveries"].items() if k.split("/")[0] == step.id}
        text = "; ".join(f"{k}: " + ", ".join(f"{s} {n}" for s, n in v.items()) for k, v in delivered.items())
        table.add_row(
            str(index), escape(describe_step(step)), str(status["active_by_step"].get(index, 0)), escape(text)
        )
    console.print(table)
    if status["exit_reasons"]:
        console.print(
            "exits: " + ", ".join(f"{k}: {v}" for k, v in status["exit_reasons"].items()),
            highlight=False,
            markup=False,
        )
