"""Dispatch: the one way every message goes out, of sequences and campaigns alike.

:func:`dispatch_due` takes due ``pending`` deliveries a batch at a time; each batch
(:func:`_dispatch_batch`) goes through these steps:

1. the connectors of its channels are built, so a misconfigured channel fails before anything is claimed;
2. **the gate** (:mod:`sequences.gate`): a delivery whose enrollment is no longer active is dropped, one
   to an unreachable customer is skipped (to the step's ``fallback`` channel when it has one), and quiet
   hours and the frequency cap postpone;
3. **rendering** (:mod:`sequences.contexts`) of what passed, a template at a time;
4. **the claim**: ``pending`` → ``sending``, committed (with what the gate decided, in the transaction
   that read the batch) before any connector is called, so two ticks never send the same delivery;
5. **sending**, a channel at a time, through the one retry policy (``connectors.send_batch``);
6. **recording**, in one transaction: ``sent`` (and the ``… Sent`` event on the customer's timeline, and
   the outbox connector's rows), ``unknown`` (never resent), retried on a later tick with backoff up to
   ``delivery_attempts``, or ``failed`` (to the fallback channel when the step has one); the providers'
   effects are applied and the enrollments move on.

On PostgreSQL the recording of a batch whose deliveries all ended ``sent`` or ``unknown`` (what the
store already counts a claimed delivery as), with no provider effects, runs in a thread of its own
(:class:`_Recorder`) while the next batch is read, gated and rendered: the server writes one batch while
this process renders the next. Nothing of the next batch is committed or sent before that recording
is in (the claim waits for it), a batch sharing an enrollment with the one being recorded is read again
after it, and :func:`dispatch_due` returns only once everything is recorded. Any other batch (a
failure, a fallback, a retry, an opt-out from the provider), and every batch on SQLite, is recorded
before the next one is read, as the rest of the dispatcher expects.
"""

from __future__ import annotations

import time as time_module
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, literal, select
from sqlalchemy.orm import Session

from connectors import (
    AudienceMember,
    Connector,
    Message,
    Result,
    RetryPolicy,
    Status,
    get_connector,
    send_batch,
)
from omni.core.channels import SENT_EVENTS, SENT_TOUCHPOINTS, at_most_once, spec
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.bulk import insert_rows
from profiles.db import session_scope
from profiles.models import Delivery, Enrollment, Event
from profiles.outbox import OutboxRecorder
from sequences.contexts import messages_of, render_many
from sequences.definitions import CampaignDefinition, SendStep, SequenceDefinition, fallback_template
from sequences.deliveries import (
    ADD,
    FALLBACK_SUFFIX,
    REMOVAL_SUFFIX,
    REMOVE,
    Resolved,
    advance,
    claim,
    insert_new,
    keyset_after,
    new_delivery,
    provider_of,
    status_is,
    step_of,
    write_outcomes,
)
from sequences.effects import apply_effects
from sequences.gate import Contact, DeliveryPolicy, Gate
from sequences.pipeline import WriteBehind
from sequences.reports import StepCounts, TickReport
from sequences.shards import Shard
from templates.rendering import RenderError


@dataclass
class Dispatcher:
    """Sends due deliveries; built once per tick (or campaign send) with the definitions it runs on."""

    engine: Engine
    now: datetime
    settings: Settings
    policy: DeliveryPolicy
    sequences: Mapping[str, SequenceDefinition]
    campaigns: Mapping[str, CampaignDefinition]
    report: TickReport
    retry_policy: RetryPolicy | None = None
    sleep: Callable[[float], None] = time_module.sleep
    connectors: dict[str, Connector] = field(default_factory=dict)
    # Sequences whose enrollments this tick walks right after dispatching (see deliveries.advance).
    walked: frozenset[str] = frozenset()
    # Where the outbox connector records, sent at ``now``.
    outbox: OutboxRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.outbox = OutboxRecorder(self.engine, clock=lambda: self.now)
        # On PostgreSQL the outbox rows of a batch are written where its outcomes are (see _record_batch).
        self.outbox.stage()

    def connector(self, channel: str) -> Connector:
        if channel not in self.connectors:
            self.connectors[channel] = get_connector(channel, self.settings, outbox=self.outbox)
        return self.connectors[channel]

    def close(self) -> None:
        for connector in self.connectors.values():
            connector.close()


