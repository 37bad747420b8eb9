"""The sequence engine: enrollment, exits, steps and the one dispatcher every message goes through.

Design: **steps create deliveries; one dispatcher sends them.**

A tick at ``now`` (:func:`run_tick`):

1. rebuilds, at ``now``, the audiences its sequences are triggered by;
2. marks deliveries left ``sending`` by an interrupted tick (older than ``sending_timeout``): email, SMS
   and push become ``unknown`` and are **not resent** (at most once); ad-audience syncs go back to
   ``pending`` (idempotent, at least once);
3. enrolls new entrants with one ``INSERT ... SELECT`` per sequence; held-out customers (a deterministic
   bucket of customer and sequence) are recorded with status ``holdout`` and never messaged;
4. exits active enrollments whose exit rule holds (an event on any channel after enrollment, and/or
   leaving the trigger audience), records the reason, drops their pending deliveries and queues removal
   from every ad audience the sequence added them to;
5. walks due enrollments in batches: ``wait`` sets the next run time, ``branch`` evaluates an audience
   condition for the whole batch in SQL, ``send`` creates a ``pending`` delivery (unique per enrollment
   and step) and parks the enrollment until the delivery is resolved;
6. dispatches due ``pending`` deliveries (of sequences and campaigns alike) in batches: consent and
   reachability, quiet hours in the customer's timezone and the cross-channel frequency cap (both
   postpone), rendering, then an atomic **claim** (``pending`` → ``sending``, committed) before the
   connector is called with the whole batch through the shared retry layer; results are recorded, a
   ``sent`` message is written back to the profile as an event (``Email Sent`` ...), what is still
   retryable is retried on later ticks with backoff up to ``max_attempts``, a permanent failure (or an
   unreachable customer) moves to the step's ``fallback`` channel when it has one, and the enrollment
   advances.

Steps 5 and 6 repeat until nothing moves, so a tick that finds a send followed by an elapsed wait
completes both. Two ticks at once never double-send: the unique delivery row and the atomic claim
decide who sends (the ``run-sequences`` deployment also has a concurrency limit of 1).
"""

from __future__ import annotations

import time as time_module
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, exists, func, literal, or_, select, update
from sqlalchemy.orm import Session

from connectors.base import at_most_once
from omni.core.batching import chunked
from omni.core.collector import frozen_heap
from profiles.bulk import dialect_insert, insert_rows
from profiles.db import refresh_statistics, session_scope, stale_statistics
from profiles.models import MESSAGE_SENT_EVENTS, AudienceMembership, Customer, Delivery, Enrollment, Event
from sequences.definitions import (
    BranchStep,
    CampaignDefinition,
    SendStep,
    SequenceDefinition,
    WaitStep,
    fallback_template,
)
from sequences.policy import (
    MESSAGE_CHANNELS,
    Contact,
    DeliveryPolicy,
    cap_until,
    holdout_bucket_sql,
    load_contacts,
    next_local_time,
    quiet_until,
    recent_messages,
)
from sequences.sql import Driver

SENT_EVENTS = MESSAGE_SENT_EVENTS
EVENT_CHANNELS = {"email": "email", "sms": "sms", "push": "push", "ads": "social", "webhook": "web"}
FINAL_STATUSES = ("sent", "failed", "skipped", "unknown")
MAX_ROUNDS = 20
FALLBACK = "/fallback"
REMOVE = "/remove"


@dataclass
class StepCounts:
    """What one step (or campaign) did in a tick. Customers where a marketer reads customers: a customer
    whose primary channel fell back counts once, under the fallback's outcome. Attempts where attempts:
    ``postponed`` and ``retrying`` count deliveries put off in this tick. Ad-audience syncs are counted
    as what they are, adds and removals, never as messages sent."""

    sent: int = 0  # customers sent a message (email, SMS, push, webhook)
    added: int = 0  # customers added to an ad audience
    removed: int = 0  # customers removed from an ad audience (on exit)
    postponed: int = 0  # deliveries put off: quiet hours or the frequency cap
    fell_back: int = 0  # customers moved to the step's fallback channel
    skipped_consent: int = 0  # customers not reachable on any channel the step offers
    failed: int = 0  # customers the step could not reach (permanent failure, nothing left to try)
    retrying: int = 0  # deliveries to try again on a later tick (provider throttled or down)
    unknown: int = 0  # customers whose message may or may not have gone out; never resent

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# Column headers a person reads (the Prefect artifact, the CLI), in order, for each StepCounts field.
STEP_COLUMNS = {
    "sent": "Sent",
    "added": "Ad adds",
    "removed": "Ad removals",
    "fell_back": "Fell back",
    "skipped_consent": "Skipped (consent)",
    "failed": "Failed",
    "unknown": "Unknown",
    "postponed": "Postponed",
    "retrying": "Retrying",
}
ENTRY_COLUMNS = {"enrolled": "Enrolled", "held_out": "Held out", "exited": "Exited", "completed": "Completed"}


def without_empty_columns(rows: list[dict[str, Any]], keep: Collection[str] = ()) -> list[dict[str, Any]]:
    """``rows`` without the count columns that are zero (or blank) in every row, but those in ``keep``:
    what happened reads at a glance, on a 1,400-pixel screen and at 80 columns alike."""
    if not rows:
        return rows
    shown = [
        column
        for column in rows[0]
        if column in keep
        or not all(isinstance(row[column], int) for row in rows)
        or any(row[column] for row in rows)
    ]
    return [{column: row[column] for column in shown} for row in rows]


