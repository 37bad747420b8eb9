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
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import CONSENT_CHANNELS
from omni.core.statuses import ConsentStatus
from profiles.bulk import dialect_insert
from profiles.consent import SUPPRESSIBLE, ConsentDecision, apply_consents
from profiles.models import Consent, Customer, Event, Identity, Suppression
from profiles.segment import CONSENT_EVENTS

# The timeline event of each consent status (``Unsubscribed`` / ``Subscribed``, as ingest reads them).
EVENT_OF_STATUS = {status.value: name for name, status in CONSENT_EVENTS.items()}
HARD_BOUNCE = "hard_bounce"


def live_customers(session: Session, customer_ids: Iterable[int]) -> dict[int, int]:
    """Each of ``customer_ids`` that exists -> itself, or the customer it was merged into (a few
    statements whatever the number of ids: merges keep ``merged_into`` one hop)."""
    customers = Customer.__table__
    resolved: dict[int, int] = {}
    pending = {customer_id: customer_id for customer_id in set(customer_ids)}  # asked -> to look up
    for _ in range(100):  # one or two rounds
        if not pending:
            break
        found: dict[int, int | None] = {}
        for chunk in chunked(sorted(set(pending.values()))):
            rows = session.execute(
                select(customers.c.id, customers.c.merged_into).where(customers.c.id.in_(chunk))
            )
            found.update({row.id: row.merged_into for row in rows})
        following: dict[int, int] = {}
        for asked, current in pending.items():
            if current not in found:
                continue  # no such customer
            if found[current] is None:
                resolved[asked] = current
            else:
                following[asked] = found[current]
        pending = following
    return resolved


def live_customer(session: Session, customer_id: int) -> int | None:
    """``customer_id``, or the customer it was merged into; None when there is no such customer."""
    return live_customers(session, [customer_id]).get(customer_id)


def customers_with_each(session: Session, kind: str, addresses: Iterable[str]) -> dict[str, list[int]]:
    """For each address (an email address or an E.164 number, as stored), the live customers holding it
    on their profile or as an identity (addresses nobody holds are left out). Two lookups per 1,000
    addresses, whatever their number."""
    if kind not in SUPPRESSIBLE:
        raise ValueError(f"unknown address kind {kind!r}")
    customers, identities = Customer.__table__, Identity.__table__
    column = customers.c.email if kind == "email" else customers.c.phone
    holders: dict[str, set[int]] = {}
    for chunk in chunked(sorted({a for a in addresses if a})):
        for address, customer_id in session.execute(select(column, customers.c.id).where(column.in_(chunk))):
            holders.setdefault(address, set()).add(customer_id)
        for address, customer_id in session.execute(
            select(identities.c.value, identities.c.customer_id).where(
                identities.c.kind == kind, identities.c.value.in_(chunk)
            )
        ):
            holders.setdefault(address, set()).add(customer_id)
    live = live_customers(session, {c for ids in holders.values() for c in ids})
    found = {address: sorted({live[c] for c in ids if c in live}) for address, ids in holders.items()}
    return {address: ids for address, ids in found.items() if ids}


def customers_with(session: Session, kind: str, address: str) -> list[int]:
    """The live customers holding ``address`` (an email address or an E.164 number, as stored) on their
    profile or as an identity."""
    return customers_with_each(session, kind, [address]).get(address, [])


def _recorded(session: Session, keys: set[tuple[int, str]]) -> dict[tuple[int, str], tuple[str, str]]:
    table = Consent.__table__
    found: dict[tuple[int, str], tuple[str, str]] = {}
    for chunk in chunked(sorted({customer_id for customer_id, _ in keys})):
        rows = session.execute(
            select(table.c.customer_id, table.c.channel, table.c.status, table.c.source).where(
                table.c.customer_id.in_(chunk)
            )
        )
        found.update({(r.customer_id, r.channel): (r.status, r.source) for r in rows})
    return {key: value for key, value in found.items() if key in keys}