@dataclass(slots=True)
class _Due:
    """A due delivery, as :func:`dispatch_due` reads it."""

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
    sequence: str | None


# The columns of a due delivery read from ``deliveries``: the fields of :class:`_Due` up to its sequence.
_DELIVERY_COLUMNS = (
    "id",
    "dedupe_key",
    "enrollment_id",
    "campaign",
    "step_id",
    "customer_id",
    "channel",
    "template",
    "ad_audience",
    "action",
    "attempts",
)


def dispatch_due(dispatcher: Dispatcher, *, campaign: str | None = None, shard: Shard | None = None) -> int:
    """Send every due pending delivery (or only ``campaign``'s, or only those of ``shard``'s customers), a
    batch at a time; returns how many were resolved or postponed."""
    moved = 0
    after: tuple[datetime, int] | None = None
    with _Recorder(dispatcher) as recorder:
        while True:
            with session_scope(dispatcher.engine) as session:
                query = due_batch(
                    now=dispatcher.now,
                    after=after,
                    limit=dispatcher.policy.batch_size,
                    campaign=campaign,
                    shard=shard,
                )
                rows = session.execute(query).all()
                if recorder.recording_any(row.enrollment_id for row in rows):
                    # Their enrollments may move on in the batch being recorded: read them once it is in.
                    recorder.wait()
                    rows = session.execute(query).all()
                if not rows:
                    return moved
                after = (rows[-1].next_attempt_at, rows[-1].id)
                moved += _dispatch_batch(dispatcher, session, rows, recorder)


def due_batch(
    *,
    now: datetime,
    after: tuple[datetime, int] | None,
    limit: int,
    campaign: str | None = None,
    shard: Shard | None = None,
) -> Select:
    """The next ``limit`` pending deliveries due at ``now`` (of ``campaign``, of ``shard``'s customers, when
    given) after ``after`` in (due time, id) order, each with its enrollment's sequence and status: a
    batch of :func:`dispatch_due`.

    The batch is picked from ``deliveries`` alone, along ``ix_deliveries_due`` (the pending ones in that
    order): the scan starts after the previous batch and stops at the batch's size. Only then are its
    rows joined to ``enrollments``: joined first, every delivery still due was looked up in
    ``enrollments`` (and sorted) for each batch, quadratic in the deliveries of a tick."""
    deliveries = Delivery.__table__
    enrollments = Enrollment.__table__
    due = (
        select(*(deliveries.c[name] for name in _DELIVERY_COLUMNS), deliveries.c.next_attempt_at)
        .where(
            status_is(deliveries.c.status, DeliveryStatus.PENDING),
            deliveries.c.next_attempt_at <= now,
            keyset_after(deliveries.c.next_attempt_at, deliveries.c.id, after),
            deliveries.c.campaign == campaign if campaign else literal(True),
            shard.owns(deliveries.c.customer_id) if shard else literal(True),
        )
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
        .limit(limit)
        .subquery("due")
    )
    return (
        select(
            *(due.c[name] for name in _DELIVERY_COLUMNS),
            enrollments.c.sequence,
            enrollments.c.status.label("enrollment_status"),
            due.c.next_attempt_at,
        )
        .select_from(due.outerjoin(enrollments, enrollments.c.id == due.c.enrollment_id))
        .order_by(due.c.next_attempt_at, due.c.id)
    )