@dataclass
class SequenceReport:
    enrolled: int = 0
    held_out: int = 0
    exited: int = 0
    completed: int = 0
    exit_reasons: Counter = field(default_factory=Counter)
    # Send steps in the definition's order (run_tick lists them before anything is counted).
    steps: dict[str, StepCounts] = field(default_factory=lambda: defaultdict(StepCounts))

    def as_dict(self) -> dict[str, Any]:
        return {
            "enrolled": self.enrolled,
            "held_out": self.held_out,
            "exited": self.exited,
            "completed": self.completed,
            "exit_reasons": dict(self.exit_reasons),
            "steps": {step: counts.as_dict() for step, counts in self.steps.items()},
        }

    def total(self, name: str) -> int:
        return sum(getattr(counts, name) for counts in self.steps.values())


@dataclass
class TickReport:
    now: datetime
    audiences: dict[str, dict[str, int]] = field(default_factory=dict)
    sequences: dict[str, SequenceReport] = field(default_factory=lambda: defaultdict(SequenceReport))
    campaigns: dict[str, StepCounts] = field(default_factory=lambda: defaultdict(StepCounts))
    # (channel, customer_id, template or audience) of each message sent, for people (the demo)
    sent: list[tuple[str, int, str]] = field(default_factory=list)
    # channel -> why nothing more could be sent on it this tick (a revoked key, a provider down)
    halted: dict[str, str] = field(default_factory=dict)
    # rows written per table (at most), to refresh the planner's statistics when a tick changed a lot
    written: Counter = field(default_factory=Counter)

    def counts_for(self, delivery: Any) -> StepCounts:
        if delivery.campaign:
            return self.campaigns[delivery.campaign]
        sequence, step = delivery.sequence, delivery.step_id.split("/")[0]
        return self.sequences[sequence].steps[step]

    def rows(self) -> list[dict[str, Any]]:
        """One row per send step of each sequence, in the sequence's order, then one per campaign, with
        human column headers: what a marketer reads in the Prefect UI (``sequences-tick``)."""
        rows: list[dict[str, Any]] = []
        for name, sequence in self.sequences.items():
            for step, counts in sequence.steps.items():
                values = {label: getattr(counts, key) for key, label in STEP_COLUMNS.items()}
                rows.append({"Sequence": name, "Step": step, **values})
        for name, counts in self.campaigns.items():
            values = {label: getattr(counts, key) for key, label in STEP_COLUMNS.items()}
            rows.append({"Sequence": f"campaign {name}", "Step": "send", **values})
        return rows

    def journey_rows(self) -> list[dict[str, Any]]:
        """One row per sequence: customers who entered, were held out, left (and why) and finished."""
        return [
            {
                "Sequence": name,
                **{label: getattr(sequence, key) for key, label in ENTRY_COLUMNS.items()},
                "Exit reasons": ", ".join(f"{n} {why}" for why, n in sequence.exit_reasons.items()) or "",
            }
            for name, sequence in self.sequences.items()
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "audiences": self.audiences,
            "sequences": {name: report.as_dict() for name, report in self.sequences.items()},
            "campaigns": {name: counts.as_dict() for name, counts in self.campaigns.items()},
            "halted": dict(self.halted),
        }


class DeliveryHalted(RuntimeError):
    """A channel could not send at all this tick (a revoked key, a provider down after retries): its
    deliveries were left due, nothing was marked sent, and the tick (the Prefect task and flow, the CLI)
    ends failed with the reason. ``report`` holds what the rest of the tick did."""

    def __init__(self, report: TickReport) -> None:
        self.report = report
        self.created = 0  # a campaign's new deliveries (send_campaign sets it)
        reasons = "; ".join(f"{channel}: {reason}" for channel, reason in sorted(report.halted.items()))
        super().__init__(
            f"nothing could be sent on {', '.join(sorted(report.halted))} ({reasons}); "
            "those deliveries stay due and go out once the cause is fixed"
        )


class UnknownSequence(KeyError):
    def __str__(self) -> str:
        return f"unknown sequence {self.args[0]!r} (known: {', '.join(self.args[1]) or 'none'})"


@dataclass
class Dispatcher:
    """Sends due deliveries; built once per tick (connectors are checked before anything is claimed)."""

    engine: Engine
    now: datetime
    policy: DeliveryPolicy
    sequences: Mapping[str, SequenceDefinition]
    campaigns: Mapping[str, CampaignDefinition]
    report: TickReport
    settings: Any = None
    retry_policy: Any = None
    sleep: Callable[[float], None] = time_module.sleep
    connectors: dict[str, Any] = field(default_factory=dict)
    # Sequences whose enrollments this tick walks right after dispatching (see _advance).
    walked: frozenset[str] = frozenset()

    def connector(self, channel: str) -> Any:
        if channel not in self.connectors:
            from connectors import get_connector

            self.connectors[channel] = get_connector(
                channel, self.settings, engine=self.engine, clock=lambda: self.now
            )
        return self.connectors[channel]

    def close(self) -> None:
        for connector in self.connectors.values():
            connector.close()


# --- helpers -----------------------------------------------------------------------------------------


def _insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]]) -> int:
    """INSERT rows, skipping those that violate a unique constraint; returns how many were inserted."""
    return Driver(session).insert_ignore(table, rows) if rows else 0


def provider_of(channel: str, settings: Any) -> str:
    from connectors import provider_for

    try:
        return provider_for(channel, settings)
    except Exception:  # noqa: BLE001 - recorded only; the dispatcher reports a bad setting properly
        return "unknown"


# --- 2. interrupted sends ----------------------------------------------------------------------------


