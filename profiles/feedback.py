"""Provider feedback: what SendGrid and Twilio tell Omni after a send, applied to the profile store.

The webhooks of ``omni serve`` (``omni.server.webhooks``) verify a post's signature and hand its events
here, inside one transaction per post; a SendGrid post (thousands of events) is applied set-based, a few
statements whatever its size, with the outcome of applying its events one after the other. Every event is
kept in ``provider_events`` as it came, unique by its key (``sendgrid:<sg_event_id>``,
``twilio:<MessageSid>:<status>``, ``twilio:<MessageSid>``), so a provider's retry or duplicate is processed
once; events Omni cannot match stay there for inspection (``omni feedback unmatched``) with ``outcome``
``unknown_delivery``, ``unknown_number`` or ``invalid``.

What each event changes:

- SendGrid ``processed`` / ``deferred`` / ``delivered`` / ``bounce`` / ``dropped``: the delivery named by
  ``omni_delivery_id`` (the connector's ``custom_args``): ``provider_status`` (``processed``,
  ``deferred``, ``delivered``, ``bounced``, ``blocked`` (a soft bounce), ``dropped``; never moved
  backwards), ``delivered_at``, and the provider's reason in ``error`` when it failed;
- a hard bounce (``bounce`` of type ``bounce``; or ``dropped`` because SendGrid holds the address as
  bounced): the address is suppressed (:func:`profiles.suppression.suppress_address`), even when the
  delivery is unknown;
- ``open`` / ``click``: ``Email Opened`` / ``Email Link Clicked`` on the customer's timeline (properties
  ``delivery_id``, ``url`` for clicks, ``machine_open`` for Apple's privacy pre-fetch);
- ``spamreport`` / ``unsubscribe`` / ``group_unsubscribe``: an email opt-out (``sendgrid:<event>``);
  ``group_resubscribe``: an email opt-in; the delivery's customer, else every customer with the address;
- Twilio status callbacks: the delivery (by a ``delivery_id`` the callback URL carries, else by
  ``MessageSid``): ``provider_status`` (``queued``, ``sent``, ``delivered``, ``undelivered``,
  ``failed``, ...), ``delivered_at``, the ``ErrorCode`` in ``error``; 21610 (the customer replied STOP):
  an SMS opt-out (``twilio:21610``, as the connector's own effect at send time);
- Twilio inbound messages: ``SMS Received`` on the sender's timeline (found by E.164 number); a whole
  message that is an opt-out keyword opts them out of SMS (``twilio:<KEYWORD>``), an opt-in keyword opts
  them back in, HELP is recorded (property ``keyword``).
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import Channel, Touchpoint
from omni.core.statuses import ConsentStatus
from profiles.bulk import aware, dialect_insert, dialect_of, execute_sql, update_rows
from profiles.consent import ConsentDecision
from profiles.models import Delivery, Event, ProviderEvent
from profiles.segment import normalize_email, normalize_phone
from profiles.suppression import (
    customers_with,
    customers_with_each,
    decide,
    opt_out,
    record_consents,
    suppress_addresses,
)

SENDGRID = "sendgrid"
TWILIO = "twilio"

APPLIED = "applied"
UNKNOWN_DELIVERY = "unknown_delivery"
UNKNOWN_NUMBER = "unknown_number"
INVALID = "invalid"

EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"
SMS_RECEIVED = "SMS Received"

# The custom_args key the SendGrid connector puts the delivery id under (connectors.sendgrid_email).
DELIVERY_ARG = "omni_delivery_id"

# The order of a message's states: the provider's later word never moves a delivery back (callbacks and
# webhook batches arrive out of order). Equal ranks: the first one stays.
PROVIDER_RANK = {
    "accepted": 1,
    "scheduled": 1,
    "queued": 1,
    "processed": 1,
    "sending": 2,
    "deferred": 2,
    "sent": 3,
    "delivered": 4,
    "undelivered": 4,
    "failed": 4,
    "bounced": 4,
    "blocked": 4,
    "dropped": 4,
    "read": 5,
}
FAILURES = frozenset({"undelivered", "failed", "bounced", "blocked", "dropped"})
SENDGRID_DELIVERY_EVENTS = frozenset({"processed", "deferred", "delivered", "bounce", "dropped"})
SENDGRID_OPT_OUTS = frozenset({"spamreport", "unsubscribe", "group_unsubscribe"})
SENDGRID_OPT_INS = frozenset({"group_resubscribe"})
# SendGrid drops a send to an address on its own bounce list with this reason: the address bounced.
SENDGRID_BOUNCED_ADDRESS = "Bounced Address"

TWILIO_OPT_OUT_CODE = "21610"
# Twilio's keywords (PROVIDERS.md §7), matched against the whole message: opt out, opt back in, help.
OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_KEYWORDS = frozenset({"HELP", "INFO"})
# Around the keyword, whitespace and punctuation are ignored ("Stop.", " STOP! "); anything else is a
# sentence, never an opt-out ("please stop sending").
_KEYWORD_TRIM = string.whitespace + string.punctuation
BODY_MAX_CHARS = 1600


@dataclass
class FeedbackReport:
    """What one post did: events per outcome, and the duplicates skipped."""

    outcomes: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


@dataclass(slots=True)
class _Delivery:
    id: int
    dedupe_key: str
    customer_id: int
    channel: str
    provider_status: str | None
    error: str | None
    delivered_at: datetime | None = None


# --- shared steps ------------------------------------------------------------------------------------


def _record(
    session: Session,
    *,
    provider: str,
    kind: str,
    key: str,
    outcome: str,
    payload: Any,
    now: datetime,
    delivery_id: str | None = None,
    address: str | None = None,
    occurred_at: datetime | None = None,
) -> bool:
    """Keep the event; False when its key was seen before (a duplicate: nothing more is done)."""
    table = ProviderEvent.__table__
    statement = (
        dialect_insert(session, table)
        .values(
            provider=provider,
            kind=kind[:64],
            event_key=key[:300],
            delivery_id=delivery_id[:500] if delivery_id else None,
            address=address[:512] if address else None,
            outcome=outcome,
            payload=payload if isinstance(payload, dict) else {"value": payload},
            occurred_at=occurred_at,
            received_at=now,
        )
        .on_conflict_do_nothing(index_elements=["event_key"])
        .returning(table.c.id)
    )
    # RETURNING, not rowcount: psycopg reports a row for an INSERT that ON CONFLICT skipped.
    return session.execute(statement).first() is not None


def _deliveries(session: Session, column: Any, values: Iterable[str]) -> dict[str, _Delivery]:
    table = Delivery.__table__
    found: dict[str, _Delivery] = {}
    for chunk in chunked(sorted(set(values))):
        rows = session.execute(
            select(
                column.label("match"),
                table.c.id,
                table.c.dedupe_key,
                table.c.customer_id,
                table.c.channel,
                table.c.provider_status,
                table.c.error,
                table.c.delivered_at,
            ).where(column.in_(chunk))
        )
        for row in rows:
            found[row.match] = _Delivery(
                row.id,
                row.dedupe_key,
                row.customer_id,
                row.channel,
                row.provider_status,
                row.error,
                row.delivered_at,
            )
    return found


def _advance(delivery: _Delivery, status: str, *, at: datetime, error: str | None) -> dict[str, Any] | None:
    """Move ``delivery`` (in memory) forward to ``status``: the columns that change, None when ``status``
    is not later than what the delivery has (the provider's word never moves it back)."""
    if PROVIDER_RANK.get(status, 0) <= PROVIDER_RANK.get(delivery.provider_status or "", 0):
        return None
    values: dict[str, Any] = {"provider_status": status}
    delivery.provider_status = status
    if status == "delivered":
        values["delivered_at"] = delivery.delivered_at = at
    if status in FAILURES and error and not delivery.error:
        values["error"] = delivery.error = error[:2000]
    return values


def _update_delivery(
    session: Session,
    delivery: _Delivery,
    status: str,
    *,
    at: datetime,
    now: datetime,
    error: str | None = None,
) -> bool:
    """Move the delivery's ``provider_status`` forward to ``status``; False when it is not later."""
    values = _advance(delivery, status, at=at, error=error)
    if values is None:
        return False
    table = Delivery.__table__
    session.execute(update(table).where(table.c.id == delivery.id).values(**values, updated_at=now))
    return True


def _event(
    customer_id: int,
    message_id: str,
    name: str,
    touchpoint: str,
    properties: dict,
    at: datetime,
    now: datetime,
) -> dict[str, Any]:
    return {
        "message_id": message_id[:255],
        "customer_id": customer_id,
        "type": "track",
        "name": name,
        "channel": touchpoint,
        "properties": properties,
        "context": {"library": {"name": "omni"}},
        "user_id": None,
        "anonymous_id": None,
        "occurred_at": at,
        "received_at": now,
    }


def _insert_events(session: Session, events: list[dict[str, Any]]) -> None:
    if events:
        table = Event.__table__
        statement = dialect_insert(session, table).on_conflict_do_nothing(index_elements=["message_id"])
        session.execute(statement, events)


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


# --- SendGrid Event Webhook -----------------------------------------------------------------------------


def _sendgrid_time(value: Any, now: datetime) -> datetime:
    """The event's Unix time, never later than ``now`` (``now`` when missing or unreadable)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return now
    try:
        at = datetime.fromtimestamp(float(value), UTC)
    except (ValueError, OverflowError, OSError):
        return now
    return min(at, now)


def _sendgrid_key(event: Any) -> str:
    if isinstance(event, dict) and _text(event.get("sg_event_id")):
        return f"sendgrid:{event['sg_event_id'].strip()}"
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), default=str)
    return f"sendgrid:sha256:{hashlib.sha256(canonical.encode()).hexdigest()}"


@dataclass(slots=True)
class _SendGridEvent:
    key: str
    kind: str
    event: Any
    delivery_key: str | None = None
    email: str | None = None
    at: datetime | None = None


def _parse_sendgrid(events: list[Any], now: datetime, report: FeedbackReport) -> list[_SendGridEvent]:
    """The post's events, each key once (a repeat inside the post is a duplicate)."""
    parsed: list[_SendGridEvent] = []
    seen: set[str] = set()
    for event in events:
        key = _sendgrid_key(event)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        if not isinstance(event, dict) or not _text(event.get("event")):
            parsed.append(_SendGridEvent(key, "?", event))
            continue
        parsed.append(
            _SendGridEvent(
                key,
                event["event"].strip(),
                event,
                _text(event.get(DELIVERY_ARG)),
                normalize_email(event.get("email")),
                _sendgrid_time(event.get("timestamp"), now),
            )
        )
    return parsed


_RECORD_COLUMNS = (
    "provider",
    "kind",
    "event_key",
    "delivery_id",
    "address",
    "outcome",
    "payload",
    "occurred_at",
    "received_at",
)


@lru_cache(maxsize=1)
def _record_sql_postgresql() -> str:
    """PostgreSQL: the rows bound as ONE jsonb array (psycopg would otherwise parse a statement with a
    placeholder per value, which cost more than the insert), read back into typed columns."""
    table, dialect = ProviderEvent.__table__, postgresql.dialect()
    record = ", ".join(f'"{c}" {table.c[c].type.compile(dialect=dialect)}' for c in _RECORD_COLUMNS)
    names = ", ".join(f'"{c}"' for c in _RECORD_COLUMNS)
    return (
        f'INSERT INTO "{table.name}" ({names}) SELECT {names} '
        f"FROM jsonb_to_recordset(?::jsonb) AS v({record}) "
        'ON CONFLICT ("event_key") DO NOTHING RETURNING "event_key"'
    )


def _record_many(session: Session, rows: list[dict[str, Any]]) -> set[str]:
    """Keep the events (:func:`_record`'s rows) in one statement; returns the keys new to the store."""
    if not rows:
        return set()
    if dialect_of(session) == "postgresql":
        for row in rows:
            aware(row["occurred_at"])
            aware(row["received_at"])
        document = orjson.dumps(rows, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
        return {key for (key,) in execute_sql(session, _record_sql_postgresql(), (document,))}
    table = ProviderEvent.__table__
    statement = (
        dialect_insert(session, table)
        .on_conflict_do_nothing(index_elements=["event_key"])
        .returning(table.c.event_key)
    )
    # RETURNING, not rowcount: psycopg reports a row for an INSERT that ON CONFLICT skipped.
    return set(session.execute(statement, rows).scalars())


def apply_sendgrid_events(session: Session, events: list[Any], *, now: datetime) -> FeedbackReport:
    """Apply a SendGrid Event Webhook post (its JSON array), each event once.

    Set-based: a few statements per post whatever its size (SendGrid posts thousands of events at a
    time), with the outcome of applying the events one after the other in the post's order: each
    delivery's status moves forward only, each customer's consent decisions are applied in order (an
    ``Unsubscribed`` then a ``Subscribed`` event when a post has both), a hard-bounced address is
    suppressed once with its first reason."""
    report = FeedbackReport()
    parsed = _parse_sendgrid(events, now, report)
    deliveries = _deliveries(
        session, Delivery.__table__.c.dedupe_key, [p.delivery_key for p in parsed if p.delivery_key]
    )
    rows = []
    for p in parsed:
        if p.at is None:
            outcome = INVALID
        else:
            outcome = APPLIED if p.delivery_key in deliveries else UNKNOWN_DELIVERY
        rows.append(
            {
                "provider": SENDGRID,
                "kind": p.kind[:64],
                "event_key": p.key[:300],
                "delivery_id": p.delivery_key[:500] if p.delivery_key else None,
                "address": p.email[:512] if p.email else None,
                "outcome": outcome,
                "payload": p.event if isinstance(p.event, dict) else {"value": p.event},
                "occurred_at": p.at,
                "received_at": now,
            }
        )
    new = _record_many(session, rows)
    fresh = []
    for p, row in zip(parsed, rows, strict=True):
        if row["event_key"] not in new:
            report.duplicates += 1
            continue
        report.count(row["outcome"])
        if p.at is not None:
            fresh.append(p)
    _sendgrid_deliveries(session, fresh, deliveries, now)
    _sendgrid_timeline(session, fresh, deliveries, now)
    _sendgrid_consents(session, fresh, deliveries, now)
    return report


def _sendgrid_deliveries(
    session: Session, fresh: list[_SendGridEvent], deliveries: dict[str, _Delivery], now: datetime
) -> None:
    """Delivery events: update the deliveries (one statement) and suppress hard-bounced addresses (one)."""
    changed: set[int] = set()
    bounced: list[tuple[str, str, str | None]] = []
    for p in fresh:
        if p.kind not in SENDGRID_DELIVERY_EVENTS:
            continue
        event = p.event
        reason = _text(event.get("reason")) or _text(event.get("response"))
        status = {"bounce": "blocked" if event.get("type") == "blocked" else "bounced"}.get(p.kind, p.kind)
        hard = (p.kind == "bounce" and status == "bounced") or (
            p.kind == "dropped" and (reason or "").lower() == SENDGRID_BOUNCED_ADDRESS.lower()
        )
        if hard and p.email:
            bounced.append((p.email, f"sendgrid:{p.kind}", reason))
        delivery = deliveries.get(p.delivery_key) if p.delivery_key else None
        if delivery is None:
            continue
        error = f"SendGrid {p.kind}" + (f": {reason}" if reason else "")
        if _advance(delivery, status, at=p.at, error=error) is not None:
            changed.add(delivery.id)
    if changed:
        rows = [
            {
                "id": delivery.id,
                "provider_status": delivery.provider_status,
                "delivered_at": delivery.delivered_at,
                "error": delivery.error,
                "updated_at": now,
            }
            for delivery in deliveries.values()
            if delivery.id in changed
        ]
        update_rows(session, Delivery.__table__, "id", rows)
    suppress_addresses(session, "email", bounced, now=now)


def _sendgrid_timeline(
    session: Session, fresh: list[_SendGridEvent], deliveries: dict[str, _Delivery], now: datetime
) -> None:
    """``open`` / ``click`` of a known delivery: ``Email Opened`` / ``Email Link Clicked``."""
    timeline: list[dict[str, Any]] = []
    for p in fresh:
        delivery = deliveries.get(p.delivery_key) if p.delivery_key else None
        if p.kind not in ("open", "click") or delivery is None:
            continue
        properties: dict[str, Any] = {"delivery_id": delivery.dedupe_key}
        if p.kind == "click":
            properties["url"] = _text(p.event.get("url"))
        if p.event.get("sg_machine_open") is True:
            properties["machine_open"] = True
        name = EMAIL_OPENED if p.kind == "open" else EMAIL_LINK_CLICKED
        timeline.append(
            _event(delivery.customer_id, p.key, name, Touchpoint.EMAIL.value, properties, p.at, now)
        )
    _insert_events(session, timeline)


def _sendgrid_consents(
    session: Session, fresh: list[_SendGridEvent], deliveries: dict[str, _Delivery], now: datetime
) -> None:
    """Opt-outs and opt-ins: the delivery's customer, else every customer with the address. Each
    customer's decisions are applied in the post's order, a run of the same status at once: an
    ``Unsubscribed`` then a ``Subscribed`` event when the post opts out then back in; several opt-outs in
    a row make one ``Unsubscribed`` event naming the decision the store keeps (the newest)."""
    wanted = [p for p in fresh if p.kind in SENDGRID_OPT_OUTS or p.kind in SENDGRID_OPT_INS]
    if not wanted:
        return
    unmatched = {
        p.email for p in wanted if p.email and (p.delivery_key is None or p.delivery_key not in deliveries)
    }
    holders = customers_with_each(session, "email", unmatched)
    # Round r holds each customer's r-th run of same-status decisions: a run is applied as one (the
    # newest decision wins, as one after the other), a change of status waits for the next round.
    rounds: list[tuple[list[ConsentDecision], dict[tuple[int, str], tuple[datetime, dict]]]] = []
    runs: dict[tuple[int, str], tuple[int, str]] = {}  # key -> (its round, the status of its run)
    channel = Channel.EMAIL.value
    for p in wanted:
        delivery = deliveries.get(p.delivery_key) if p.delivery_key else None
        customers = [delivery.customer_id] if delivery is not None else holders.get(p.email or "", [])
        status = (ConsentStatus.OPTED_OUT if p.kind in SENDGRID_OPT_OUTS else ConsentStatus.OPTED_IN).value
        properties = {"delivery_id": delivery.dedupe_key} if delivery is not None else {}
        for customer in customers:
            key = (customer, channel)
            index, run_status = runs.get(key, (-1, None))
            if run_status != status:
                index += 1
                runs[key] = (index, status)
            if index == len(rounds):
                rounds.append(([], {}))
            decisions, newest = rounds[index]
            decisions.append(ConsentDecision(customer, channel, status, f"sendgrid:{p.kind}", p.at))
            if key not in newest or p.at >= newest[key][0]:
                newest[key] = (p.at, properties)
    for decisions, newest in rounds:
        record_consents(
            session,
            decisions,
            now=now,
            touchpoint=Touchpoint.EMAIL.value,
            properties_of={key: properties for key, (_at, properties) in newest.items()},
        )


# --- Twilio ---------------------------------------------------------------------------------------------


def apply_twilio_status(
    session: Session,
    params: Mapping[str, str],
    *,
    now: datetime,
    delivery_id: str | None = None,
    default_region: str = "US",
) -> str:
    """Apply a Twilio status callback; returns its outcome (``duplicate`` when seen before)."""
    sid = _text(params.get("MessageSid")) or _text(params.get("SmsSid")) or ""
    status = (_text(params.get("MessageStatus")) or _text(params.get("SmsStatus")) or "").lower()
    code = _text(params.get("ErrorCode"))
    table = Delivery.__table__
    delivery = None
    if delivery_id:
        delivery = _deliveries(session, table.c.dedupe_key, [delivery_id]).get(delivery_id)
    if delivery is None and sid:
        delivery = _deliveries(session, table.c.provider_message_id, [sid]).get(sid)
    outcome = APPLIED if delivery is not None else UNKNOWN_DELIVERY
    phone = _text(params.get("To"))
    key = f"twilio:{sid or 'no-sid'}:{status or 'no-status'}"
    if not _record(
        session,
        provider=TWILIO,
        kind=f"status:{status}",
        key=key,
        outcome=outcome,
        payload=dict(params),
        now=now,
        delivery_id=delivery.dedupe_key if delivery is not None else delivery_id,
        address=phone,
        occurred_at=now,
    ):
        return "duplicate"
    if delivery is not None and status:
        error = f"Twilio {status}" + (f" (error {code})" if code else "")
        _update_delivery(session, delivery, status, at=now, now=now, error=error)
    if code == TWILIO_OPT_OUT_CODE:
        if delivery is not None:
            customers = [delivery.customer_id]
        else:
            number = normalize_phone(phone, default_region) if phone else None
            customers = customers_with(session, "phone", number) if number else []
        opt_out(
            session,
            customers,
            Channel.SMS.value,
            source=f"twilio:{TWILIO_OPT_OUT_CODE}",
            now=now,
            touchpoint=Touchpoint.SMS.value,
            operator=True,
            properties={"delivery_id": delivery.dedupe_key} if delivery is not None else None,
        )
    return outcome


def keyword_of(body: str | None, opt_out_type: str | None = None) -> tuple[str | None, str | None]:
    """(``stop`` / ``start`` / ``help`` or None, the keyword as matched) for an inbound message: the whole
    body, case-insensitive, whitespace and punctuation around it ignored; never a word inside a sentence.
    Twilio's ``OptOutType`` (Advanced Opt-Out, which knows the account's own keywords) wins when given."""
    word = (body or "").strip(_KEYWORD_TRIM).upper()
    kind = (opt_out_type or "").strip().upper()
    if kind in ("STOP", "START", "HELP"):
        return kind.lower(), word or kind
    if word in OPT_OUT_KEYWORDS:
        return "stop", word
    if word in OPT_IN_KEYWORDS:
        return "start", word
    if word in HELP_KEYWORDS:
        return "help", word
    return None, None


def apply_twilio_inbound(
    session: Session, params: Mapping[str, str], *, now: datetime, default_region: str = "US"
) -> str:
    """Apply an inbound SMS; returns its outcome (``duplicate`` when seen before)."""
    sid = _text(params.get("MessageSid")) or _text(params.get("SmsMessageSid")) or ""
    sender = _text(params.get("From")) or ""
    number = normalize_phone(sender, default_region) if sender else None
    customers = customers_with(session, "phone", number) if number else []
    body = params.get("Body") or ""
    keyword, word = keyword_of(body, params.get("OptOutType"))
    outcome = APPLIED if customers else UNKNOWN_NUMBER
    key = f"twilio:{sid}" if sid else _sendgrid_key(dict(params)).replace("sendgrid:", "twilio:", 1)
    if not _record(
        session,
        provider=TWILIO,
        kind=f"inbound:{keyword}" if keyword else "inbound",
        key=key,
        outcome=outcome,
        payload=dict(params),
        now=now,
        address=number or sender or None,
        occurred_at=now,
    ):
        return "duplicate"
    properties: dict[str, Any] = {"body": body[:BODY_MAX_CHARS], "message_sid": sid, "to": params.get("To")}
    if keyword:
        properties["keyword"] = keyword
    _insert_events(
        session,
        [
            _event(customer, f"{key}:{customer}", SMS_RECEIVED, Touchpoint.SMS.value, properties, now, now)
            for customer in customers
        ],
    )
    if keyword in ("stop", "start") and customers:
        decide(
            session,
            customers,
            Channel.SMS.value,
            ConsentStatus.OPTED_OUT if keyword == "stop" else ConsentStatus.OPTED_IN,
            source=f"twilio:{word}",
            now=now,
            touchpoint=Touchpoint.SMS.value,
            operator=True,
            properties={"message_sid": sid},
        )
    return outcome


# --- inspection -----------------------------------------------------------------------------------------

# Outcomes of events Omni kept without acting on them fully: a person should look at them.
UNMATCHED = (UNKNOWN_DELIVERY, UNKNOWN_NUMBER, INVALID)


def unmatched_events(
    session: Session,
    *,
    provider: str | None = None,
    outcomes: Iterable[str] = UNMATCHED,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The provider events kept with an unmatched outcome (``unknown_delivery``: no delivery has the id
    the event names; ``unknown_number``: no customer has the sender's phone; ``invalid``: not an event),
    newest first, payload included (``omni feedback unmatched``)."""
    table = ProviderEvent.__table__
    query = (
        select(table)
        .where(table.c.outcome.in_(sorted(set(outcomes))))
        .order_by(table.c.received_at.desc(), table.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if provider is not None:
        query = query.where(table.c.provider == provider)
    if since is not None:
        query = query.where(table.c.received_at >= since)
    return [dict(row._mapping) for row in session.execute(query)]