@dataclass
class _Outcomes:
    """What one step of a batch decided about its deliveries, written together (:meth:`write`)."""

    dispatcher: Dispatcher
    updates: dict[int, dict[str, Any]] = field(default_factory=dict)  # delivery id -> column updates
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # new deliveries on a fallback channel
    resolved: list[Resolved] = field(default_factory=list)

    def counts(self, item: _Due) -> StepCounts:
        return self.dispatcher.report.counts_for(
            campaign=item.campaign, sequence=item.sequence, step_id=item.step_id
        )

    def finish(
        self,
        item: _Due,
        status: DeliveryStatus,
        error: str | None = None,
        *,
        count: bool = True,
        **extra: Any,
    ) -> None:
        """Record a delivery's final outcome. The step's counts learn the customer's outcome once: a
        delivery that moves to the fallback channel counts as ``fell_back`` and the fallback's own outcome
        is the customer's."""
        self.updates[item.id] = {
            "status": status.value,
            "error": error,
            "updated_at": self.dispatcher.now,
            **extra,
        }
        counts = self.counts(item)
        fallback = (
            _fallback_for(self.dispatcher, item)
            if status in (DeliveryStatus.FAILED, DeliveryStatus.SKIPPED)
            else None
        )
        if fallback is not None:
            self.fallbacks.append(fallback)
            counts.fell_back += count
            return
        self.resolved.append((item.enrollment_id, item.step_id, item.sequence))
        if not count:
            return
        if status is DeliveryStatus.SENT:
            if spec(item.channel).delivery == "audience":
                counts.removed += item.action == REMOVE
                counts.added += item.action != REMOVE
            else:
                counts.sent += 1
        elif status is DeliveryStatus.SKIPPED:
            counts.skipped_consent += 1
        elif status is DeliveryStatus.FAILED:
            counts.failed += 1
        elif status is DeliveryStatus.UNKNOWN:
            counts.unknown += 1

    def postpone(self, item: _Due, until: datetime, reason: str) -> None:
        """Due again at ``until`` (quiet hours, the frequency cap): not an attempt."""
        self.counts(item).postponed += 1
        self._due_again(item, until, reason)

    def retry_later(
        self, item: _Due, at: datetime, reason: str | None, *, attempts: int | None = None
    ) -> None:
        """Due again at ``at`` after the provider could not take it now; ``attempts``: what the delivery's
        attempts are set back to (the claim counted one) when this one does not count."""
        self.counts(item).retrying += 1
        self._due_again(item, at, reason)
        if attempts is not None:
            self.updates[item.id]["attempts"] = attempts

    def _due_again(self, item: _Due, at: datetime, reason: str | None) -> None:
        self.updates[item.id] = {
            "status": DeliveryStatus.PENDING.value,
            "next_attempt_at": at,
            "error": reason,
            "updated_at": self.dispatcher.now,
        }

    def write(self, session: Session, report: TickReport) -> None:
        """Write the outcomes; enrollments completed are counted in ``report``."""
        write_outcomes(session, self.updates)
        insert_new(session, self.fallbacks)
        d = self.dispatcher
        advance(session, self.resolved, sequences=d.sequences, now=d.now, report=report, walked=d.walked)

    def only_counted(self) -> bool:
        """Whether every outcome is one the store already counted its claimed delivery as (``sent`` or
        ``unknown``: against the frequency cap, from ``now``), with no new delivery to create: then the
        next batch reads the same from the store before these outcomes are written as after."""
        counted = (DeliveryStatus.SENT.value, DeliveryStatus.UNKNOWN.value)
        return not self.fallbacks and all(u["status"] in counted for u in self.updates.values())