def recover_interrupted(
    session: Session, *, now: datetime, policy: DeliveryPolicy, report: TickReport
) -> None:
    deliveries = Delivery.__table__
    stale = and_(deliveries.c.status == "sending", deliveries.c.updated_at < now - policy.sending_timeout)
    rows = session.execute(
        select(
            deliveries.c.id,
            deliveries.c.enrollment_id,
            deliveries.c.campaign,
            deliveries.c.step_id,
            deliveries.c.channel,
        ).where(stale)
    ).all()
    if not rows:
        return
    once = [r.id for r in rows if at_most_once(r.channel)]
    at_least_once = [r.id for r in rows if not at_most_once(r.channel)]
    if once:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(once))
            .values(
                status="unknown",
                updated_at=now,
                error="interrupted while sending; not resent (at most once)",
            )
        )
    if at_least_once:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(at_least_once))
            .values(status="pending", next_attempt_at=now, updated_at=now)
        )
    sequences = _sequence_names(session, [r.enrollment_id for r in rows if r.enrollment_id])
    for row in rows:
        if at_most_once(row.channel):
            counts = (
                report.campaigns[row.campaign]
                if row.campaign
                else report.sequences[sequences[row.enrollment_id]].steps[row.step_id.split("/")[0]]
            )
            counts.unknown += 1
    _advance(
        session,
        [
            (r.enrollment_id, r.step_id, sequences.get(r.enrollment_id))
            for r in rows
            if r.enrollment_id and at_most_once(r.channel)
        ],
        now=now,
    )


def _sequence_names(session: Session, enrollment_ids: Iterable[int]) -> dict[int, str]:
    table = Enrollment.__table__
    names: dict[int, str] = {}
    for chunk in chunked(sorted(set(enrollment_ids))):
        names.update(session.execute(select(table.c.id, table.c.sequence).where(table.c.id.in_(chunk))).all())
    return names


# --- 3. enrollment -----------------------------------------------------------------------------------


def enroll(session: Session, sequence: SequenceDefinition, *, now: datetime, report: TickReport) -> None:
    enrollments = Enrollment.__table__
    customers = Customer.__table__
    if sequence.trigger_audience:
        members = AudienceMembership.__table__
        entrants = (
            select(members.c.customer_id.label("customer_id"), members.c.entered_at.label("since"))
            .join(customers, and_(customers.c.id == members.c.customer_id, customers.c.merged_into.is_(None)))
            .where(
                members.c.audience == sequence.trigger_audience,
                members.c.exited_at.is_(None),
                members.c.entered_at <= now,
            )
        ).subquery()
    else:
        events = Event.__table__
        since = now - timedelta(days=1)
        last = session.execute(
            select(func.max(enrollments.c.enrolled_at)).where(enrollments.c.sequence == sequence.name)
        ).scalar()
        if last is not None:
            since = last
        entrants = (
            select(events.c.customer_id.label("customer_id"), func.min(events.c.occurred_at).label("since"))
            .where(
                events.c.name == sequence.trigger_event,
                events.c.occurred_at > since,
                events.c.occurred_at <= now,
            )
            .group_by(events.c.customer_id)
        ).subquery()
    previous = [enrollments.c.status == "active", enrollments.c.enrolled_at >= entrants.c.since]
    if sequence.reenter_after is not None:
        previous.append(enrollments.c.enrolled_at > now - sequence.reenter_after)
    already = exists().where(
        # Found by customer: "|| ''" keeps the planner off the index on the sequence's name, which it
        # took with stale statistics (a table that was empty at the last ANALYZE) to read every enrollment
        # of the sequence for each entrant.
        (enrollments.c.sequence + "") == sequence.name,
        enrollments.c.customer_id == entrants.c.customer_id,
        or_(*previous),
    )
    threshold = round(sequence.holdout_percent * 100)
    held = holdout_bucket_sql(entrants.c.customer_id, sequence.name) < threshold
    for status, condition in (("holdout", held), ("active", ~held)):
        if status == "holdout" and threshold == 0:
            continue
        chosen = select(
            literal(sequence.name),
            entrants.c.customer_id,
            literal(status),
            literal(0),
            literal(now if status == "active" else None, type_=Enrollment.__table__.c.next_run_at.type),
            literal(now, type_=enrollments.c.enrolled_at.type),
            literal(now, type_=enrollments.c.updated_at.type),
        ).where(~already, condition if threshold else literal(True))
        # RETURNING, not rowcount: psycopg reports -1 for INSERT ... SELECT here. ON CONFLICT DO NOTHING:
        # a concurrent tick that enrolled the same customer first wins (uq_enrollments_open), and this
        # one enrolls nobody twice, whatever the isolation level.
        created = session.execute(
            dialect_insert(session, enrollments)
            .from_select(
                [
                    "sequence",
                    "customer_id",
                    "status",
                    "step_index",
                    "next_run_at",
                    "enrolled_at",
                    "updated_at",
                ],
                chosen,
            )
            .on_conflict_do_nothing()
            .returning(enrollments.c.id)
        ).all()
        report.written["enrollments"] += len(created)
        counts = report.sequences[sequence.name]
        if status == "holdout":
            counts.held_out += len(created)
        else:
            counts.enrolled += len(created)


# --- 4. exits ----------------------------------------------------------------------------------------


