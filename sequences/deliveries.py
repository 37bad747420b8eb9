"""The ``deliveries`` table: the rows steps and campaigns create, and what becomes of each.

A delivery is unique by its ``dedupe_key`` (per enrollment and step, or per campaign and customer), so
a step walked twice never sends twice. It is created ``pending``; the dispatcher **claims** it
(``pending`` → ``sending``, committed) before any connector is called, then records its outcome
(``DeliveryStatus``). Once it is resolved, the enrollment parked at its step moves on (:func:`advance`).
A delivery left ``sending`` by an interrupted tick is recovered by :func:`recover_interrupted`.

Step ids: a fallback's is its step's id + ``/fallback``, an ad-audience removal's + ``/remove``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, literal, literal_column, select, tuple_, update
from sqlalchemy.orm import Session

from connectors import provider_for
from omni.core.batching import chunked
from omni.core.channels import at_most_once, spec
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.models import Delivery, Enrollment
from sequences.definitions import SequenceDefinition, WaitStep
from sequences.gate import DeliveryPolicy
from sequences.sql import Driver

if TYPE_CHECKING:  # reports count per step with step_of, below
    from sequences.reports import TickReport

FALLBACK_SUFFIX = "/fallback"
REMOVAL_SUFFIX = "/remove"
# The action of an ad-audience sync.
ADD = "add"
REMOVE = "remove"

# A resolved delivery: (enrollment id, step id, sequence name or None when the caller does not know it).
Resolved = tuple[int | None, str, str | None]


def step_of(step_id: str) -> str:
    """The id of the send step a delivery belongs to (a fallback's or a removal's carries a suffix)."""
    return step_id.split("/")[0]


def provider_of(channel: str, settings: Settings) -> str:
    """The provider configured for ``channel`` (recorded on the delivery)."""
    try:
        return provider_for(channel, settings)
    except Exception:  # noqa: BLE001 - recorded only; the dispatcher reports a bad setting properly
        return "unknown"


def new_delivery(
    *,
    key: str,
    enrollment_id: int | None,
    campaign: str | None,
    step_id: str,
    customer_id: int,
    channel: str,
    connector: str,
    now: datetime,
    template: str | None = None,
    ad_audience: str | None = None,
    action: str | None = None,
) -> dict[str, Any]:
    """A ``pending`` delivery due at ``now``; an ad-audience sync adds the customer unless ``action``
    says otherwise."""
    facts = spec(channel)
    if facts.delivery == "audience" and action is None:
        action = ADD
    return {
        "dedupe_key": key,
        "enrollment_id": enrollment_id,
        "campaign": campaign,
        "step_id": step_id,
        "customer_id": customer_id,
        "channel": channel,
        "connector": connector,
        "template": template,
        "ad_audience": ad_audience,
        "action": action,
        "status": DeliveryStatus.PENDING.value,
        "attempts": 0,
        # What counts against the frequency cap: marketing to the customer. Neither a webhook (to another
        # system) nor taking the customer out of an ad audience is.
        "marketing": facts.marketing and action != REMOVE,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


def keyset_after(at_column: Any, id_column: Any, after: tuple[datetime, int] | None) -> Any:
    """Rows after ``after`` in (time, id) order: the keyset condition of a batched walk. Each row is
    visited at most once per walk, and the query stays the same size whatever the number of rows already
    walked (a NOT IN of every id seen grew with each batch: quadratic, and over PostgreSQL's 65,535 bind
    parameters past ~65,000 rows).

    Written as a row comparison, ``(time, id) > (at, id)``: on an index ending in ``(time, id)``
    (``ix_deliveries_due``, ``ix_enrollments_due``) PostgreSQL starts the scan right after the last row
    read, in order, and stops at the batch's size; an ``OR`` of the two cases bounded the scan by the time
    alone, so each batch read (and sorted) every row still due at that time."""
    if after is None:
        return literal(True)
    at, row_id = after
    return tuple_(at_column, id_column) > tuple_(
        bindparam(None, at, type_=at_column.type), bindparam(None, row_id, type_=id_column.type)
    )


def status_is(column: Any, status: str) -> Any:
    """``column = 'status'`` with the status written into the SQL, not bound: the planner then knows it
    when it plans, and can use the partial indexes on a status (``ix_deliveries_due``,
    ``ix_deliveries_sending``) in every plan, a prepared statement's generic plan included."""
    return column == literal_column(f"'{DeliveryStatus(status).value}'")


def sequence_names(session: Session, enrollment_ids: Iterable[int]) -> dict[int, str]:
    """enrollment id -> its sequence's name."""
    table = Enrollment.__table__
    names: dict[int, str] = {}
    for chunk in chunked(sorted(set(enrollment_ids))):
        names.update(session.execute(select(table.c.id, table.c.sequence).where(table.c.id.in_(chunk))).all())
    return names


def insert_new(session: Session, rows: list[dict[str, Any]]) -> int:
    """INSERT new deliveries, skipping those whose ``dedupe_key`` exists; returns how many were inserted."""
    return Driver(session).insert_ignore(Delivery.__table__, rows)


