"""Step walking: due enrollments go through their sequence's steps, a batch at a time.

``wait`` sets the next run time (a duration, or the next time the customer's clock shows ``until``),
``branch`` evaluates an audience condition for the whole batch in SQL, ``send`` creates a ``pending``
delivery (unique per enrollment and step) and parks the enrollment until the delivery is resolved
(:func:`sequences.deliveries.advance`). Past the last step the enrollment completes.

A batch is read (on PostgreSQL in a shard, ``FOR UPDATE SKIP LOCKED``), walked, and written in the
transaction that read it. On PostgreSQL that transaction is handed to a writer thread
(:class:`sequences.pipeline.WriteBehind`) which writes and commits it while the next batch is read and
walked: the batches of one sequence are disjoint (the next is read after the last row of the one
before, in (next run, id) order, and a customer has one open enrollment per sequence), and no walk step
reads what another batch writes. One batch is written at a time, and the walk of a sequence ends when its
last batch is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, Select, select
from sqlalchemy.orm import Session

from audiences import compile_condition
from omni.core.batching import chunked
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.models import Delivery, Enrollment
from profiles.timezones import customer_timezones, zone
from sequences.definitions import BranchStep, SendStep, SequenceDefinition, WaitStep
from sequences.deliveries import advance, insert_new, keyset_after, new_delivery, provider_of
from sequences.gate import DeliveryPolicy
from sequences.pipeline import WriteBehind
from sequences.reports import TickReport
from sequences.sql import Driver

if TYPE_CHECKING:  # sequences.shards builds on this module
    from sequences.shards import Shard


def next_local_time(after: datetime, at: time, customer_zone: ZoneInfo) -> datetime:
    """The first moment after ``after`` when the customer's clock shows ``at``."""
    local = after.astimezone(customer_zone)
    candidate = datetime.combine(local.date(), at, tzinfo=customer_zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=customer_zone)
    return candidate.astimezone(after.tzinfo)


def walk_due(
    engine: Engine,
    sequences: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    audience_definitions: Mapping[str, Any],
    settings: Settings,
    shard: Shard | None = None,
) -> int:
    """Advance every due enrollment of ``sequences`` (of the customers of ``shard``, when given) as far as
    it can go now; returns how many moved.

    A shard's batches are read ``FOR UPDATE ... SKIP LOCKED`` on PostgreSQL and walked in the transaction
    that locked them: another worker, or an overlapping tick, skips what this one holds.

    One sequence at a time, along ``ix_enrollments_due`` (sequence, status, next run, id): each batch is
    the next entries after the one before, read in order (across sequences at once, every enrollment still
    due was read and sorted for each batch)."""
    return sum(
        _walk_sequence(
            engine,
            name,
            sequences,
            now=now,
            policy=policy,
            report=report,
            audience_definitions=audience_definitions,
            settings=settings,
            shard=shard,
        )
        for name in sequences
    )


def _walk_sequence(
    engine: Engine,
    name: str,
    sequences: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    audience_definitions: Mapping[str, Any],
    settings: Settings,
    shard: Shard | None,
) -> int:
    """:func:`walk_due` for the enrollments of sequence ``name``."""
    lock_rows = shard is not None and engine.dialect.name == "postgresql"
    moved = 0
    after: tuple[datetime, int] | None = None
    with WriteBehind(engine, report, name="walk") as writer:
        while True:
            # A batch's transaction: read (and lock) it, walk it, hand it to the writer, which writes and
            # commits it while the next batch is read and walked (PostgreSQL).
            session = Session(engine, expire_on_commit=False)
            handed = False
            try:
                query = due_enrollments(name, now=now, after=after, limit=policy.batch_size, shard=shard)
                if lock_rows:
                    query = query.with_for_update(skip_locked=True, of=Enrollment.__table__)
                rows = session.execute(query).all()
                if not rows:
                    return moved
                after = (rows[-1].next_run_at, rows[-1].id)
                walked = _walk_batch(
                    session,
                    rows,
                    sequences,
                    now=now,
                    policy=policy,
                    report=report,
                    audience_definitions=audience_definitions,
                    settings=settings,
                )
                moved += len(rows)
                writer.write(_write_batch, session, walked, sequences, now)
                handed = True
            finally:
                if not handed:
                    session.rollback()
                    session.close()


def due_enrollments(
    name: str, *, now: datetime, after: tuple[datetime, int] | None, limit: int, shard: Shard | None = None
) -> Select:
    """The next ``limit`` active enrollments of sequence ``name`` due at ``now``, after ``after`` in (next
    run, id) order (of ``shard``'s customers, when given): a batch of a walk."""
    enrollments = Enrollment.__table__
    return (
        select(
            enrollments.c.id,
            enrollments.c.sequence,
            enrollments.c.customer_id,
            enrollments.c.step_index,
            enrollments.c.next_run_at,
        )
        .where(
            enrollments.c.sequence == name,
            enrollments.c.status == EnrollmentStatus.ACTIVE.value,
            enrollments.c.next_run_at <= now,
            *([shard.owns(enrollments.c.customer_id)] if shard is not None else []),
            keyset_after(enrollments.c.next_run_at, enrollments.c.id, after),
        )
        .order_by(enrollments.c.next_run_at, enrollments.c.id)
        .limit(limit)
    )