def exit_enrollments(
    session: Session, sequence: SequenceDefinition, *, now: datetime, report: TickReport, settings: Any = None
) -> None:
    enrollments = Enrollment.__table__
    active = and_(enrollments.c.sequence == sequence.name, enrollments.c.status == "active")
    rules: list[tuple[str, Any]] = []
    if sequence.exit.event:
        events = Event.__table__
        filters = [
            events.c.customer_id == enrollments.c.customer_id,
            events.c.name == sequence.exit.event,
            events.c.occurred_at > enrollments.c.enrolled_at,
            events.c.occurred_at <= now,
        ]
        for key, value in sequence.exit.properties.items():
            filters.append(events.c.properties[key].as_string() == str(value))
        rules.append((f"event: {sequence.exit.event}", exists().where(*filters)))
    if sequence.exit.left_audience:
        members = AudienceMembership.__table__
        rules.append(
            (
                f"left audience {sequence.trigger_audience}",
                ~exists().where(
                    members.c.audience == sequence.trigger_audience,
                    members.c.customer_id == enrollments.c.customer_id,
                    members.c.exited_at.is_(None),
                ),
            )
        )
    rules.append(
        (
            "customer merged into another",
            exists().where(
                Customer.__table__.c.id == enrollments.c.customer_id,
                Customer.__table__.c.merged_into.is_not(None),
            ),
        )
    )
    exited: list[int] = []
    for reason, rule in rules:
        ids = list(session.execute(select(enrollments.c.id).where(active, rule)).scalars())
        for chunk in chunked(ids):
            session.execute(
                update(enrollments)
                .where(enrollments.c.id.in_(chunk), enrollments.c.status == "active")
                .values(status="exited", exited_at=now, exit_reason=reason, next_run_at=None, updated_at=now)
            )
        report.sequences[sequence.name].exited += len(ids)
        report.written["enrollments"] += len(ids)
        if ids:
            report.sequences[sequence.name].exit_reasons[reason] += len(ids)
        exited.extend(ids)
    if not exited:
        return
    deliveries = Delivery.__table__
    sql = Driver(session)
    status = sql.unindexed("status")  # look the enrollments up, not every delivery with that status
    for chunk in chunked(exited):
        among, params = sql.in_(chunk)
        sql.execute(
            "UPDATE deliveries SET status = 'skipped', error = 'enrollment exited', "
            f"updated_at = {sql.mark} WHERE enrollment_id {among} AND {status} = 'pending'",
            [sql.ts(now), *params],
        )
        # Take them out of every ad audience the sequence added them to.
        added = sql.rows(
            "SELECT dedupe_key, enrollment_id, step_id, customer_id, ad_audience FROM deliveries "
            f"WHERE enrollment_id {among} AND channel = 'ads' AND action = 'add' "
            f"AND {status} IN ('sent', 'sending', 'unknown') ORDER BY id",
            params,
        )
        removals = [
            {
                "dedupe_key": f"{d.dedupe_key}{REMOVE}",
                "enrollment_id": d.enrollment_id,
                "campaign": None,
                "step_id": f"{d.step_id}{REMOVE}",
                "customer_id": d.customer_id,
                "channel": "ads",
                "connector": provider_of("ads", settings),
                "template": None,
                "ad_audience": d.ad_audience,
                "action": "remove",
                "status": "pending",
                "attempts": 0,
                "marketing": False,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
            for d in added
        ]
        _insert_ignore(session, deliveries, removals)


def _after(at_column: Any, id_column: Any, after: tuple[datetime, int] | None) -> Any:
    """Rows after ``after`` in (time, id) order: the keyset condition of a batched walk."""
    if after is None:
        return literal(True)
    at, row_id = after
    return or_(at_column > at, and_(at_column == at, id_column > row_id))


# --- 5. walking steps --------------------------------------------------------------------------------


def walk_due(
    engine: Engine,
    sequences: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    audience_definitions: Mapping[str, Any],
    settings: Any = None,
) -> int:
    """Advance every due enrollment as far as it can go now; returns how many moved."""
    enrollments = Enrollment.__table__
    moved = 0
    # Keyset pagination on (next_run_at, id): each enrollment is visited at most once per call, and the
    # query stays the same size whatever the number of rows already walked (a NOT IN of every id seen
    # grew with each batch: quadratic, and over PostgreSQL's 65,535 bind parameters past ~65,000 rows).
    after: tuple[datetime, int] | None = None
    while True:
        with session_scope(engine) as session:
            rows = session.execute(
                select(
                    enrollments.c.id,
                    enrollments.c.sequence,
                    enrollments.c.customer_id,
                    enrollments.c.step_index,
                    enrollments.c.next_run_at,
                )
                .where(
                    enrollments.c.sequence.in_(list(sequences)),
                    enrollments.c.status == "active",
                    enrollments.c.next_run_at <= now,
                    _after(enrollments.c.next_run_at, enrollments.c.id, after),
                )
                .order_by(enrollments.c.next_run_at, enrollments.c.id)
                .limit(policy.batch_size)
            ).all()
            if not rows:
                return moved
            after = (rows[-1].next_run_at, rows[-1].id)
            moved += _walk_batch(
                session,
                rows,
                sequences,
                now=now,
                policy=policy,
                report=report,
                audience_definitions=audience_definitions,
                settings=settings,
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
    settings: Any,
) -> int:
    from audiences import compile_condition

    enrollments = Enrollment.__table__
    zones: dict[int, str] | None = None
    branch_members: dict[tuple[str, str], set[int]] = {}
    customer_ids = [r.customer_id for r in rows]
    updates: list[tuple[Any, ...]] = []
    new_deliveries: list[dict[str, Any]] = []
    providers: dict[str, str] = {}
    for row in rows:
        sequence = sequences[row.sequence]
        index, due = row.step_index, row.next_run_at
        status, next_run = "active", due
        for _ in range(len(sequence.steps) * 2 + 1):
            if index >= len(sequence.steps):
                status, next_run = "completed", None
                report.sequences[sequence.name].completed += 1
                break
            step = sequence.steps[index]
            if isinstance(step, WaitStep):
                if step.duration is not None:
                    next_run = due + step.duration
                else:
                    if zones is None:
                        from sequences.policy import customer_timezones

                        zones = customer_timezones(session, customer_ids, policy.default_timezone)
                    next_run = next_local_time(
                        due, step.until, zones.get(row.customer_id, policy.default_timezone)
                    )
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
                _delivery_row(
                    key=f"enrollment:{row.id}:{step.id}",
                    enrollment_id=row.id,
                    campaign=None,
                    step_id=step.id,
                    customer_id=row.customer_id,
                    channel=step.channel,
                    template=step.template,
                    ad_audience=step.audience,
                    now=now,
                    settings=settings,
                    connector=providers[step.channel],
                )
            )
            next_run = None  # parked until the delivery is resolved
            break
        updates.append((row.id, index, next_run, status, now))
    sql = Driver(session)
    sql.update_many(enrollments, ("id",), ("step_index", "next_run_at", "status", "updated_at"), updates)
    deliveries = Delivery.__table__
    inserted = sql.insert_ignore(deliveries, new_deliveries)
    report.written["enrollments"] += len(updates)
    report.written["deliveries"] += inserted
    if inserted != len(new_deliveries):
        # A delivery that already existed and is resolved (a re-walk after an interruption) advances at once.
        keys = [d["dedupe_key"] for d in new_deliveries]
        resolved = []
        for chunk in chunked(keys):
            resolved.extend(
                session.execute(
                    select(deliveries.c.enrollment_id, deliveries.c.step_id).where(
                        deliveries.c.dedupe_key.in_(chunk), deliveries.c.status.in_(FINAL_STATUSES)
                    )
                ).all()
            )
        _advance(
            session,
            [(r.enrollment_id, r.step_id, None) for r in resolved],
            now=now,
            report=report,
            walked=sequences.keys(),
        )
    return len(rows)


