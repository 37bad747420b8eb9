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
"""

from __future__ import annotations

import time as time_module
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select

from audiences import build_audiences, load_audiences
from connectors import Connector, RetryPolicy
from omni.core.collector import frozen_heap
from omni.core.settings import Settings
from omni.core.statuses import EnrollmentStatus
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
from sequences.reports import DeliveryHalted, TickReport
from sequences.walking import walk_due

# Walk-then-dispatch rounds in one tick at most (each round moves every enrollment one send further).
MAX_ROUNDS = 20

Stage = Callable[[str, Callable[[], Any]], Any]


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
    """
    stage = stage or (lambda _name, fn: fn())
    policy = policy or DeliveryPolicy.from_settings(settings)
    audience_definitions = load_audiences(settings.audiences_dir)
    all_sequences = (
        dict(sequences)
        if sequences is not None
        else load_sequences(settings.sequences_dir, audiences=audience_definitions)
    )
    selected = {name: all_sequences[name] for name in (names or all_sequences) if name in all_sequences}
    missing = [name for name in (names or ()) if name not in all_sequences]
    if missing:
        raise UnknownSequence(missing[0], sorted(all_sequences))
    report = TickReport(now=now)
    for name, sequence in selected.items():
        report.sequences[name]  # noqa: B018 - every selected sequence appears in the report
        for step in sequence.steps:  # every selected sequence and send step appears, in the sequence's order
            if isinstance(step, SendStep):
                report.sequences[name].steps[step.id]  # noqa: B018
    if build:
        needed = sorted({s.trigger_audience for s in selected.values() if s.trigger_audience})
        if needed:
            built = stage(
                "build-audiences",
                lambda: build_audiences(engine, names=needed, now=now, definitions=audience_definitions),
            )
            report.audiences = {name: result.as_dict() for name, result in built.items()}
    dispatcher = Dispatcher(
        engine=engine,
        now=now,
        settings=settings,
        policy=policy,
        sequences=all_sequences,
        campaigns=campaigns if campaigns is not None else load_campaigns(settings.campaigns_dir),
        report=report,
        retry_policy=retry_policy,
        sleep=sleep,
        connectors=dict(connectors or {}),
        walked=frozenset(selected),
    )
    try:
        with frozen_heap():
            _run_stages(stage, dispatcher, selected, audience_definitions=audience_definitions)
    finally:
        dispatcher.close()
    return report


def _run_stages(
    stage: Stage,
    dispatcher: Dispatcher,
    selected: Mapping[str, SequenceDefinition],
    *,
    audience_definitions: Mapping[str, Any],
) -> None:
    """Steps 2 to 5 of a tick (see the module docstring), each through ``stage``."""
    engine, now, policy, report = dispatcher.engine, dispatcher.now, dispatcher.policy, dispatcher.report
    settings = dispatcher.settings

    def recover() -> None:
        with session_scope(engine) as session:
            recover_interrupted(
                session, now=now, policy=policy, report=report, sequences=dispatcher.sequences
            )

    def enroll_and_exit(sequence: SequenceDefinition) -> None:
        with session_scope(engine) as session:
            enroll(session, sequence, now=now, report=report)
            exit_enrollments(session, sequence, now=now, report=report, settings=settings)

    def walk() -> int:
        return walk_due(
            engine,
            selected,
            now=now,
            policy=policy,
            report=report,
            audience_definitions=audience_definitions,
            settings=settings,
        )

    stage("recover-interrupted", recover)
    for sequence in selected.values():
        stage(f"enroll-and-exit-{sequence.name.replace('_', '-')}", lambda s=sequence: enroll_and_exit(s))
    for _ in range(MAX_ROUNDS):
        walked = stage("advance-enrollments", walk)
        dispatched = stage("dispatch-deliveries", lambda: dispatch_due(dispatcher))
        if not walked and not dispatched:
            break
    stale = stale_statistics(engine, report.written)
    if stale:
        # A tick that enrolled or sent to many customers changes the tables the next one plans on.
        stage("refresh-statistics", lambda: refresh_statistics(engine, stale))
    if report.halted:
        # Everything else in the tick went on; the stage that could not send ends failed with the reason.
        stage("dispatch-deliveries", lambda: _raise(DeliveryHalted(report)))


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
