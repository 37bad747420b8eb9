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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from profiles.models import Consent, ConsentChannel, ConsentStatus

# Channels allowed when the customer never said anything.
ALLOWED_BY_DEFAULT = frozenset({ConsentChannel.EMAIL.value, ConsentChannel.ADS.value})


@dataclass(slots=True)
class ConsentDecision:
    customer_id: int
    channel: str
    status: str
    source: str
    at: datetime


def is_allowed(channel: str, status: str | None) -> bool:
    """Whether marketing on ``channel`` is allowed given the recorded ``status`` (None: never asked)."""
    if status is None:
        return channel in ALLOWED_BY_DEFAULT
    return status == ConsentStatus.OPTED_IN.value


OPTED_OUT = ConsentStatus.OPTED_OUT.value


def _supersedes(decision: ConsentDecision, status: str, at: datetime) -> bool:
    """Whether ``decision`` replaces a recorded ``status`` made at ``at``: it is newer, or as new and
    an opt-out (an opt-out wins a tie)."""
    if decision.at != at:
        return decision.at > at
    return decision.status == OPTED_OUT or status != OPTED_OUT


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
    table = Consent.__table__
    customer_ids = sorted({d.customer_id for d in decisions})
    current: dict[tuple[int, str], dict] = {}
    for chunk in chunked(customer_ids):
        for row in session.execute(
            select(
                table.c.customer_id, table.c.channel, table.c.status, table.c.source, table.c.updated_at
            ).where(table.c.customer_id.in_(chunk))
        ):
            current[(row.customer_id, row.channel)] = dict(row._mapping, existing=True)
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
            "customer_id": decision.customer_id,
            "channel": decision.channel,
            "status": decision.status,
            "source": decision.source[:200],
            "updated_at": decision.at,
            "existing": bool(row and row.get("existing")),
        }
        current[key] = new
        changed[key] = new
    inserts = [
        {k: v for k, v in row.items() if k != "existing"} for row in changed.values() if not row["existing"]
    ]
    updates = [
        {
            "b_customer_id": r["customer_id"],
            "b_channel": r["channel"],
            "status": r["status"],
            "source": r["source"],
            "updated_at": r["updated_at"],
        }
        for r in changed.values()
        if r["existing"]
    ]
    if inserts:
        session.execute(insert(table), inserts)
    if updates:
        session.execute(
            update(table)
            # SET columns come from the keys of each parameter row.
            .where(
                table.c.customer_id == bindparam("b_customer_id"), table.c.channel == bindparam("b_channel")
            ),
            updates,
        )
    return len(changed)


def consents_of(session: Session, customer_id: int) -> dict[str, dict]:
    """channel -> {status, source, updated_at, allowed} for every consent channel of one customer."""
    table = Consent.__table__
    rows = {
        row.channel: row for row in session.execute(select(table).where(table.c.customer_id == customer_id))
    }
    result: dict[str, dict] = {}
    for channel in ConsentChannel:
        row = rows.get(channel.value)
        status = row.status if row else None
        result[channel.value] = {
            "status": status or "default",
            "source": row.source if row else None,
            "updated_at": row.updated_at if row else None,
            "allowed": is_allowed(channel.value, status),
        }
    return result


def channels_requiring_opt_in() -> Sequence[str]:
    return [c.value for c in ConsentChannel if c.value not in ALLOWED_BY_DEFAULT]
