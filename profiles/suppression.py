"""Suppression: the one way Omni learns to stop (or start again) messaging someone, whoever told it.

Two kinds of fact, each kept in one place and read by the one reachability rule of
:mod:`profiles.consent` (the audience conditions ``reachable`` / ``consent``, the dispatcher's gate, the
profile API, the preference centre):

- **an opt-out or opt-in** of a customer on a channel: a consent decision applied by
  :func:`profiles.consent.apply_consents` (its precedence: the newest decision wins, an opt-out wins a
  tie), with an ``Unsubscribed`` / ``Subscribed`` event on the customer's timeline (properties
  ``channel``, ``source``) whenever the recorded status changes (:func:`record_consents`). Repeating a
  decision changes nothing and writes no second event.
- **an address that cannot receive** (a hard bounce): the address is suppressed for its kind
  (``suppressions``, :func:`suppress_address`), so no customer holding it is messaged there; a customer
  who gives another address is reachable again. :func:`lift_suppression` undoes it (an operator's call).

Sources and their ``source`` values: file ingest and the tracking API (``track:Unsubscribed``,
``identify:traits.*``, applied by :mod:`profiles.ingest`, whose event is the timeline entry), ``omni
consent set`` (``cli``), the unsubscribe page (``one_click``, ``preference_centre``), SendGrid's Event
Webhook (``sendgrid:<event>``), Twilio's webhooks (``twilio:STOP``, ``twilio:21610``) and the connectors'
own results (``sequences.effects``: ``twilio:21610`` at send time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from omni.core.channels import CONSENT_CHANNELS
from omni.core.statuses import ConsentStatus
from profiles.bulk import dialect_insert
from profiles.consent import SUPPRESSIBLE, ConsentDecision, apply_consents
from profiles.models import Consent, Customer, Event, Identity, Suppression
from profiles.segment import CONSENT_EVENTS

# The timeline event of each consent status (``Unsubscribed`` / ``Subscribed``, as ingest reads them).
EVENT_OF_STATUS = {status.value: name for name, status in CONSENT_EVENTS.items()}
HARD_BOUNCE = "hard_bounce"


def live_customer(session: Session, customer_id: int) -> int | None:
    """``customer_id``, or the customer it was merged into; None when there is no such customer."""
    customers = Customer.__table__
    for _ in range(100):  # merges keep merged_into one hop: this loops once or twice
        row = session.execute(
            select(customers.c.id, customers.c.merged_into).where(customers.c.id == customer_id)
        ).first()
        if row is None:
            return None
        if row.merged_into is None:
            return row.id
        customer_id = row.merged_into
    return None


def customers_with(session: Session, kind: str, address: str) -> list[int]:
    """The live customers holding ``address`` (an email address or an E.164 number, as stored) on their
    profile or as an identity."""
    if kind not in SUPPRESSIBLE:
        raise ValueError(f"unknown address kind {kind!r}")
    customers, identities = Customer.__table__, Identity.__table__
    column = customers.c.email if kind == "email" else customers.c.phone
    found = set(session.execute(select(customers.c.id).where(column == address)).scalars())
    found |= set(
        session.execute(
            select(identities.c.customer_id).where(identities.c.kind == kind, identities.c.value == address)
        ).scalars()
    )
    live = {live_customer(session, customer_id) for customer_id in found}
    return sorted(customer_id for customer_id in live if customer_id is not None)


def _recorded(session: Session, keys: set[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, str]]:
    table = Consent.__table__
    customer_ids = sorted({customer_id for customer_id, _ in keys})
    rows = session.execute(
        select(table.c.customer_id, table.c.channel, table.c.status, table.c.source).where(
            table.c.customer_id.in_(customer_ids)
        )
    )
    return {
        (r.customer_id, r.channel): (r.status, r.source) for r in rows if (r.customer_id, r.channel) in keys
    }


def record_consents(
    session: Session,
    decisions: Iterable[ConsentDecision],
    *,
    now: datetime,
    touchpoint: str,
    operator: bool = False,
    properties: dict | None = None,
) -> list[ConsentDecision]:
    """Apply consent ``decisions`` (:func:`profiles.consent.apply_consents`) and put an ``Unsubscribed``
    / ``Subscribed`` event on the timeline of each customer whose status on a channel changed.

    Args:
        now: the time of receipt (decisions dated later count from ``now``).
        touchpoint: the events' ``channel`` (where the customer said it: ``email``, ``sms``, ``web``).
        operator: apply whatever the recorded time (a decision made now by the customer on Omni's own
            page, or by the provider for them: see :func:`profiles.consent.apply_consents`).
        properties: more event properties (a delivery id ...).

    Returns the decisions that changed a status (one per customer and channel).
    """
    decisions = [d for d in decisions]
    for decision in decisions:
        if decision.channel not in CONSENT_CHANNELS:
            raise ValueError(
                f"{decision.channel!r} carries no consent (one of {', '.join(CONSENT_CHANNELS)})"
            )
        if decision.status not in EVENT_OF_STATUS:
            raise ValueError(f"unknown consent status {decision.status!r}")
    decisions = [
        ConsentDecision(d.customer_id, d.channel, d.status, d.source, min(d.at, now)) for d in decisions
    ]
    if not decisions:
        return []
    keys = {(d.customer_id, d.channel) for d in decisions}
    before = _recorded(session, keys)
    apply_consents(session, decisions, now=now, operator=operator)
    after = _recorded(session, keys)
    changed: list[ConsentDecision] = []
    events = []
    for key in sorted(keys):
        old, new = before.get(key), after.get(key)
        if new is None or (old is not None and old[0] == new[0]):
            continue
        customer_id, channel = key
        status, source = new
        at = max(d.at for d in decisions if (d.customer_id, d.channel) == key and d.status == status)
        changed.append(ConsentDecision(customer_id, channel, status, source, at))
        events.append(
            {
                "message_id": f"omni:consent:{uuid.uuid4().hex}",
                "customer_id": customer_id,
                "type": "track",
                "name": EVENT_OF_STATUS[status],
                "channel": touchpoint,
                "properties": {**(properties or {}), "channel": channel, "source": source},
                "context": {"library": {"name": "omni"}},
                "user_id": None,
                "anonymous_id": None,
                "occurred_at": at,
                "received_at": now,
            }
        )
    if events:
        session.execute(Event.__table__.insert(), events)
    return changed


def opt_out(
    session: Session,
    customer_ids: Iterable[int],
    channel: str,
    *,
    source: str,
    now: datetime,
    touchpoint: str,
    at: datetime | None = None,
    operator: bool = False,
    properties: dict | None = None,
) -> list[ConsentDecision]:
    """Opt ``customer_ids`` out of ``channel`` (see :func:`record_consents`)."""
    return _decide(
        session,
        customer_ids,
        channel,
        ConsentStatus.OPTED_OUT,
        source,
        now,
        touchpoint,
        at,
        operator,
        properties,
    )


def opt_in(
    session: Session,
    customer_ids: Iterable[int],
    channel: str,
    *,
    source: str,
    now: datetime,
    touchpoint: str,
    at: datetime | None = None,
    operator: bool = False,
    properties: dict | None = None,
) -> list[ConsentDecision]:
    """Opt ``customer_ids`` back in to ``channel`` (see :func:`record_consents`)."""
    return _decide(
        session,
        customer_ids,
        channel,
        ConsentStatus.OPTED_IN,
        source,
        now,
        touchpoint,
        at,
        operator,
        properties,
    )


def _decide(session, customer_ids, channel, status, source, now, touchpoint, at, operator, properties):
    decisions = [
        ConsentDecision(c, channel, status.value, source, at or now) for c in sorted(set(customer_ids))
    ]
    return record_consents(
        session, decisions, now=now, touchpoint=touchpoint, operator=operator, properties=properties
    )


# --- addresses that cannot receive ---------------------------------------------------------------------


def suppress_address(
    session: Session,
    kind: str,
    address: str,
    *,
    source: str,
    now: datetime,
    reason: str = HARD_BOUNCE,
    detail: str | None = None,
) -> bool:
    """Suppress ``address`` (normalised as the store keeps it: lower-case email, E.164 phone) for every
    channel that sends to its kind. Returns whether it is new (a second bounce changes nothing)."""
    if kind not in SUPPRESSIBLE:
        raise ValueError(f"only {', '.join(SUPPRESSIBLE)} addresses can be suppressed, not {kind!r}")
    address = address.strip().lower() if kind == "email" else address.strip()
    if not address:
        return False
    table = Suppression.__table__
    statement = (
        dialect_insert(session, table)
        .values(
            kind=kind,
            address=address[:512],
            reason=reason[:32],
            source=source[:200],
            detail=(detail or None) and detail[:2000],
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["kind", "address"])
        .returning(table.c.id)
    )
    # RETURNING, not rowcount: psycopg reports a row for an INSERT that ON CONFLICT skipped.
    return session.execute(statement).first() is not None


def lift_suppression(session: Session, kind: str, address: str) -> bool:
    """Remove the suppression of ``address``; returns whether there was one."""
    table = Suppression.__table__
    address = address.strip().lower() if kind == "email" else address.strip()
    return bool(
        session.execute(delete(table).where(table.c.kind == kind, table.c.address == address)).rowcount
    )


def suppressions_of(session: Session, *, email: str | None, phone: str | None) -> list[dict]:
    """The suppressions of a customer's addresses (for pages and the profile API)."""
    table = Suppression.__table__
    wanted = [(kind, value) for kind, value in (("email", email), ("phone", phone)) if value]
    if not wanted:
        return []
    rows = session.execute(
        select(table).where(or_(*((table.c.kind == k) & (table.c.address == v) for k, v in wanted)))
    )
    return [dict(row._mapping) for row in rows]
