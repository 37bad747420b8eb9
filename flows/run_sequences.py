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

**One tick over many workers** (``shards``, PostgreSQL; the design is :mod:`sequences.shards`): the tick's
run rebuilds the audiences, recovers, enrolls and exits once, then fans the walking and dispatching out as
one flow run per shard of the ``run-sequences-shard`` deployment (:func:`run_sequences_shard`), which any
number of workers of the work pool pick up. It waits for them, adds their reports to its own and
publishes one ``sequences-tick`` artifact. Without ``shard_deployment`` (a tick called directly: tests, a
script) the shards run as concurrent tasks of the tick's own run instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from sqlalchemy import Engine

from flows.common import artifact_key, check_omni_home, fmt_time, load_settings, ready_store, table_cell
from omni.core.clock import utcnow
from omni.core.settings import Settings
from sequences.reports import DeliveryHalted, ShardsFailed, TickReport, without_empty_columns
from sequences.shards import Shard, ShardBusy
from sequences.tick import ShardRunner, run_shard, run_tick

# The deployment of prefect.yaml that runs one shard of a tick.
SHARD_DEPLOYMENT = "run-sequences-shard/run-sequences-shard"
# How often the tick asks the API whether its shard runs are done.
SHARD_POLL_SECONDS = 2.0


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
    shards: int = 1,
    shard_deployment: str | None = None,
) -> dict[str, Any]:
    """One tick of every sequence (or ``names``) at ``now`` (default: the current time).
    ``artifact_prefix`` (default ``OMNI_ARTIFACT_PREFIX``; the demo passes ``demo``) prefixes the
    artifacts' keys. ``shards`` > 1 (PostgreSQL) splits walking and dispatching by customer over that many
    flow runs of ``shard_deployment`` (prefect.yaml: ``run-sequences-shard/run-sequences-shard``), or over
    tasks of this run when it is not given; 1, and any value on SQLite, is the one-worker tick."""
    check_omni_home()
    log = get_run_logger()
    settings = load_settings()
    key = artifact_key("sequences-tick", artifact_prefix)
    url = database_url or settings.database_url
    engine = ready_store(url)
    at = now or utcnow()
    runner = (
        _deployment_runner(shard_deployment, now=at, names=names, database_url=database_url)
        if shard_deployment
        else _task_runner(engine, now=at, names=names, settings=settings)
    )
    try:
        report = run_tick(
            engine,
            now=at,
            settings=settings,
            names=names,
            stage=prefect_stage,
            shards=shards,
            run_shards=runner,
        )
    except (DeliveryHalted, ShardsFailed) as failed:  # the rest of the tick ran: show it, then fail the run
        publish_report(failed.report, key=key, title="Sequences tick")
        raise
    for name, sequence in report.sequences.items():
        sent = sum(c.sent for c in sequence.steps.values())
        log.info("%s: %d enrolled, %d exited, %d sent", name, sequence.enrolled, sequence.exited, sent)
    publish_report(report, key=key, title="Sequences tick")
    return report.as_dict()


@flow(name="run-sequences-shard", timeout_seconds=3600, persist_result=True)
def run_sequences_shard(
    shard: int,
    shards: int,
    now: datetime,
    names: list[str] | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Walk and dispatch, at the tick's ``now``, the customers of shard ``shard`` of ``shards`` (started by a
    ``run-sequences`` run with ``shards`` > 1). Returns what it did (``TickReport.shard_dict()``), or
    ``{"busy": ...}`` when another worker holds the shard. A channel that halted is in the report: the tick
    fails on it, not the shard."""
    check_omni_home()
    settings = load_settings()
    engine = ready_store(database_url or settings.database_url)
    try:
        report = run_shard(
            engine, shard=Shard(shard, shards), now=now, settings=settings, names=names, stage=prefect_stage
        )
    except ShardBusy as busy:
        get_run_logger().warning("%s", busy)
        return {"busy": str(busy)}
    return report.shard_dict()


def _shard_outcome(result: Any, shard: Shard) -> TickReport | BaseException:
    if isinstance(result, dict) and "busy" in result:
        return ShardBusy(shard)
    return TickReport.from_shard_dict(result)


def _task_runner(
    engine: Engine, *, now: datetime, names: list[str] | None, settings: Settings
) -> ShardRunner:
    """The shards as concurrent tasks of this run (threads of this process, each on its own connections)."""

    def run_shards(shards: list[Shard]) -> list[TickReport | BaseException]:
        def one(shard: Shard) -> TickReport:
            return run_shard(engine, shard=shard, now=now, settings=settings, names=names)

        shard_task = task(one, name="run-shard", cache_policy=NO_CACHE)
        futures = [
            shard_task.with_options(task_run_name=f"shard-{shard.index}-of-{shard.count}").submit(shard)
            for shard in shards
        ]
        outcomes: list[TickReport | BaseException] = []
        for future in futures:
            future.wait()
            # A failed shard hands back its exception (ShardBusy, a database error): the others go on.
            outcomes.append(future.state.result(raise_on_failure=False))
        return outcomes

    return run_shards


def _deployment_runner(
    deployment: str, *, now: datetime, names: list[str] | None, database_url: str | None
) -> ShardRunner:
    """The shards as flow runs of ``deployment`` (linked to this run in the UI), started together and waited
    for; a retried tick finds the shard runs it already started (one idempotency key per tick and shard)."""

    def run_shards(shards: list[Shard]) -> list[TickReport | BaseException]:
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext
        from prefect.deployments import run_deployment

        context = FlowRunContext.get()
        tick_id = context.flow_run.id if context and context.flow_run else now.isoformat()
        runs = [
            run_deployment(
                deployment,
                parameters={
                    "shard": shard.index,
                    "shards": shard.count,
                    "now": now.isoformat(),
                    "names": names,
                    "database_url": database_url,
                },
                flow_run_name=f"shard-{shard.index}-of-{shard.count}",
                idempotency_key=f"{tick_id}-shard-{shard.index}-of-{shard.count}",
                timeout=0,  # start them all, then wait below
            )
            for shard in shards
        ]
        with get_client(sync_client=True) as client:
            while True:
                runs = [client.read_flow_run(run.id) for run in runs]
                if all(run.state is not None and run.state.is_final() for run in runs):
                    break
                time.sleep(SHARD_POLL_SECONDS)
        outcomes: list[TickReport | BaseException] = []
        for shard, run in zip(shards, runs, strict=True):
            if not run.state.is_completed():
                outcomes.append(
                    RuntimeError(f"flow run {run.name} ended {run.state.name}: {run.state.message}")
                )
                continue
            try:
                outcomes.append(_shard_outcome(run.state.result(), shard))
            except Exception as exc:  # noqa: BLE001 - e.g. results stored where this process cannot read
                outcomes.append(exc)
        return outcomes

    return run_shards