class _Recorder(WriteBehind):
    """Records each batch's results (:func:`_record_batch`); on PostgreSQL a batch that allows it (see the
    module docstring) behind the reading and rendering of the next."""

    def __init__(self, d: Dispatcher) -> None:
        super().__init__(d.engine, d.report, name="record")
        self.d = d
        self.enrollments: set[int] = set()  # of the batch being recorded

    def recording_any(self, enrollment_ids: Iterable[int | None]) -> bool:
        """Whether the batch being recorded moves any of these enrollments on."""
        return self.busy and not self.enrollments.isdisjoint(enrollment_ids)

    def record(self, outcomes: _Outcomes, events: list[dict[str, Any]], results: list[Result]) -> None:
        """Record a batch: behind the next one when its outcomes change nothing the next batch reads
        (:meth:`_Outcomes.only_counted`, no provider effects), else now."""
        self.wait()
        behind = outcomes.only_counted() and not any(r.effects for r in results)
        self.enrollments = {e for e, _, _ in outcomes.resolved if e is not None} if behind else set()
        outbox = self.d.outbox.take_staged()
        self.write(_record_batch, self.d, outcomes, events, results, outbox, behind=behind)


def _record_batch(
    d: Dispatcher,
    outcomes: _Outcomes,
    events: list[dict[str, Any]],
    results: list[Result],
    outbox: list[Mapping[str, Any]],
    report: TickReport,
) -> TickReport:
    """A batch's results in one transaction: the outbox rows staged for it, the deliveries' outcomes, the
    enrollments moved on (completions counted in ``report``), the ``… Sent`` events and the providers'
    effects. Returns ``report``."""
    with session_scope(d.engine) as session:
        d.outbox.write_staged(session, outbox)
        outcomes.write(session, report)
        insert_rows(session, Event.__table__, events)
        apply_effects(session, results, now=d.now)
    return report


def _dispatch_batch(d: Dispatcher, session: Session, rows: Sequence[Any], recorder: _Recorder) -> int:
    """One batch, read in ``session``, through the gate, rendering, the claim (committed in ``session``'s
    transaction), the connectors and the recording (see the module's docstring); returns how many
    deliveries were resolved or postponed."""
    # The query's columns, in order: id ... attempts, sequence, enrollment status, next attempt.
    due = [_Due(*row[:12]) for row in rows]
    inactive = {
        row.id
        for row in rows
        if row.enrollment_id and row.enrollment_status != EnrollmentStatus.ACTIVE and row.action != REMOVE
    }
    # Deliveries of a halted channel are left due, untouched, until the channel works again.
    halted = {item.id for item in due if item.id not in inactive and item.channel in d.report.halted}
    # Connectors first: a misconfigured channel fails here, before anything is claimed.
    for item in due:
        if item.id not in inactive and item.id not in halted:
            d.connector(item.channel)

    gated = _Outcomes(d)
    passed = _gate(d, session, [item for item in due if item.id not in halted], inactive, gated)
    ready = _render(d, session, passed, gated)
    recorder.wait()  # nothing more is committed, nor sent, before the batch before is recorded
    gated.write(session, d.report)
    to_send = _claim(session, ready, now=d.now)
    session.commit()  # the claims, before any connector is called
    results = _send(d, to_send)
    recorded = _Outcomes(d)
    events = _record(d, to_send, results, recorded)
    d.report.written["deliveries"] += len(due) + len(gated.fallbacks) + len(recorded.fallbacks)
    d.report.written["events"] += len(events)
    recorder.record(recorded, events, [r for found in results.values() for r in found])
    return len(due) - len(halted)


def _gate(
    d: Dispatcher, session: Session, due: list[_Due], inactive: set[int], outcomes: _Outcomes
) -> list[tuple[_Due, list[Message] | None]]:
    """The deliveries that may go now: ad-audience syncs with their message, the others to render
    (``None``). The rest are skipped or postponed in ``outcomes``."""
    gate = Gate.load(
        session,
        [item.customer_id for item in due],
        {item.channel for item in due},
        now=d.now,
        policy=d.policy,
    )
    passed: list[tuple[_Due, list[Message] | None]] = []
    for item in due:
        if item.id in inactive:
            outcomes.finish(item, DeliveryStatus.SKIPPED, "enrollment no longer active", count=False)
            continue
        # Taking a customer out of an ad audience needs neither consent nor an address.
        why = gate.unreachable(item.customer_id, item.channel) if item.action != REMOVE else None
        if why is not None:
            outcomes.finish(item, DeliveryStatus.SKIPPED, why)
            continue
        held = gate.hold(item.customer_id, item.channel)
        if held is not None:
            outcomes.postpone(item, *held)
            continue
        if spec(item.channel).delivery == "audience":
            passed.append((item, [_audience_message(item, gate.contacts.get(item.customer_id))]))
        else:
            passed.append((item, None))
    return passed


