"""Exits: active enrollments whose exit rule holds leave the sequence, with the reason recorded.

The rules: the sequence's exit event (on any channel, after enrollment, with its property filters),
leaving the trigger audience, and the customer merged into another. An enrollment that exits has its
pending deliveries dropped (``skipped``) and is queued for removal from every ad audience the sequence
may have added it to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import SEND_CHANNELS, spec
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.models import AudienceMembership, Customer, Enrollment, Event
from sequences.definitions import SequenceDefinition
from sequences.deliveries import ADD, REMOVAL_SUFFIX, REMOVE, insert_new, new_delivery, provider_of
from sequences.reports import TickReport
from sequences.sql import Driver

AUDIENCE_CHANNELS = tuple(channel for channel in SEND_CHANNELS if spec(channel).delivery == "audience")


def exit_enrollments(
    session: Session, sequence: SequenceDefinition, *, now: datetime, report: TickReport, settings: Settings
) -> None:
    """Exit the sequence's active enrollments whose exit rule holds at ``now``."""
    enrollments = Enrollment.__table__
    active = and_(
        enrollments.c.sequence == sequence.name, enrollments.c.status == EnrollmentStatus.ACTIVE.value
    )
    exited: list[int] = []
    for reason, rule in _exit_rules(sequence, now=now):
        ids = list(session.execute(select(enrollments.c.id).where(active, rule)).scalars())
        for chunk in chunked(ids):
            session.execute(
                update(enrollments)
                .where(enrollments.c.id.in_(chunk), enrollments.c.status == EnrollmentStatus.ACTIVE.value)
                .values(
                    status=EnrollmentStatus.EXITED.value,
                    exited_at=now,
                    exit_reason=reason,
                    next_run_at=None,
                    updated_at=now,
                )
            )
        report.sequences[sequence.name].exited += len(ids)
        report.written["enrollments"] += len(ids)
        if ids:
            report.sequences[sequence.name].exit_reasons[reason] += len(ids)
        exited.extend(ids)
    if exited:
        _drop_deliveries(session, exited, now=now, settings=settings)


def _exit_rules(sequence: SequenceDefinition, *, now: datetime) -> list[tuple[str, Any]]:
    """(reason, SQL condition on an enrollment) of each way out of ``sequence``."""
    enrollments = Enrollment.__table__
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
    customers = Customer.__table__
    rules.append(
        (
            "customer merged into another",
            exists().where(customers.c.id == enrollments.c.customer_id, customers.c.merged_into.is_not(None)),
        )
    )
    return rules


def _drop_deliveries(session: Session, exited: list[int], *, now: datetime, settings: Settings) -> None:
    """Skip the exited enrollments' pending deliveries; take them out of every ad audience they may have
    been added to."""
    sql = Driver(session)
    status = sql.unindexed("status")  # look the enrollments up, not every delivery with that status
    audience_channels = ", ".join(f"'{channel}'" for channel in AUDIENCE_CHANNELS)
    may_have_gone_out = ", ".join(f"'{value}'" for value in DeliveryStatus.counted())
    for chunk in chunked(exited):
        among, params = sql.in_(chunk)
        sql.execute(
            f"UPDATE deliveries SET status = '{DeliveryStatus.SKIPPED}', error = 'enrollment exited', "
            f"updated_at = {sql.mark} WHERE enrollment_id {among} AND {status} = '{DeliveryStatus.PENDING}'",
            [sql.ts(now), *params],
        )
        added = sql.rows(
            "SELECT dedupe_key, enrollment_id, step_id, customer_id, channel, ad_audience FROM deliveries "
            f"WHERE enrollment_id {among} AND channel IN ({audience_channels}) AND action = '{ADD}' "
            f"AND {status} IN ({may_have_gone_out}) ORDER BY id",
            params,
        )
        insert_new(
            session,
            [
                new_delivery(
                    key=f"{row.dedupe_key}{REMOVAL_SUFFIX}",
                    enrollment_id=row.enrollment_id,
                    campaign=None,
                    step_id=f"{row.step_id}{REMOVAL_SUFFIX}",
                    customer_id=row.customer_id,
                    channel=row.channel,
                    connector=provider_of(row.channel, settings),
                    ad_audience=row.ad_audience,
                    action=REMOVE,
                    now=now,
                )
                for row in added
            ],
        )