def _walk_batch(
    session: Session,
    rows: Sequence[Any],
    sequences: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    audience_definitions: Mapping[str, Any],
    settings: Settings,
) -> _Walked:
    """Walk one batch of due enrollments as far as each can go now (reading what it needs in ``session``);
    returns what to write (:func:`_write_batch`)."""
    zones: dict[int, str] | None = None
    branch_members: dict[tuple[str, str], set[int]] = {}
    customer_ids = [r.customer_id for r in rows]
    updates: list[tuple[Any, ...]] = []
    new_deliveries: list[dict[str, Any]] = []
    providers: dict[str, str] = {}
    for row in rows:
        sequence = sequences[row.sequence]
        index, due = row.step_index, row.next_run_at
        status, next_run = EnrollmentStatus.ACTIVE.value, due
        for _ in range(len(sequence.steps) * 2 + 1):
            if index >= len(sequence.steps):
                status, next_run = EnrollmentStatus.COMPLETED.value, None
                report.sequences[sequence.name].completed += 1
                break
            step = sequence.steps[index]
            if isinstance(step, WaitStep):
                if step.duration is not None:
                    next_run = due + step.duration
                else:
                    if zones is None:
                        zones = customer_timezones(session, customer_ids, policy.default_timezone)
                    customer_zone = zone(zones.get(row.customer_id), policy.default_timezone)
                    next_run = next_local_time(due, step.until, customer_zone)
                index += 1
                if next_run > now:
                    break
                due = next_run
                continue
            if isinstance(step, BranchStep):
                key = (sequence.name, step.id)
                if key not in branch_members:
                    selected = compile_condition(step.condition, now=now, definitions=audience_definitions)
                    ids = selected.subquery()
                    branch_members[key] = set(
                        session.execute(select(ids.c[0]).where(ids.c[0].in_(customer_ids))).scalars()
                    )
                if row.customer_id in branch_members[key]:
                    index = sequence.step_index(step.then)
                elif step.otherwise:
                    index = sequence.step_index(step.otherwise)
                else:
                    index += 1
                continue
            assert isinstance(step, SendStep)
            if step.channel not in providers:
                providers[step.channel] = provider_of(step.channel, settings)
            new_deliveries.append(
                new_delivery(
                    key=f"enrollment:{row.id}:{step.id}",
                    enrollment_id=row.id,
                    campaign=None,
                    step_id=step.id,
                    customer_id=row.customer_id,
                    channel=step.channel,
                    connector=providers[step.channel],
                    template=step.template,
                    ad_audience=step.audience,
                    now=now,
                )
            )
            next_run = None  # parked until the delivery is resolved
            break
        updates.append((row.id, index, next_run, status, now))
    return _Walked(updates, new_deliveries)


@dataclass
class _Walked:
    """What walking a batch decided: the enrollments' new state and the deliveries their sends create."""

    updates: list[tuple[Any, ...]]  # (id, step index, next run, status, updated)
    deliveries: list[dict[str, Any]]


def _write_batch(
    session: Session,
    walked: _Walked,
    sequences: Mapping[str, SequenceDefinition],
    now: datetime,
    report: TickReport,
) -> TickReport:
    """Write a walked batch in ``session``'s transaction (the one that read it), commit and close it;
    rows written and enrollments completed are counted in ``report``, returned."""
    try:
        Driver(session).update_many(
            Enrollment.__table__,
            ("id",),
            ("step_index", "next_run_at", "status", "updated_at"),
            walked.updates,
        )
        inserted = insert_new(session, walked.deliveries)
        report.written["enrollments"] += len(walked.updates)
        report.written["deliveries"] += inserted
        if inserted != len(walked.deliveries):
            keys = [d["dedupe_key"] for d in walked.deliveries]
            _advance_resolved(session, keys, sequences, now=now, report=report)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    return report


def _advance_resolved(
    session: Session,
    keys: list[str],
    sequences: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    report: TickReport,
) -> None:
    """A delivery that already existed and is resolved (a re-walk after an interruption): its enrollment
    advances at once."""
    deliveries = Delivery.__table__
    resolved = []
    for chunk in chunked(keys):
        resolved.extend(
            session.execute(
                select(deliveries.c.enrollment_id, deliveries.c.step_id).where(
                    deliveries.c.dedupe_key.in_(chunk), deliveries.c.status.in_(DeliveryStatus.final())
                )
            ).all()
        )
    advance(
        session,
        [(r.enrollment_id, r.step_id, None) for r in resolved],
        sequences=sequences,
        now=now,
        report=report,
        walked=sequences.keys(),
    )
