"""Flow: one tick of every sequence (deployment ``run-sequences``, every 5 minutes, one at a time).

Each stage of the tick is a Prefect task: rebuilding the trigger audiences, enrolling and exiting per
sequence, advancing due enrollments and dispatching due deliveries. A task works through thousands of
customers in batches (``OMNI_SEQUENCE_BATCH_SIZE``) with set-based SQL and whole-batch provider calls;
there is never a task per customer. Send tasks are ``NO_CACHE`` (a cached send would silently never go
out) and retry only for transient database errors: the delivery claim makes a retried dispatch safe.
Table artifacts (key ``sequences-tick``, or ``<artifact_prefix>-sequences-tick``) show per send step what
happened (sent, ad adds and removals, fallbacks, skipped for consent, failed, unknown, postponed,
retrying: the columns with something in them), and per sequence (``…-journeys``) who entered and left;
a markdown one sums it up.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import artifact_key, check_omni_home, fmt_time, load_settings, ready_store, table_cell
from omni.core.clock import utcnow
from sequences.reports import DeliveryHalted, TickReport, without_empty_columns
from sequences.tick import run_tick


def transient_database_error(_task: Any, _run: Any, state: Any) -> bool:
    """Retry a stage only when the database hiccuped (a lock, a dropped connection), never for bugs or bad
    definitions."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        state.result()
    except OperationalError:
        return True
    except DBAPIError as exc:
        return bool(exc.connection_invalidated)
    except Exception:  # noqa: BLE001 - anything else is not transient
        return False
    return False


def prefect_stage(name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage of the tick as a Prefect task named after it."""
    stage_task = task(
        lambda: fn(),
        name=name,
        cache_policy=NO_CACHE,
        retries=2,
        retry_delay_seconds=[2, 10],
        retry_condition_fn=transient_database_error,
    )
    return stage_task()


def publish_report(report: TickReport, *, key: str, title: str) -> None:
    """Two tables, each narrow enough for a 1,400-pixel screen: per send step (``TickReport.rows()``,
    without the count columns nothing happened in) and per sequence (``<key>-journeys``); and a markdown
    summary (``<key>-summary``)."""
    steps = without_empty_columns(report.rows(), keep=("Sequence", "Step", "Sent"))
    at = fmt_time(report.now)
    create_table_artifact(
        key=key,
        table=[{column: table_cell(value) for column, value in row.items()} for row in steps]
        or [{"Sequence": "(none)", "Step": "", "Sent": 0}],
        description=f"{title} at {at}, per send step in each sequence's order: customers sent a message, "
        "added to or removed from an ad audience, moved to the fallback channel, skipped for consent, "
        "failed or unknown, and deliveries postponed (quiet hours, frequency cap) or retrying. Columns "
        "with nothing in this tick are left out. Who entered and left: "
        f"{key}-journeys.",
    )
    create_table_artifact(
        key=f"{key}-journeys",
        table=report.journey_rows() or [{"Sequence": "(none)"}],
        description=f"{title} at {at}, per sequence: customers enrolled, held out (the control group), "
        "exited (with the reasons) and completed.",
    )
    lines = [f"## {title} at {at}", ""]
    for name, sequence in report.sequences.items():
        reasons = ", ".join(f"{count} {reason}" for reason, count in sequence.exit_reasons.items()) or "none"
        lines.append(
            f"- **{name}**: {sequence.enrolled} enrolled ({sequence.held_out} held out), "
            f"{sequence.total('sent')} messages sent, {sequence.total('added')} added to and "
            f"{sequence.total('removed')} removed from ad audiences, "
            f"{sequence.total('postponed')} postponed, "
            f"{sequence.total('skipped_consent')} skipped for consent, {sequence.total('failed')} failed, "
            f"{sequence.total('unknown')} unknown, {sequence.exited} exited ({reasons}), "
            f"{sequence.completed} completed"
        )
    for name, counts in report.campaigns.items():
        lines.append(
            f"- **campaign {name}**: {counts.sent} sent, {counts.postponed} postponed, "
            f"{counts.skipped_consent} skipped for consent, {counts.failed} failed, {counts.unknown} unknown"
        )
    for channel, reason in sorted(report.halted.items()):
        lines.append(f"- **{channel} halted**: {reason}")
    if len(lines) == 2:
        lines.append("Nothing to do.")
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines))


@flow(name="run-sequences", task_runner=ThreadPoolTaskRunner(max_workers=4), timeout_seconds=3600)
def run_sequences(
    now: datetime | None = None,
    names: list[str] | None = None,
    database_url: str | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, Any]:
    """One tick of every sequence (or ``names``) at ``now`` (default: the current time).
    ``artifact_prefix`` (default ``OMNI_ARTIFACT_PREFIX``; the demo passes ``demo``) prefixes the
    artifacts' keys."""
    check_omni_home()
    log = get_run_logger()
    settings = load_settings()
    key = artifact_key("sequences-tick", artifact_prefix)
    engine = ready_store(database_url or settings.database_url)
    try:
        report = run_tick(engine, now=now or utcnow(), settings=settings, names=names, stage=prefect_stage)
    except DeliveryHalted as halted:  # the rest of the tick ran: show it, then fail the run
        publish_report(halted.report, key=key, title="Sequences tick")
        raise
    for name, sequence in report.sequences.items():
        sent = sum(c.sent for c in sequence.steps.values())
        log.info("%s: %d enrolled, %d exited, %d sent", name, sequence.enrolled, sequence.exited, sent)
    publish_report(report, key=key, title="Sequences tick")
    return report.as_dict()
