"""The tick: every sequence (or some) moved on at ``now``, stage by stage.

A tick (:func:`run_tick`):

1. rebuilds, at ``now``, the audiences its sequences are triggered by;
2. recovers deliveries left ``sending`` by an interrupted tick (:func:`sequences.deliveries.
   recover_interrupted`): email, SMS and push become ``unknown`` and are **not resent** (at most once);
   ad-audience syncs and webhooks go back to ``pending`` (at least once);
3. per sequence, enrolls new entrants (:mod:`sequences.enrollment`, held-out customers recorded and never
   messaged) and exits enrollments whose exit rule holds (:mod:`sequences.exits`);
4. walks due enrollments through their steps (:mod:`sequences.walking`);
5. dispatches due deliveries, of sequences and campaigns alike (:mod:`sequences.dispatch`).

Steps 4 and 5 repeat until nothing moves, so a tick that finds a send followed by an elapsed wait
completes both. Two ticks at once never double-send: the unique delivery row and the atomic claim
decide who sends (the ``run-sequences`` deployment also has a concurrency limit of 1). A tick keeps
nothing between calls: its definitions travel with it.

With ``shards=n`` (PostgreSQL), steps 4 and 5 run per shard of the customers, in as many workers as the
caller's ``run_shards`` spreads them over (:func:`run_shard`; the design is :mod:`sequences.shards`).

On PostgreSQL steps 4 and 5 write each batch behind the next one (:mod:`sequences.pipeline`): the server
writes a walked batch, or the results of a dispatched one, while this process reads and works out the
next, within the rules :mod:`sequences.walking` and :mod:`sequences.dispatch` give.
"""

from __future__ import annotations

import time as time_module
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from audiences import build_audiences, load_audiences
from connectors import Connector, RetryPolicy
from omni.core.collector import frozen_heap
from omni.core.settings import Settings
from omni.core.statuses import EnrollmentStatus
from profiles.control import GlobalControl, record_control
from profiles.db import refresh_statistics, session_scope, stale_statistics
from profiles.models import Delivery, Enrollment
from sequences.definitions import (
    CampaignDefinition,
    SendStep,
    SequenceDefinition,
    load_campaigns,
    load_sequences,
)
from sequences.deliveries import recover_interrupted
from sequences.dispatch import Dispatcher, dispatch_due
from sequences.enrollment import enroll
from sequences.exits import exit_enrollments
from sequences.gate import DeliveryPolicy
from sequences.reports import DeliveryHalted, ShardsFailed, TickReport
from sequences.shards import Shard, ShardBusy, shard_count, shard_lease
from sequences.walking import walk_due

# Walk-then-dispatch rounds in one tick at most (each round moves every enrollment one send further).
MAX_ROUNDS = 20

Stage = Callable[[str, Callable[[], Any]], Any]
# Runs the shards of a tick (each with :func:`run_shard`), wherever the caller runs work; returns per shard
# its report, or what it raised (:class:`~sequences.shards.ShardBusy` when another worker holds it).
ShardRunner = Callable[[list[Shard]], list[TickReport | BaseException]]


class UnknownSequence(KeyError):
    def __str__(self) -> str:
        return f"unknown sequence {self.args[0]!r} (known: {', '.join(self.args[1]) or 'none'})"