def _delivery_row(
    *,
    key: str,
    enrollment_id: int | None,
    campaign: str | None,
    step_id: str,
    customer_id: int,
    channel: str,
    template: str | None,
    ad_audience: str | None,
    now: datetime,
    settings: Any,
    next_attempt_at: datetime | None = None,
    connector: str | None = None,
) -> dict[str, Any]:
    return {
        "dedupe_key": key,
        "enrollment_id": enrollment_id,
        "campaign": campaign,
        "step_id": step_id,
        "customer_id": customer_id,
        "channel": channel,
        "connector": connector if connector is not None else provider_of(channel, settings),
        "template": template,
        "ad_audience": ad_audience,
        "action": "add" if channel == "ads" else None,
        "status": "pending",
        "attempts": 0,
        # A webhook tells another system (a store's) about the customer: not marketing to them.
        "marketing": channel != "webhook",
        "next_attempt_at": next_attempt_at or now,
        "created_at": now,
        "updated_at": now,
    }


def _advance(
    session: Session,
    resolved: Iterable[tuple[int | None, str, str | None]],
    *,
    now: datetime,
    report: TickReport | None = None,
    walked: Collection[str] = (),
) -> None:
    """Move enrollments past the send step a resolved delivery belonged to (idempotent).

    ``resolved``: (enrollment id, step id, sequence name or None when the caller does not know it).

    An enrollment of a sequence in ``walked`` (one this tick walks again before anything else happens to
    it) goes on at once when its next step needs nothing but the definition, exactly as the walk would
    take it: past the last step it completes (counted in ``report``); before a wait of a fixed duration
    it waits from now. That saves the walk a read and a write per enrollment. Anything else is left due
    now for the walk. Either way only an enrollment still parked at that step moves.
    """
    pairs = {(e, s): q for e, s, q in resolved if e is not None and not s.endswith(REMOVE)}
    if not pairs:
        return
    unknown = [e for (e, _), q in pairs.items() if q is None]
    sequences_by_id = _sequence_names(session, unknown) if unknown else {}
    from sequences.definitions import load_sequences

    definitions = _DEFINITIONS.get("sequences") or load_sequences()
    moved: list[tuple[Any, ...]] = []  # (id, parked at, next step, next run, updated)
    completed: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for (enrollment_id, step_id), name in pairs.items():
        sequence = definitions.get(name or sequences_by_id.get(enrollment_id, ""))
        if sequence is None:
            continue
        try:
            index = sequence.step_index(step_id.split("/")[0])
        except KeyError:
            continue
        following = sequence.steps[index + 1] if index + 1 < len(sequence.steps) else None
        if sequence.name not in walked:
            moved.append((enrollment_id, index, index + 1, now, now))
        elif following is None:
            completed[sequence.name].append((enrollment_id, index, index + 1, "completed", None, now))
        elif isinstance(following, WaitStep) and following.duration and following.duration > timedelta(0):
            moved.append((enrollment_id, index, index + 2, now + following.duration, now))
        else:
            moved.append((enrollment_id, index, index + 1, now, now))
    sql = Driver(session)
    parked = "status = 'active' AND next_run_at IS NULL"
    # One statement for the whole batch (an UPDATE per row cost ~1 ms each).
    sql.update_many(
        Enrollment.__table__,
        ("id", "step_index"),
        ("step_index", "next_run_at", "updated_at"),
        moved,
        where=parked,
    )
    for name, rows in completed.items():
        done = sql.update_many(
            Enrollment.__table__,
            ("id", "step_index"),
            ("step_index", "status", "next_run_at", "updated_at"),
            rows,
            where=parked,
        )
        if report is not None:
            report.sequences[name].completed += done


# Definitions in use by the running tick (so _advance does not reload YAML per call).
_DEFINITIONS: dict[str, Any] = {}


# --- 6. dispatching ----------------------------------------------------------------------------------


