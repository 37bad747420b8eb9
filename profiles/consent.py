"""Marketing consent per customer and channel.

Email and ads are allowed unless the customer opted out; SMS and push need an opt-in. The newest
decision wins by the time it was made (the event time), so consent does not depend on arrival order,
with three safeguards so that an opt-out always takes effect:

- a feed's decision counts from its event time but never from later than Omni received it (ingest
  passes ``min(occurred_at, received_at)``, and rejects payloads dated too far ahead): no payload can
  pin a consent with a future timestamp. A recorded decision time later than ``now`` (written before
  that rule) means nothing: any opt-out replaces it, and an opt-in replaces only an opt-in;
- at the same time, an opt-out beats an opt-in, whatever the order they arrive in;
- an operator's decision (``omni consent set``, ``operator=True``) is applied at the time of the
  command whatever the stored time says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, false, not_, or_, select, true
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import CONSENT_CHANNELS, SEND_CHANNELS, spec
from omni.core.statuses import ConsentStatus
from profiles.bulk import (
    dialect_of,
    execute_sql,
    in_list,
    insert_rows,
    list_param,
    read_timestamp,
    update_rows,
)
from profiles.models import Consent, Customer, Identity, IdentityKind, Suppression
from profiles.sqlexpr import has_text, in_set


@dataclass(slots=True)
class ConsentDecision:
    customer_id: int
    channel: str
    status: str
    source: str
    at: datetime


# --- the rule: who may be messaged on a channel ---------------------------------------------------------
# Consent: a channel that needs an opt-in (SMS, push) is allowed only after one; the others (email, ads)
# until the customer opts out; a channel without consent (webhook: operational, to another system) always.
# Reachable: consent and the address the channel sends to (``omni.core.channels``: email address, phone
# number, a device token, email or phone for ad matching), unless that address is suppressed (a hard
# bounce, ``profiles.suppression``: the address cannot receive, whoever holds it). The audience compiler
# (``reachable`` and ``consent`` conditions), the dispatcher, the renderer and the profile API all read it
# from here.

# The address kinds a suppression applies to: those a channel sends a message to. Ads match on email or
# phone and send nothing there, so a bounced address still matches.
SUPPRESSIBLE = ("email", "phone")


def is_allowed(channel: str, status: str | None) -> bool:
    """Whether marketing on ``channel`` is allowed given the recorded ``status`` (None: never asked)."""
    facts = spec(channel)
    if not facts.consent:
        return True
    if facts.opt_in_required:
        return status == ConsentStatus.OPTED_IN.value
    return status != ConsentStatus.OPTED_OUT.value


def consent_allowed_sql(channel: str, customer_id: Any) -> ColumnElement:
    """SQL: :func:`is_allowed` for the customer ``customer_id`` (a column) on ``channel``."""
    facts = spec(channel)
    if not facts.consent:
        return true()
    consents = Consent.__table__
    if facts.opt_in_required:
        opted_in = select(consents.c.customer_id).where(
            consents.c.channel == facts.name.value, consents.c.status == ConsentStatus.OPTED_IN.value
        )
        return in_set(customer_id, opted_in)
    opted_out = select(consents.c.customer_id).where(
        consents.c.channel == facts.name.value, consents.c.status == ConsentStatus.OPTED_OUT.value
    )
    return not_(in_set(customer_id, opted_out))


def has_address_sql(channel: str, customers: Any = None, *, per_customer: bool = False) -> ColumnElement:
    """SQL: the customer (a row of ``customers``) has the address ``channel`` sends to.

    ``per_customer``: the statement reads a few customers (the dispatcher's batch of 1,000), so a device
    token is looked up per customer (a correlated EXISTS on the identities index) rather than as the set
    of every token holder, which SQLite would build in full for each batch. A whole-table statement (an
    audience) keeps the set form, three times faster there."""
    customers = Customer.__table__ if customers is None else customers
    address = spec(channel).address
    if address == "email":
        return has_text(customers.c.email)
    if address == "phone":
        return has_text(customers.c.phone)
    if address == "email_or_phone":
        return or_(has_text(customers.c.email), has_text(customers.c.phone))
    if address == "device_token":
        identities = Identity.__table__
        is_token = identities.c.kind == IdentityKind.DEVICE_TOKEN.value
        if per_customer:
            return exists().where(identities.c.customer_id == customers.c.id, is_token)
        return in_set(customers.c.id, select(identities.c.customer_id).where(is_token))
    return true()


def suppressed_sql(channel: str, customers: Any = None) -> ColumnElement:
    """SQL: the address ``channel`` sends to (a row of ``customers``) is suppressed (a hard bounce)."""
    customers = Customer.__table__ if customers is None else customers
    kind = spec(channel).address
    if kind not in SUPPRESSIBLE:
        return false()
    table = Suppression.__table__
    column = customers.c.email if kind == "email" else customers.c.phone
    return in_set(column, select(table.c.address).where(table.c.kind == kind))


def reachable_sql(channel: str, customers: Any = None) -> ColumnElement:
    """SQL: the customer (a row of ``customers``) can be messaged on ``channel``: an address that is not
    suppressed, and consent."""
    customers = Customer.__table__ if customers is None else customers
    return and_(
        has_address_sql(channel, customers),
        not_(suppressed_sql(channel, customers)),
        consent_allowed_sql(channel, customers.c.id),
    )


def unreachable_reason(
    channel: str, *, has_address: bool, consent_status: str | None, suppressed: bool = False
) -> str | None:
    """Why a customer cannot be messaged on ``channel`` (None: they can), from what
    :func:`has_address_sql`, :func:`suppressed_sql` and the ``consents`` table said about them."""
    facts = spec(channel)
    if not has_address:
        return facts.no_address
    if suppressed:
        return f"{facts.address} address suppressed (hard bounce)"
    if not is_allowed(channel, consent_status):
        return f"no {facts.name.value} consent ({consent_status or 'never opted in'})"
    return None


def reachability_of(session: Session, customer_id: int) -> dict[str, str | None]:
    """channel -> why one customer cannot be messaged on it (None: they can), for every channel: the rule
    above, read in one statement (the profile API, the preference centre)."""
    customers = Customer.__table__
    columns = [
        column
        for channel in SEND_CHANNELS
        for column in (
            has_address_sql(channel, customers, per_customer=True).label(f"address_{channel}"),
            suppressed_sql(channel, customers).label(f"suppressed_{channel}"),
        )
    ]
    row = session.execute(select(*columns).where(customers.c.id == customer_id)).one_or_none()
    if row is None:
        return {channel: "no such customer" for channel in SEND_CHANNELS}
    table = Consent.__table__
    query = select(table.c.channel, table.c.status).where(table.c.customer_id == customer_id)
    statuses = {channel: status for channel, status in session.execute(query)}
    values = row._mapping
    return {
        channel: unreachable_reason(
            channel,
            has_address=bool(values[f"address_{channel}"]),
            consent_status=statuses.get(channel),
            suppressed=bool(values[f"suppressed_{channel}"]),
        )
        for channel in SEND_CHANNELS
    }


OPTED_OUT = ConsentStatus.OPTED_OUT.value


# --- precedence: which of two decisions stands -----------------------------------------------------------
# The newest by the time it was made; at the same time, an opt-out. Written here twice, once per form:
# for one decision against the recorded one (ingest, ``omni consent set``), and as the ORDER BY that ranks
# many at once (merging customers, ``profiles.identity``).


def _supersedes(decision: ConsentDecision, status: str, at: datetime) -> bool:
    """Whether ``decision`` replaces a recorded ``status`` made at ``at``: it is newer, or as new and
    an opt-out (an opt-out wins a tie)."""
    if decision.at != at:
        return decision.at > at
    return decision.status == OPTED_OUT or status != OPTED_OUT


def precedence_order_sql(alias: str) -> str:
    """SQL ORDER BY terms ranking the ``consents`` rows ``alias`` by precedence, the standing one first."""
    return f"{alias}.updated_at DESC, CASE WHEN {alias}.status = '{OPTED_OUT}' THEN 0 ELSE 1 END"


def apply_consents(
    session: Session,
    decisions: Iterable[ConsentDecision],
    *,
    now: datetime | None = None,
    operator: bool = False,
) -> int:
    """Record decisions; one older than what is recorded for that customer and channel is ignored.

    Args:
        now: the time of receipt: a recorded decision time later than it is meaningless (a decision
            can never be later than when Omni learned of it), see the module's docstring.
        operator: decisions made by a person operating Omni (``omni consent set``): applied whatever
            the recorded time, which becomes the decision's.

    Returns the number of (customer, channel) pairs whose status or source changed.
    """
    # Time order; at the same time opt-outs last, so that they win.
    decisions = sorted(decisions, key=lambda d: (d.at, d.status == OPTED_OUT))
    if not decisions:
        return 0
    # The reads and writes below go to the driver, below the ORM: first write what the caller's session
    # holds (a customer just added), as SQLAlchemy's autoflush does before a statement of its own.
    session.flush()
    current = _recorded(session, sorted({d.customer_id for d in decisions}))
    changed: dict[tuple[int, str], dict] = {}
    for decision in decisions:
        key = (decision.customer_id, decision.channel)
        row = current.get(key)
        if row is not None and not operator:
            if now is not None and row["updated_at"] > now:
                # Recorded with a time from the future (before ingest refused such times): that time
                # means nothing. An opt-out replaces it; an opt-in does not undo an opt-out so recorded.
                if decision.status != OPTED_OUT and row["status"] == OPTED_OUT:
                    continue
            elif not _supersedes(decision, row["status"], row["updated_at"]):
                continue
        new = {
            "id": row["id"] if row else None,
            "customer_id": decision.customer_id,
            "channel": decision.channel,
            "status": decision.status,
            "source": decision.source[:200],
            "updated_at": decision.at,
        }
        current[key] = new
        changed[key] = new
    table = Consent.__table__
    # One statement each for the new rows and the changed ones, whatever their number.
    insert_rows(
        session,
        table,
        [{k: v for k, v in row.items() if k != "id"} for row in changed.values() if row["id"] is None],
    )
    update_rows(
        session,
        table,
        "id",
        [
            {
                "id": row["id"],
                "status": row["status"],
                "source": row["source"],
                "updated_at": row["updated_at"],
            }
            for row in changed.values()
            if row["id"] is not None
        ],
    )
    return len(changed)


def _recorded(session: Session, customer_ids: list[int]) -> dict[tuple[int, str], dict]:
    """(customer, channel) -> the recorded decision (id, status, updated_at) of ``customer_ids``."""
    dialect = dialect_of(session)
    sql = (
        "SELECT id, customer_id, channel, status, updated_at FROM consents "
        f"WHERE {in_list('customer_id', dialect)}"
    )
    current: dict[tuple[int, str], dict] = {}
    for chunk in chunked(customer_ids, 5000):
        for consent_id, customer_id, channel, status, updated_at in execute_sql(
            session, sql, (list_param(chunk, dialect),)
        ):
            current[(customer_id, channel)] = {
                "id": consent_id,
                "status": status,
                "updated_at": read_timestamp(updated_at),
            }
    return current


def consents_of(session: Session, customer_id: int) -> dict[str, dict]:
    """channel -> {status, source, updated_at, allowed} for every consent channel of one customer."""
    table = Consent.__table__
    rows = {
        row.channel: row for row in session.execute(select(table).where(table.c.customer_id == customer_id))
    }
    result: dict[str, dict] = {}
    for channel in CONSENT_CHANNELS:
        row = rows.get(channel)
        status = row.status if row else None
        result[channel] = {
            "status": status or "default",
            "source": row.source if row else None,
            "updated_at": row.updated_at if row else None,
            "allowed": is_allowed(channel, status),
        }
    return result