def run_tick(
    engine: Engine,
    *,
    now: datetime,
    settings: Settings,
    names: Sequence[str] | None = None,
    policy: DeliveryPolicy | None = None,
    retry_policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time_module.sleep,
    sequences: Mapping[str, SequenceDefinition] | None = None,
    campaigns: Mapping[str, CampaignDefinition] | None = None,
    build: bool = True,
    connectors: Mapping[str, Connector] | None = None,
    stage: Stage | None = None,
    shards: int = 1,
    run_shards: ShardRunner | None = None,
) -> TickReport:
    """One tick of every sequence (or ``names``) at ``now``; see the module docstring.

    Args:
        settings: the settings (credentials resolved); the definitions' folders, the delivery policy
            and the connectors come from them unless given here.
        sleep: how in-call retries wait (tests pass a no-op).
        sequences, campaigns: definitions (default: loaded from the settings' folders).
        build: rebuild the trigger audiences first (default True).
        connectors: connectors to use by channel instead of the configured ones.
        stage: runs each stage (``stage(name, fn)``); the ``run_sequences`` flow makes each a Prefect
            task. Default: call it.
        shards: split walking and dispatching into this many shards of the customers (PostgreSQL; on
            SQLite the tick runs as one shard). 1 (the default): the tick as it always ran.
        run_shards: runs the shards (the ``run_sequences`` flow fans them out to Prefect workers).
            Default: one thread per shard in this process, each on its own connections.
    """
    stage = stage or (lambda _name, fn: fn())
    tick = _TickSetup.load(
        now=now,
        settings=settings,
        names=names,
        policy=policy,
        sequences=sequences,
        campaigns=campaigns,
    )
    report = tick.new_report()
    if build:
        needed = sorted({s.trigger_audience for s in tick.selected.values() if s.trigger_audience})
        if needed:
            built = stage(
                "build-audiences",
                lambda: build_audiences(engine, names=needed, now=now, definitions=tick.audience_definitions),
            )
            report.audiences = {name: result.as_dict() for name, result in built.items()}
    count = shard_count(engine, shards)
    if count > 1:
        _run_sharded(
            engine,
            stage,
            tick,
            report,
            count,
            run_shards=run_shards,
            retry_policy=retry_policy,
            sleep=sleep,
            connectors=connectors,
        )
        return report
    dispatcher = tick.dispatcher(
        engine, report, retry_policy=retry_policy, sleep=sleep, connectors=connectors
    )
    try:
        with frozen_heap():
            _once_per_tick(stage, engine, tick, report)
            _walk_and_dispatch(stage, dispatcher, tick)
            _finish(stage, engine, report)
    finally:
        dispatcher.close()
    return report


def run_shard(
    engine: Engine,
    *,
    shard: Shard,
    now: datetime,
    settings: Settings,
    names: Sequence[str] | None = None,
    policy: DeliveryPolicy | None = None,
    retry_policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time_module.sleep,
    sequences: Mapping[str, SequenceDefinition] | None = None,
    campaigns: Mapping[str, CampaignDefinition] | None = None,
    connectors: Mapping[str, Connector] | None = None,
    stage: Stage | None = None,
) -> TickReport:
    """The per-shard part of a tick at ``now`` (walking and dispatching, round after round) for the
    customers of ``shard``, under its lease; returns what this shard did. Raises
    :class:`~sequences.shards.ShardBusy` at once when another worker holds the shard. A channel that
    halted is in ``report.halted`` (the tick fails on it once all shards are back)."""
    stage = stage or (lambda _name, fn: fn())
    tick = _TickSetup.load(
        now=now, settings=settings, names=names, policy=policy, sequences=sequences, campaigns=campaigns
    )
    report = tick.new_report()
    with shard_lease(engine, shard):
        dispatcher = tick.dispatcher(
            engine, report, retry_policy=retry_policy, sleep=sleep, connectors=connectors
        )
        try:
            with frozen_heap():
                _walk_and_dispatch(stage, dispatcher, tick, shard=shard)
        finally:
            dispatcher.close()
    return report