def _render(
    d: Dispatcher, session: Session, passed: list[tuple[_Due, list[Message] | None]], outcomes: _Outcomes
) -> list[tuple[_Due, list[Message]]]:
    """The messages of each delivery that passed the gate, rendered a template at a time; a delivery
    that cannot be rendered fails in ``outcomes``."""
    ready = [(item, messages) for item, messages in passed if messages is not None]
    templated: dict[str, list[_Due]] = defaultdict(list)
    for item, messages in passed:
        if messages is None:
            templated[item.template or ""].append(item)
    for template, items in templated.items():
        rendered = render_many(
            session, template, [item.customer_id for item in items], now=d.now, settings=d.settings
        )
        for item in items:
            result = rendered.get(item.customer_id)
            if isinstance(result, RenderError) or result is None:
                outcomes.finish(item, DeliveryStatus.FAILED, str(result or "not rendered"))
            elif result.channel != item.channel:  # definitions refuse this; a changed folder must not crash
                error = f"{template} is a {result.channel} template, not {item.channel}"
                outcomes.finish(item, DeliveryStatus.FAILED, error)
            else:
                ready.append((item, messages_of(result, item.dedupe_key)))
    return ready


def _claim(
    session: Session, ready: list[tuple[_Due, list[Message]]], *, now: datetime
) -> list[tuple[_Due, list[Message]]]:
    """The deliveries this tick claims (``pending`` → ``sending``; the caller commits before sending);
    another tick may have taken the others."""
    claimed = claim(session, [item.id for item, _ in ready], now=now)
    return [(item, messages) for item, messages in ready if item.id in claimed]


def _send(d: Dispatcher, to_send: list[tuple[_Due, list[Message]]]) -> dict[int, list[Result]]:
    """Each delivery's results, a channel at a time through ``send_batch``; a channel that cannot send at
    all is noted in ``report.halted``."""
    by_channel: dict[str, list[tuple[_Due, list[Message]]]] = defaultdict(list)
    for item, messages in to_send:
        by_channel[item.channel].append((item, messages))
    results: dict[int, list[Result]] = defaultdict(list)
    for channel, entries in by_channel.items():
        owner = {message.delivery_id: item for item, messages in entries for message in messages}
        sent = send_batch(
            d.connector(channel),
            [message for _, messages in entries for message in messages],
            policy=d.retry_policy,
            sleep=d.sleep,
        )
        if sent.halted:
            d.report.halted[channel] = sent.halted
        for result in sent.results:
            results[owner[result.delivery_id].id].append(result)
    return results


def _record(
    d: Dispatcher,
    to_send: list[tuple[_Due, list[Message]]],
    results: Mapping[int, list[Result]],
    outcomes: _Outcomes,
) -> list[dict[str, Any]]:
    """Each sent delivery's outcome in ``outcomes``; returns the ``… Sent`` events to write."""
    now = d.now
    events: list[dict[str, Any]] = []
    for item, messages in to_send:
        found = results.get(item.id, [])
        once = at_most_once(item.channel)
        sent = [r for r in found if r.status is Status.SENT]
        # The provider may have processed it: on an at-most-once channel it is never sent again.
        maybe = [r for r in found if r.status is Status.UNKNOWN or (once and r.ambiguous)]
        retry = [r for r in found if r.status is Status.RETRYABLE and r not in maybe]
        if sent:
            outcomes.finish(item, DeliveryStatus.SENT, provider_message_id=sent[0].provider_id, sent_at=now)
            events.append(_sent_event(item, messages[0], sent[0], now))
            d.report.sent.append((item.channel, item.customer_id, item.template or item.ad_audience or ""))
        elif maybe:
            reason = maybe[0].reason or "the provider may have processed it; not resent"
            outcomes.finish(item, DeliveryStatus.UNKNOWN, reason)
        elif retry and item.channel in d.report.halted:
            # Nothing was accepted and the channel cannot send now: due again at once, the attempt not
            # counted, so the delivery goes out on the first tick after the cause is fixed.
            outcomes.retry_later(item, now, d.report.halted[item.channel], attempts=item.attempts)
        elif retry and item.attempts + 1 < d.policy.delivery_attempts:
            backoff = d.policy.retry_backoff * (2**item.attempts)
            wait = max(timedelta(seconds=retry[0].retry_after or 0.0), backoff)
            outcomes.retry_later(item, now + wait, retry[0].reason)
        else:
            reason = (retry or found)[0].reason if found else "no result"
            if retry:
                reason = f"gave up after {item.attempts + 1} attempts: {reason}"
            outcomes.finish(item, DeliveryStatus.FAILED, reason)
    return events