@dataclass
class _Due:
    id: int
    dedupe_key: str
    enrollment_id: int | None
    campaign: str | None
    step_id: str
    customer_id: int
    channel: str
    template: str | None
    ad_audience: str | None
    action: str | None
    attempts: int
    sequence: str | None = None


def dispatch_due(dispatcher: Dispatcher, *, campaign: str | None = None) -> int:
    """Send every due pending delivery (or only ``campaign``'s), a batch at a time; returns how many were
    resolved or postponed."""
    deliveries = Delivery.__table__
    enrollments = Enrollment.__table__
    moved = 0
    after: tuple[datetime, int] | None = None  # keyset pagination, as in walk_due
    while True:
        with session_scope(dispatcher.engine) as session:
            rows = session.execute(
                select(
                    deliveries.c.id,
                    deliveries.c.dedupe_key,
                    deliveries.c.enrollment_id,
                    deliveries.c.campaign,
                    deliveries.c.step_id,
                    deliveries.c.customer_id,
                    deliveries.c.channel,
                    deliveries.c.template,
                    deliveries.c.ad_audience,
                    deliveries.c.action,
                    deliveries.c.attempts,
                    deliveries.c.next_attempt_at,
                    enrollments.c.sequence,
                    enrollments.c.status.label("enrollment_status"),
                )
                .select_from(
                    deliveries.outerjoin(enrollments, enrollments.c.id == deliveries.c.enrollment_id)
                )
                .where(
                    deliveries.c.status == "pending",
                    deliveries.c.next_attempt_at <= dispatcher.now,
                    _after(deliveries.c.next_attempt_at, deliveries.c.id, after),
                    deliveries.c.campaign == campaign if campaign else literal(True),
                )
                .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
                .limit(dispatcher.policy.batch_size)
            ).all()
        if not rows:
            return moved
        after = (rows[-1].next_attempt_at, rows[-1].id)
        moved += _dispatch_batch(dispatcher, rows)