@dataclass(frozen=True)
class _TickSetup:
    """What a tick (or a shard of it) runs on, loaded once: the policy and the definitions."""

    now: datetime
    settings: Settings
    policy: DeliveryPolicy
    audience_definitions: Mapping[str, Any]
    sequences: Mapping[str, SequenceDefinition]  # every sequence (deliveries of any may be due)
    selected: Mapping[str, SequenceDefinition]  # the sequences this tick walks
    campaigns: Mapping[str, CampaignDefinition]

    @classmethod
    def load(
        cls,
        *,
        now: datetime,
        settings: Settings,
        names: Sequence[str] | None,
        policy: DeliveryPolicy | None,
        sequences: Mapping[str, SequenceDefinition] | None,
        campaigns: Mapping[str, CampaignDefinition] | None,
    ) -> _TickSetup:
        audience_definitions = load_audiences(settings.audiences_dir)
        all_sequences = (
            dict(sequences)
            if sequences is not None
            else load_sequences(settings.sequences_dir, audiences=audience_definitions)
        )
        missing = [name for name in (names or ()) if name not in all_sequences]
        if missing:
            raise UnknownSequence(missing[0], sorted(all_sequences))
        return cls(
            now=now,
            settings=settings,
            policy=policy or DeliveryPolicy.from_settings(settings),
            audience_definitions=audience_definitions,
            sequences=all_sequences,
            selected={name: all_sequences[name] for name in (names or all_sequences)},
            campaigns=campaigns if campaigns is not None else load_campaigns(settings.campaigns_dir),
        )

    def new_report(self) -> TickReport:
        """An empty report listing every selected sequence and its send steps, in the sequence's order."""
        report = TickReport(now=self.now)
        for name, sequence in self.selected.items():
            report.sequences[name]  # noqa: B018 - every selected sequence appears in the report
            for step in sequence.steps:
                if isinstance(step, SendStep):
                    report.sequences[name].steps[step.id]  # noqa: B018
        return report

    def dispatcher(
        self,
        engine: Engine,
        report: TickReport,
        *,
        retry_policy: RetryPolicy | None,
        sleep: Callable[[float], None],
        connectors: Mapping[str, Connector] | None,
    ) -> Dispatcher:
        return Dispatcher(
            engine=engine,
            now=self.now,
            settings=self.settings,
            policy=self.policy,
            sequences=self.sequences,
            campaigns=self.campaigns,
            report=report,
            retry_policy=retry_policy,
            sleep=sleep,
            connectors=dict(connectors or {}),
            walked=frozenset(self.selected),
        )


def _once_per_tick(stage: Stage, engine: Engine, tick: _TickSetup, report: TickReport) -> None:
    """Steps 2 and 3 of a tick (see the module docstring), each through ``stage``."""
    now, policy, settings = tick.now, tick.policy, tick.settings

    def recover() -> None:
        with session_scope(engine) as session:
            recover_interrupted(session, now=now, policy=policy, report=report, sequences=tick.sequences)

    control = GlobalControl.of(settings)

    def record_global_control() -> None:
        with session_scope(engine) as session:
            record_control(session, control, now=now)

    def enroll_and_exit(sequence: SequenceDefinition) -> None:
        with session_scope(engine) as session:
            enroll(session, sequence, now=now, report=report, control=control)
            exit_enrollments(session, sequence, now=now, report=report, settings=settings)

    stage("recover-interrupted", recover)
    stage("record-global-control", record_global_control)
    for sequence in tick.selected.values():
        stage(f"enroll-and-exit-{sequence.name.replace('_', '-')}", lambda s=sequence: enroll_and_exit(s))


def _walk_and_dispatch(
    stage: Stage, dispatcher: Dispatcher, tick: _TickSetup, *, shard: Shard | None = None
) -> None:
    """Steps 4 and 5 of a tick (of one shard), round after round until nothing moves."""
    engine, now, policy, report = dispatcher.engine, tick.now, tick.policy, dispatcher.report

    def walk() -> int:
        return walk_due(
            engine,
            tick.selected,
            now=now,
            policy=policy,
            report=report,
            audience_definitions=tick.audience_definitions,
            settings=tick.settings,
            shard=shard,
        )

    for _ in range(MAX_ROUNDS):
        walked = stage("advance-enrollments", walk)
        dispatched = stage("dispatch-deliveries", lambda: dispatch_due(dispatcher, shard=shard))
        if not walked and not dispatched:
            break


def _finish(stage: Stage, engine: Engine, report: TickReport) -> None:
    """The end of a tick: fresh statistics when it wrote a lot; failed when a channel halted."""
    stale = stale_statistics(engine, report.written)
    if stale:
        # A tick that enrolled or sent to many customers changes the tables the next one plans on.
        stage("refresh-statistics", lambda: refresh_statistics(engine, stale))
    if report.halted:
        # Everything else in the tick went on; the stage that could not send ends failed with the reason.
        stage("dispatch-deliveries", lambda: _raise(DeliveryHalted(report)))