def _fallback_for(d: Dispatcher, item: _Due) -> dict[str, Any] | None:
    """The delivery on the fallback channel for a primary that could not be delivered, if the step (or
    campaign) has one."""
    if item.step_id.endswith((FALLBACK_SUFFIX, REMOVAL_SUFFIX)):
        return None
    if item.campaign:
        campaign = d.campaigns.get(item.campaign)
        if campaign is None or not campaign.fallback:
            return None
        channel = campaign.fallback
        template = fallback_template(campaign.fallback, campaign.template, None)
    else:
        sequence = d.sequences.get(item.sequence or "")
        try:
            step = sequence.steps[sequence.step_index(item.step_id)] if sequence is not None else None
        except KeyError:
            step = None
        if not isinstance(step, SendStep) or not step.fallback:
            return None
        channel, template = step.fallback, step.fallback_template
    return new_delivery(
        key=f"{item.dedupe_key}{FALLBACK_SUFFIX}",
        enrollment_id=item.enrollment_id,
        campaign=item.campaign,
        step_id=f"{item.step_id}{FALLBACK_SUFFIX}",
        customer_id=item.customer_id,
        channel=channel,
        connector=provider_of(channel, d.settings),
        template=template,
        now=d.now,
    )


def _audience_message(item: _Due, contact: Contact | None) -> Message:
    """An ad-audience sync of the customer: their identifiers, which the connector normalises and hashes."""
    return Message(
        delivery_id=item.dedupe_key,
        channel=item.channel,
        to=item.ad_audience or "",
        customer_id=item.customer_id,
        action=item.action or ADD,
        member=AudienceMember(
            customer_id=item.customer_id,
            email=contact.email if contact else None,
            phone=contact.phone if contact else None,
            first_name=contact.first_name if contact else None,
            last_name=contact.last_name if contact else None,
        ),
    )


def _sent_event(item: _Due, message: Message, result: Result, now: datetime) -> dict[str, Any]:
    """The event on the customer's timeline of what was sent (``Email Sent`` ...)."""
    properties: dict[str, Any] = {
        "delivery_id": item.dedupe_key,
        "step": step_of(item.step_id),
        "provider_message_id": result.provider_id,
    }
    if item.sequence:
        properties["sequence"] = item.sequence
    if item.campaign:
        properties["campaign"] = item.campaign
    if item.template:
        properties["template"] = item.template
    if spec(item.channel).delivery == "audience":
        properties.update(audience=item.ad_audience, action=item.action)
    if message.subject:
        properties["subject"] = message.subject
    return {
        "message_id": f"omni:{item.dedupe_key}",
        "customer_id": item.customer_id,
        "type": "track",
        "name": SENT_EVENTS[item.channel],
        "channel": SENT_TOUCHPOINTS[item.channel],
        "properties": properties,
        "context": {"library": {"name": "omni"}},
        "user_id": None,
        "anonymous_id": None,
        "occurred_at": now,
        "received_at": now,
    }