def _dispatch_batch(d: Dispatcher, rows: Sequence[Any]) -> int:
    from connectors import AudienceMember, Message, Status, send_batch
    from sequences.effects import apply_effects
    from templates.rendering import RenderError, render_many

    now, policy = d.now, d.policy
    deliveries = Delivery.__table__
    # Columns of dispatch_due's query, in order: id ... attempts, next_attempt_at, sequence, ...
    due = [_Due(*r[:11], r[12]) for r in rows]
    inactive = {
        r.id for r in rows if r.enrollment_id and r.enrollment_status != "active" and r.action != "remove"
    }
    # Connectors first: a misconfigured channel fails here, before anything is claimed.
    for item in due:
        if item.id not in inactive and item.channel not in d.report.halted:
            d.connector(item.channel)

    to_send: list[tuple[_Due, list[Any]]] = []
    outcomes: dict[int, dict[str, Any]] = {}  # delivery id -> column updates
    fallbacks: list[dict[str, Any]] = []
    resolved: list[tuple[int | None, str, str | None]] = []

    def finish(
        item: _Due, status: str, error: str | None = None, *, count: bool = True, **extra: Any
    ) -> None:
        """Record a delivery's final outcome; the step's counts learn the customer's outcome once: a
        delivery that moves to the fallback channel counts as ``fell_back`` and the fallback's own outcome
        is the customer's."""
        outcomes[item.id] = {"status": status, "error": error, "updated_at": now, **extra}
        counts = d.report.counts_for(item)
        fallback = _fallback_for(d, item) if status in ("failed", "skipped") else None
        if fallback is not None:
            fallbacks.append(fallback)
            counts.fell_back += count
            return
        resolved.append((item.enrollment_id, item.step_id, item.sequence))
        if not count:
            return
        if status == "sent":
            if item.channel == "ads":
                counts.removed += item.action == "remove"
                counts.added += item.action != "remove"
            else:
                counts.sent += 1
        elif status == "skipped":
            counts.skipped_consent += 1
        elif status == "failed":
            counts.failed += 1
        elif status == "unknown":
            counts.unknown += 1

    halted_items = 0
    with session_scope(d.engine) as session:
        contacts = load_contacts(session, [i.customer_id for i in due], policy.default_timezone)
        recent = recent_messages(
            session, [i.customer_id for i in due], now=now, window=policy.frequency_window
        )
        templated: dict[str, list[_Due]] = defaultdict(list)
        quiet: dict[str, datetime | None] = {}  # by timezone: the same for every customer in it
        for item in due:
            counts = d.report.counts_for(item)
            if item.id in inactive:
                finish(item, "skipped", "enrollment no longer active", count=False)
                continue
            if item.channel in d.report.halted:
                halted_items += 1  # left due, untouched, until the channel works again
                continue
            contact = contacts.get(item.customer_id) or Contact(item.customer_id)
            if item.action != "remove":
                ok, why = contact.reachable(item.channel)
                if not ok:
                    finish(item, "skipped", why)
                    continue
            if item.channel in MESSAGE_CHANNELS:
                if contact.timezone not in quiet:
                    quiet[contact.timezone] = quiet_until(now, contact.timezone, policy)
                later = quiet[contact.timezone]
                capped = cap_until(recent[item.customer_id], now=now, policy=policy)
                wait_until = max(t for t in (later, capped) if t) if (later or capped) else None
                if wait_until is not None:
                    counts.postponed += 1
                    outcomes[item.id] = {
                        "status": "pending",
                        "next_attempt_at": wait_until,
                        "updated_at": now,
                        "error": "quiet hours" if later else "frequency cap",
                    }
                    continue
                recent[item.customer_id].append(now)  # counts against the cap for the rest of the batch
                templated[item.template or ""].append(item)
            elif item.channel == "ads":
                to_send.append((item, [_ads_message(item, contact, Message, AudienceMember)]))
            else:
                templated[item.template or ""].append(item)
        for template, items in templated.items():
            rendered = render_many(
                session, template, [i.customer_id for i in items], now=now, settings=d.settings
            )
            for item in items:
                result = rendered.get(item.customer_id)
                if isinstance(result, RenderError) or result is None:
                    finish(item, "failed", str(result or "not rendered"))
                    continue
                if result.channel != item.channel:  # definitions refuse this; a changed folder must not crash
                    finish(item, "failed", f"{template} is a {result.channel} template, not {item.channel}")
                    continue
                to_send.append((item, result.messages(item.dedupe_key)))
        _write_outcomes(session, outcomes)
        _insert_ignore(session, deliveries, fallbacks)
        _advance(session, resolved, now=now, report=d.report, walked=d.walked)

    # The claim: pending -> sending, committed before any connector is called.
    claimed: set[int] = set()
    with session_scope(d.engine) as session:
        sql = Driver(session)
        for chunk in chunked([item.id for item, _ in to_send]):
            among, params = sql.in_(chunk)
            # By id, not through the (status, next attempt) index: that walked every pending delivery.
            claimed.update(
                row[0]
                for row in sql.rows(
                    "UPDATE deliveries SET status = 'sending', attempts = attempts + 1, "
                    f"updated_at = {sql.mark} WHERE id {among} AND {sql.unindexed('status')} = 'pending' "
                    "RETURNING id",
                    [sql.ts(now), *params],
                )
            )
    to_send = [(item, messages) for item, messages in to_send if item.id in claimed]

    by_channel: dict[str, list[tuple[_Due, list[Any]]]] = defaultdict(list)
    for item, messages in to_send:
        by_channel[item.channel].append((item, messages))
    results_by_delivery: dict[int, list[Any]] = defaultdict(list)
    all_results: list[Any] = []
    for channel, entries in by_channel.items():
        connector = d.connector(channel)
        owner = {m.delivery_id: item for item, messages in entries for m in messages}
        report = send_batch(
            connector, [m for _, messages in entries for m in messages], policy=d.retry_policy, sleep=d.sleep
        )
        if report.halted:
            d.report.halted[channel] = report.halted
        for result in report.results:
            results_by_delivery[owner[result.delivery_id].id].append(result)
        all_results.extend(report.results)

    outcomes = {}
    fallbacks = []
    resolved = []
    written_back: list[dict[str, Any]] = []
    for item, messages in to_send:
        results = results_by_delivery[item.id]
        counts = d.report.counts_for(item)
        once = at_most_once(item.channel)
        sent = [r for r in results if r.status is Status.SENT]
        # The provider may have processed it: on an at-most-once channel it is never sent again.
        maybe = [r for r in results if r.status is Status.UNKNOWN or (once and r.ambiguous)]
        retry = [r for r in results if r.status is Status.RETRYABLE and r not in maybe]
        if sent:
            finish(item, "sent", None, provider_message_id=sent[0].provider_id, sent_at=now)
            written_back.append(_sent_event(item, messages[0], sent[0], now))
            d.report.sent.append((item.channel, item.customer_id, item.template or item.ad_audience or ""))
        elif maybe:
            finish(item, "unknown", maybe[0].reason or "the provider may have processed it; not resent")
        elif retry and item.channel in d.report.halted:
            # Nothing was accepted and the channel cannot send now: due again at once, the attempt not
            # counted, so the delivery goes out on the first tick after the cause is fixed.
            counts.retrying += 1
            outcomes[item.id] = {
                "status": "pending",
                "next_attempt_at": now,
                "attempts": item.attempts,
                "error": d.report.halted[item.channel],
                "updated_at": now,
            }
        elif retry and item.attempts + 1 < policy.max_attempts:
            counts.retrying += 1
            wait = max(
                retry[0].retry_after or 0.0, (policy.retry_backoff * (2**item.attempts)).total_seconds()
            )
            outcomes[item.id] = {
                "status": "pending",
                "next_attempt_at": now + timedelta(seconds=wait),
                "error": retry[0].reason,
                "updated_at": now,
            }
        else:
            reason = (retry or results)[0].reason if results else "no result"
            if retry:
                reason = f"gave up after {item.attempts + 1} attempts: {reason}"
            finish(item, "failed", reason)
    with session_scope(d.engine) as session:
        _write_outcomes(session, outcomes)
        _insert_ignore(session, deliveries, fallbacks)
        insert_rows(session, Event.__table__, written_back)
        _advance(session, resolved, now=now, report=d.report, walked=d.walked)
        apply_effects(session, all_results, now=now)
    d.report.written["deliveries"] += len(due) + len(fallbacks)
    d.report.written["events"] += len(written_back)
    return len(due) - halted_items


def _write_outcomes(session: Session, outcomes: Mapping[int, dict[str, Any]]) -> None:
    """Column updates per delivery id: one statement per set of columns updated."""
    by_shape: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
    for delivery_id, values in outcomes.items():
        shape = tuple(sorted(values))
        by_shape[shape].append((delivery_id, *(values[name] for name in shape)))
    sql = Driver(session)
    for shape, rows in by_shape.items():
        sql.update_many(Delivery.__table__, ("id",), shape, rows)