def _run_sharded(
    engine: Engine,
    stage: Stage,
    tick: _TickSetup,
    report: TickReport,
    count: int,
    *,
    run_shards: ShardRunner | None,
    retry_policy: RetryPolicy | None,
    sleep: Callable[[float], None],
    connectors: Mapping[str, Connector] | None,
) -> None:
    """A tick in ``count`` shards: its own stages once, the shards (``run_shards``), their reports added up
    into ``report``, then the end of the tick once."""
    _once_per_tick(stage, engine, tick, report)
    stale = stale_statistics(engine, report.written)
    if stale:
        # The shards plan on the enrollments the tick just created: with statistics taken before them, every
        # worker would repeat the same bad plan.
        stage("refresh-statistics", lambda: refresh_statistics(engine, stale))

    def in_threads(shards: list[Shard]) -> list[TickReport | BaseException]:
        def one(shard: Shard) -> TickReport | BaseException:
            try:
                return run_shard(
                    engine,
                    shard=shard,
                    now=tick.now,
                    settings=tick.settings,
                    names=list(tick.selected),
                    policy=tick.policy,
                    retry_policy=retry_policy,
                    sleep=sleep,
                    sequences=tick.sequences,
                    campaigns=tick.campaigns,
                    connectors=connectors,
                )
            except Exception as exc:  # noqa: BLE001 - handed back: the other shards go on
                return exc

        with ThreadPoolExecutor(max_workers=len(shards), thread_name_prefix="omni-shard") as pool:
            return list(pool.map(one, shards))

    shards = Shard.all(count)
    outcomes = (run_shards or in_threads)(shards)
    failures: dict[str, BaseException] = {}
    for shard, outcome in zip(shards, outcomes, strict=True):
        if isinstance(outcome, TickReport):
            report.merge(outcome)
        elif not isinstance(outcome, ShardBusy):  # busy: its holder works on it; the next tick sees the rest
            failures[str(shard)] = outcome
    _finish(stage, engine, report)
    if failures:
        stage("dispatch-shards", lambda: _raise(ShardsFailed(report, failures)))


def _raise(exc: BaseException) -> None:
    raise exc


def sequence_status(engine: Engine, name: str) -> dict[str, Any]:
    """Enrollments by status and step, deliveries by step and status, exit reasons."""
    enrollments = Enrollment.__table__
    deliveries = Delivery.__table__
    with session_scope(engine) as session:
        by_status = dict(
            session.execute(
                select(enrollments.c.status, func.count())
                .where(enrollments.c.sequence == name)
                .group_by(enrollments.c.status)
            ).all()
        )
        by_step = {
            int(k): v
            for k, v in session.execute(
                select(enrollments.c.step_index, func.count())
                .where(enrollments.c.sequence == name, enrollments.c.status == EnrollmentStatus.ACTIVE.value)
                .group_by(enrollments.c.step_index)
            ).all()
        }
        reasons = dict(
            session.execute(
                select(enrollments.c.exit_reason, func.count())
                .where(enrollments.c.sequence == name, enrollments.c.status == EnrollmentStatus.EXITED.value)
                .group_by(enrollments.c.exit_reason)
            ).all()
        )
        delivered: dict[str, dict[str, int]] = defaultdict(dict)
        for step, status, count in session.execute(
            select(deliveries.c.step_id, deliveries.c.status, func.count())
            .join(enrollments, enrollments.c.id == deliveries.c.enrollment_id)
            .where(enrollments.c.sequence == name)
            .group_by(deliveries.c.step_id, deliveries.c.status)
        ):
            delivered[step][status] = count
    return {
        "sequence": name,
        "enrollments": by_status,
        "active_by_step": by_step,
        "exit_reasons": reasons,
        "deliveries": dict(delivered),
    }