def record_consents(
    session: Session,
    decisions: Iterable[ConsentDecision],
    *,
    now: datetime,
    touchpoint: str,
    operator: bool = False,
    properties: dict | None = None,
    properties_of: Mapping[tuple[int, str], dict] | None = None,
) -> list[ConsentDecision]:
    """Apply consent ``decisions`` (:func:`profiles.consent.apply_consents`) and put an ``Unsubscribed``
    / ``Subscribed`` event on the timeline of each customer whose status on a channel changed.

    Args:
        now: the time of receipt (decisions dated later count from ``now``).
        touchpoint: the events' ``channel`` (where the customer said it: ``email``, ``sms``, ``web``).
        operator: apply whatever the recorded time (a decision made now by the customer on Omni's own
            page, or by the provider for them: see :func:`profiles.consent.apply_consents`).
        properties: more event properties (a delivery id ...).
        properties_of: more event properties for one (customer, channel), over ``properties``.

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
    latest: dict[tuple[int, str, str], datetime] = {}
    for d in decisions:
        mark = (d.customer_id, d.channel, d.status)
        latest[mark] = max(latest.get(mark, d.at), d.at)
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
        at = latest[(customer_id, channel, status)]
        changed.append(ConsentDecision(customer_id, channel, status, source, at))
        events.append(
            {
                "message_id": f"omni:consent:{uuid.uuid4().hex}",
                "customer_id": customer_id,
                "type": "track",
                "name": EVENT_OF_STATUS[status],
                "channel": touchpoint,
                "properties": {
                    **(properties or {}),
                    **((properties_of or {}).get(key) or {}),
                    "channel": channel,
                    "source": source,
                },
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


def decide(
    session: Session,
    customer_ids: Iterable[int],
    channel: str,
    status: str,
    *,
    source: str,
    now: datetime,
    touchpoint: str,
    at: datetime | None = None,
    operator: bool = False,
    properties: dict | None = None,
) -> list[ConsentDecision]:
    """Record ``status`` (opted in or out) on ``channel`` for ``customer_ids`` (see
    :func:`record_consents`)."""
    decisions = [
        ConsentDecision(c, channel, ConsentStatus(status).value, source, at or now)
        for c in sorted(set(customer_ids))
    ]
    return record_consents(
        session, decisions, now=now, touchpoint=touchpoint, operator=operator, properties=properties
    )


def opt_out(
    session: Session, customer_ids: Iterable[int], channel: str, **options: Any
) -> list[ConsentDecision]:
    """Opt ``customer_ids`` out of ``channel`` (:func:`decide`)."""
    return decide(session, customer_ids, channel, ConsentStatus.OPTED_OUT, **options)


def opt_in(
    session: Session, customer_ids: Iterable[int], channel: str, **options: Any
) -> list[ConsentDecision]:
    """Opt ``customer_ids`` back in to ``channel`` (:func:`decide`)."""
    return decide(session, customer_ids, channel, ConsentStatus.OPTED_IN, **options)


# --- addresses that cannot receive ---------------------------------------------------------------------


def _address(kind: str, address: str) -> str:
    return address.strip().lower() if kind == "email" else address.strip()


def suppress_addresses(
    session: Session,
    kind: str,
    addresses: Iterable[tuple[str, str, str | None]],
    *,
    now: datetime,
    reason: str = HARD_BOUNCE,
) -> list[str]:
    """Suppress each ``(address, source, detail)`` (normalised as the store keeps it: lower-case email,
    E.164 phone) for every channel that sends to its kind, in one statement; an address given twice keeps
    its first source. Returns the addresses that are new (a second bounce changes nothing)."""
    if kind not in SUPPRESSIBLE:
        raise ValueError(f"only {', '.join(SUPPRESSIBLE)} addresses can be suppressed, not {kind!r}")
    rows: dict[str, dict] = {}
    for address, source, detail in addresses:
        address = _address(kind, address or "")[:512]
        if address and address not in rows:
            rows[address] = {
                "kind": kind,
                "address": address,
                "reason": reason[:32],
                "source": source[:200],
                "detail": (detail or None) and detail[:2000],
                "created_at": now,
            }
    if not rows:
        return []
    table = Suppression.__table__
    statement = (
        dialect_insert(session, table)
        .on_conflict_do_nothing(index_elements=["kind", "address"])
        .returning(table.c.address)
    )
    # RETURNING, not rowcount: psycopg reports a row for an INSERT that ON CONFLICT skipped.
    new = set(session.execute(statement, list(rows.values())).scalars())
    return [address for address in rows if address in new]


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
    """Suppress ``address`` (see :func:`suppress_addresses`). Returns whether it is new."""
    return bool(suppress_addresses(session, kind, [(address, source, detail)], now=now, reason=reason))


def lift_suppression(session: Session, kind: str, address: str) -> dict | None:
    """Remove the suppression of ``address`` (an operator's call: the address is reachable again, for
    the customers' consent to decide); returns the row removed, None when there was none."""
    table = Suppression.__table__
    address = _address(kind, address)
    row = session.execute(
        delete(table).where(table.c.kind == kind, table.c.address == address).returning(*table.c)
    ).first()
    return dict(row._mapping) if row is not None else None


def list_suppressions(
    session: Session, *, kind: str | None = None, limit: int = 100, offset: int = 0
) -> list[dict]:
    """Suppressed addresses, newest first (``omni suppressions list``)."""
    table = Suppression.__table__
    query = select(table).order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit).offset(offset)
    if kind is not None:
        query = query.where(table.c.kind == kind)
    return [dict(row._mapping) for row in session.execute(query)]


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
