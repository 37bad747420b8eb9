"""Enrollment: the customers who entered a sequence's trigger since the last tick join it, with one
``INSERT ... SELECT`` per sequence.

**Holdout**: a deterministic bucket of (customer, sequence), identical in SQL on SQLite and PostgreSQL
and in Python, so a held-out customer is held out on every run. Held-out customers are recorded with
status ``holdout`` and never messaged.

**Global control group** (:mod:`profiles.control`): a member is enrolled as held out too, with
``exit_reason`` ``global_control`` (a holdout never exits, so the reason stays), unless the sequence is a
service journey (``global_control: false``).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, func, literal, or_, select
from sqlalchemy.orm import Session

from omni.core.statuses import EnrollmentStatus
from profiles.bulk import dialect_insert
from profiles.control import GLOBAL_CONTROL, GlobalControl, in_control_sql
from profiles.db import refresh_statistics, stale_statistics
from profiles.models import AudienceMembership, Customer, Enrollment, Event
from sequences.definitions import SequenceDefinition
from sequences.reports import TickReport

HOLDOUT_MODULUS = 10_000
_PRIME = 1_000_003


def _salt(sequence: str) -> int:
    return int(hashlib.sha256(sequence.encode()).hexdigest()[:8], 16) % _PRIME


def holdout_bucket(customer_id: int, sequence: str) -> int:
    """0..9999, the same as :func:`holdout_bucket_sql` computes in the database."""
    return ((customer_id % _PRIME) * 7919 + _salt(sequence)) % HOLDOUT_MODULUS


def holdout_bucket_sql(customer_id: Any, sequence: str) -> ColumnElement:
    # Integer arithmetic only, kept below 2^63, so both databases agree with the Python above.
    return ((customer_id % _PRIME) * 7919 + literal(_salt(sequence))) % HOLDOUT_MODULUS


def is_held_out(customer_id: int, sequence: str, percent: float) -> bool:
    return holdout_bucket(customer_id, sequence) < round(percent * HOLDOUT_MODULUS / 100)


def enroll(
    session: Session,
    sequence: SequenceDefinition,
    *,
    now: datetime,
    report: TickReport,
    control: GlobalControl | None = None,
) -> None:
    """Enroll the sequence's new entrants at ``now`` (active, or held out: the sequence's holdout or the
    global ``control`` group), each once."""
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
    previous = [
        enrollments.c.status == EnrollmentStatus.ACTIVE.value,
        enrollments.c.enrolled_at >= entrants.c.since,
    ]
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
    held = holdout_bucket_sql(entrants.c.customer_id, sequence.name) < threshold if threshold else false()
    if control is not None and control.enabled and sequence.global_control:
        controlled = in_control_sql(entrants.c.customer_id, control)
        held = and_(held, ~controlled)
    else:
        controlled = None
    enrolled = 0
    groups = [(EnrollmentStatus.HOLDOUT, None, held)] if threshold else []
    if controlled is not None:
        groups.append((EnrollmentStatus.HOLDOUT, GLOBAL_CONTROL, controlled))
    not_active = [condition for _, _, condition in groups]
    groups.append((EnrollmentStatus.ACTIVE, None, ~or_(*not_active) if not_active else literal(True)))
    for status, reason, condition in groups:
        active = status is EnrollmentStatus.ACTIVE
        chosen = select(
            literal(sequence.name),
            entrants.c.customer_id,
            literal(status.value),
            literal(0),
            literal(now if active else None, type_=enrollments.c.next_run_at.type),
            literal(now, type_=enrollments.c.enrolled_at.type),
            literal(now, type_=enrollments.c.updated_at.type),
            literal(reason, type_=enrollments.c.exit_reason.type),
        ).where(~already, condition)
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
                    "exit_reason",
                ],
                chosen,
            )
            .on_conflict_do_nothing()
            .returning(enrollments.c.id)
        ).all()
        enrolled += len(created)
        report.written["enrollments"] += len(created)
        counts = report.sequences[sequence.name]
        if active:
            counts.enrolled += len(created)
        else:
            counts.held_out += len(created)
    # A first tick after a bulk load enrolls everyone into a table whose statistics say it is empty, and
    # the exits, the walk and the dispatch of this very tick plan on them: refresh them now, not at the
    # end of the tick (nothing relies on autovacuum, which may be off).
    stale = stale_statistics(session, {"enrollments": enrolled})
    if stale:
        refresh_statistics(session, stale)