def write_outcomes(session: Session, outcomes: Mapping[int, dict[str, Any]]) -> None:
    """Column updates per delivery id: one statement per set of columns updated."""
    by_shape: dict[tuple[str, ...], list[tuple[Any, ...]]] = defaultdict(list)
    for delivery_id, values in outcomes.items():
        shape = tuple(sorted(values))
        by_shape[shape].append((delivery_id, *(values[name] for name in shape)))
    sql = Driver(session)
    for shape, rows in by_shape.items():
        sql.update_many(Delivery.__table__, ("id",), shape, rows)


def claim(session: Session, delivery_ids: Iterable[int], *, now: datetime) -> set[int]:
    """``pending`` → ``sending`` (one more attempt) for those of ``delivery_ids`` still pending; returns
    the ids claimed. Commit before calling a connector: a concurrent tick then finds them taken."""
    sql = Driver(session)
    claimed: set[int] = set()
    for chunk in chunked(list(delivery_ids)):
        among, params = sql.in_(chunk)
        # By id, not through the (status, next attempt) index: that walked every pending delivery.
        claimed.update(
            row[0]
            for row in sql.rows(
                f"UPDATE deliveries SET status = '{DeliveryStatus.SENDING}', attempts = attempts + 1, "
                f"updated_at = {sql.mark} WHERE id {among} "
                f"AND {sql.unindexed('status')} = '{DeliveryStatus.PENDING}' RETURNING id",
                [sql.ts(now), *params],
            )
        )
    return claimed


def advance(
    session: Session,
    resolved: Iterable[Resolved],
    *,
    sequences: Mapping[str, SequenceDefinition],
    now: datetime,
    report: TickReport | None = None,
    walked: Collection[str] = (),
) -> None:
    """Move enrollments past the send step a resolved delivery belonged to (idempotent).

    An enrollment of a sequence in ``walked`` (one this tick walks again before anything else happens to
    it) goes on at once when its next step needs nothing but the definition, exactly as the walk would
    take it: past the last step it completes (counted in ``report``); before a wait of a fixed duration
    it waits from now. That saves the walk a read and a write per enrollment. Anything else is left due
    now for the walk. Either way only an enrollment still parked at that step moves.

    Args:
        sequences: the definitions of the tick (an enrollment of a sequence not among them stays).
    """
    pairs = {(e, s): q for e, s, q in resolved if e is not None and not s.endswith(REMOVAL_SUFFIX)}
    if not pairs:
        return
    unknown = [e for (e, _), q in pairs.items() if q is None]
    sequences_by_id = sequence_names(session, unknown) if unknown else {}
    moved: list[tuple[Any, ...]] = []  # (id, parked at, next step, next run, updated)
    completed: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for (enrollment_id, step_id), name in pairs.items():
        sequence = sequences.get(name or sequences_by_id.get(enrollment_id, ""))
        if sequence is None:
            continue
        try:
            index = sequence.step_index(step_of(step_id))
        except KeyError:
            continue
        following = sequence.steps[index + 1] if index + 1 < len(sequence.steps) else None
        if sequence.name not in walked:
            moved.append((enrollment_id, index, index + 1, now, now))
        elif following is None:
            completed[sequence.name].append(
                (enrollment_id, index, index + 1, EnrollmentStatus.COMPLETED.value, None, now)
            )
        elif isinstance(following, WaitStep) and following.duration and following.duration > timedelta(0):
            moved.append((enrollment_id, index, index + 2, now + following.duration, now))
        else:
            moved.append((enrollment_id, index, index + 1, now, now))
    sql = Driver(session)
    parked = f"status = '{EnrollmentStatus.ACTIVE}' AND next_run_at IS NULL"
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


def recover_interrupted(
    session: Session,
    *,
    now: datetime,
    policy: DeliveryPolicy,
    report: TickReport,
    sequences: Mapping[str, SequenceDefinition],
) -> None:
    """Deliveries left ``sending`` longer than ``policy.sending_timeout`` by an interrupted tick: on an
    at-most-once channel (email, SMS, push) they become ``unknown`` and are never resent, and their
    enrollments go on; on an at-least-once channel (ad audiences, webhooks) they are due again."""
    deliveries = Delivery.__table__
    stale = and_(
        status_is(deliveries.c.status, DeliveryStatus.SENDING),
        deliveries.c.updated_at < now - policy.sending_timeout,
    )
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
    once = [r for r in rows if at_most_once(r.channel)]
    again = [r.id for r in rows if not at_most_once(r.channel)]
    if once:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_([r.id for r in once]))
            .values(
                status=DeliveryStatus.UNKNOWN.value,
                updated_at=now,
                error="interrupted while sending; not resent (at most once)",
            )
        )
    if again:
        session.execute(
            update(deliveries)
            .where(deliveries.c.id.in_(again))
            .values(status=DeliveryStatus.PENDING.value, next_attempt_at=now, updated_at=now)
        )
    names = sequence_names(session, [r.enrollment_id for r in once if r.enrollment_id])
    for row in once:
        sequence = names.get(row.enrollment_id) if row.enrollment_id else None
        report.counts_for(campaign=row.campaign, sequence=sequence, step_id=row.step_id).unknown += 1
    advance(
        session,
        [(r.enrollment_id, r.step_id, names.get(r.enrollment_id)) for r in once if r.enrollment_id],
        sequences=sequences,
        now=now,
    )