def _fallback_for(d: Dispatcher, item: _Due) -> dict[str, Any] | None:
    """The delivery on the fallback channel for a primary that could not be delivered, if the step has one."""
    if item.step_id.endswith(FALLBACK) or item.step_id.endswith(REMOVE):
        return None
    if item.campaign:
        campaign = d.campaigns.get(item.campaign)
        channel, template = (
            (campaign.fallback, fallback_template(campaign.fallback, campaign.template, None))
            if campaign and campaign.fallback
            else (None, None)
        )
    else:
        sequence = d.sequences.get(item.sequence or "")
        step = None
        if sequence is not None:
            try:
                step = sequence.steps[sequence.step_index(item.step_id)]
            except KeyError:
                step = None
        if not isinstance(step, SendStep) or not step.fallback:
            return None
        channel, template = step.fallback, step.fallback_template
    if not channel:
        return None
    return _delivery_row(
        key=f"{item.dedupe_key}{FALLBACK}",
        enrollment_id=item.enrollment_id,
        campaign=item.campaign,
        step_id=f"{item.step_id}{FALLBACK}",
        customer_id=item.customer_id,
        channel=channel,
        template=template,
        ad_audience=None,
        now=d.now,
        settings=d.settings,
    )


def _ads_message(item: _Due, contact: Contact, message_cls: Any, member_cls: Any) -> Any:
    return message_cls(
        delivery_id=item.dedupe_key,
        channel="ads",
        to=item.ad_audience or "",
        customer_id=item.customer_id,
        action=item.action or "add",
        member=member_cls(
            customer_id=item.customer_id,
            email=contact.email,
            phone=contact.phone,
            first_name=contact.first_name,
            last_name=contact.last_name,
        ),
    )


def _sent_event(item: _Due, message: Any, result: Any, now: datetime) -> dict[str, Any]:
    properties = {
        "delivery_id": item.dedupe_key,
        "step": item.step_id.split("/")[0],
        "provider_message_id": result.provider_id,
    }
    if item.sequence:
        properties["sequence"] = item.sequence
    if item.campaign:
        properties["campaign"] = item.campaign
    if item.template:
        properties["template"] = item.template
    if item.channel == "ads":
        properties.update(audience=item.ad_audience, action=item.action)
    if getattr(message, "subject", None):
        properties["subject"] = message.subject
    return {
        "message_id": f"omni:{item.dedupe_key}",
        "customer_id": item.customer_id,
        "type": "track",
        "name": SENT_EVENTS.get(item.channel, "Message Sent"),
        "channel": EVENT_CHANNELS.get(item.channel, "web"),
        "properties": properties,
        "context": {"library": {"name": "omni"}},
        "user_id": None,
        "anonymous_id": None,
        "occurred_at": now,
        "received_at": now,
    }


# --- the tick ----------------------------------------------------------------------------------------


def run_tick(
    engine: Engine,
    *,
    now: datetime,
    names: Sequence[str] | None = None,
    settings: Any = None,
    policy: DeliveryPolicy | None = None,
    retry_policy: Any = None,
    sleep: Callable[[float], None] = time_module.sleep,
    sequences: Mapping[str, SequenceDefinition] | None = None,
    campaigns: Mapping[str, CampaignDefinition] | None = None,
    build: bool = True,
    connectors: Mapping[str, Any] | None = None,
    stage: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> TickReport:
    """One tick of every sequence (or ``names``) at ``now``; see the module docstring.

    Args:
        sleep: how in-call retries wait (tests pass a no-op).
        sequences, campaigns: definitions (default: loaded from their folders).
        build: rebuild the trigger audiences first (default True).
        connectors: connectors to use by channel instead of the configured ones.
        stage: runs each stage (``stage(name, fn)``); the ``run_sequences`` flow makes each a Prefect
            task. Default: call it.
    """
    stage = stage or (lambda _name, fn: fn())
    from audiences import build_audiences, load_audiences
    from sequences.definitions import load_campaigns, load_sequences

    if settings is None:
        from omni.core.settings import get_settings

        settings = get_settings()
    policy = policy or DeliveryPolicy.from_settings(settings)
    audience_definitions = load_audiences()
    all_sequences = (
        dict(sequences) if sequences is not None else load_sequences(audiences=audience_definitions)
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
    _DEFINITIONS["sequences"] = all_sequences
    dispatcher = Dispatcher(
        engine=engine,
        now=now,
        policy=policy,
        sequences=all_sequences,
        campaigns=campaigns if campaigns is not None else load_campaigns(),
        report=report,
        settings=settings,
        retry_policy=retry_policy,
        sleep=sleep,
        connectors=dict(connectors or {}),
        walked=frozenset(selected),
    )
    try:
        with frozen_heap():
            _run_stages(
                engine,
                stage,
                dispatcher,
                selected,
                now=now,
                policy=policy,
                report=report,
                audience_definitions=audience_definitions,
                settings=settings,
            )
    finally:
        dispatcher.close()
        _DEFINITIONS.clear()
    return report


def _run_stages(
    engine: Engine,
    stage: Callable[[str, Callable[[], Any]], Any],
    dispatcher: Dispatcher,
    selected: Mapping[str, SequenceDefinition],
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    audience_definitions: Mapping[str, Any],
    settings: Any,
) -> None:
    """Steps 2 to 6 of a tick (see the module docstring), each through ``stage``."""

    def recover() -> None:
        with session_scope(engine) as session:
            recover_interrupted(session, now=now, policy=policy, report=report)

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
                .where(enrollments.c.sequence == name, enrollments.c.status == "active")
                .group_by(enrollments.c.step_index)
            ).all()
        }
        reasons = dict(
            session.execute(
                select(enrollments.c.exit_reason, func.count())
                .where(enrollments.c.sequence == name, enrollments.c.status == "exited")
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


__all__ = [
    "DeliveryHalted",
    "DeliveryPolicy",
    "Dispatcher",
    "SequenceReport",
    "StepCounts",
    "TickReport",
    "UnknownSequence",
    "run_tick",
    "sequence_status",
]
