"""Provider feedback: what SendGrid and Twilio tell Omni after a send, applied to the profile store.

The webhooks of ``omni serve`` (``omni.server.webhooks``) verify a post's signature and hand its events
here, inside one transaction per post. Every event is kept in ``provider_events`` as it came, unique by
its key (``sendgrid:<sg_event_id>``, ``twilio:<MessageSid>:<status>``, ``twilio:<MessageSid>``), so a
provider's retry or duplicate is processed once; events Omni cannot match stay there for inspection with
``outcome`` ``unknown_delivery`` or ``unknown_number``.

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
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import Channel, Touchpoint
from profiles.bulk import dialect_insert
from profiles.models import Delivery, Event, ProviderEvent
from profiles.segment import normalize_email, normalize_phone
from profiles.suppression import customers_with, opt_in, opt_out, suppress_address

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
            ).where(column.in_(chunk))
        )
        for row in rows:
            found[row.match] = _Delivery(
                row.id, row.dedupe_key, row.customer_id, row.channel, row.provider_status, row.error
            )
    return found


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
    if PROVIDER_RANK.get(status, 0) <= PROVIDER_RANK.get(delivery.provider_status or "", 0):
        return False
    values: dict[str, Any] = {"provider_status": status, "updated_at": now}
    if status == "delivered":
        values["delivered_at"] = at
    if status in FAILURES and error and not delivery.error:
        values["error"] = error[:2000]
        delivery.error = values["error"]
    table = Delivery.__table__
    session.execute(update(table).where(table.c.id == delivery.id).values(**values))
    delivery.provider_status = status
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


def apply_sendgrid_events(session: Session, events: list[Any], *, now: datetime) -> FeedbackReport:
    """Apply a SendGrid Event Webhook post (its JSON array), each event once."""
    report = FeedbackReport()
    wanted = [
        e.get(DELIVERY_ARG) for e in events if isinstance(e, dict) and isinstance(e.get(DELIVERY_ARG), str)
    ]
    deliveries = _deliveries(session, Delivery.__table__.c.dedupe_key, wanted)
    timeline: list[dict[str, Any]] = []
    for event in events:
        key = _sendgrid_key(event)
        if not isinstance(event, dict) or not _text(event.get("event")):
            if _record(
                session, provider=SENDGRID, kind="?", key=key, outcome=INVALID, payload=event, now=now
            ):
                report.count(INVALID)
            else:
                report.duplicates += 1
            continue
        kind = event["event"].strip()
        delivery_key = _text(event.get(DELIVERY_ARG))
        delivery = deliveries.get(delivery_key) if delivery_key else None
        email = normalize_email(event.get("email"))
        at = _sendgrid_time(event.get("timestamp"), now)
        outcome = APPLIED if delivery is not None else UNKNOWN_DELIVERY
        if not _record(
            session,
            provider=SENDGRID,
            kind=kind,
            key=key,
            outcome=outcome,
            payload=event,
            now=now,
            delivery_id=delivery_key,
            address=email,
            occurred_at=at,
        ):
            report.duplicates += 1
            continue
        report.count(outcome)
        _apply_sendgrid(session, kind, event, delivery, email, at, now, key, timeline)
    _insert_events(session, timeline)
    return report


def _apply_sendgrid(
    session: Session,
    kind: str,
    event: dict,
    delivery: _Delivery | None,
    email: str | None,
    at: datetime,
    now: datetime,
    key: str,
    timeline: list[dict[str, Any]],
) -> None:
    reason = _text(event.get("reason")) or _text(event.get("response"))
    if kind in SENDGRID_DELIVERY_EVENTS:
        status = {"bounce": "blocked" if event.get("type") == "blocked" else "bounced"}.get(kind, kind)
        hard = (kind == "bounce" and status == "bounced") or (
            kind == "dropped" and (reason or "").lower() == SENDGRID_BOUNCED_ADDRESS.lower()
        )
        if hard and email:
            suppress_address(session, "email", email, source=f"sendgrid:{kind}", now=now, detail=reason)
        if delivery is not None:
            error = f"SendGrid {kind}" + (f": {reason}" if reason else "")
            _update_delivery(session, delivery, status, at=at, now=now, error=error)
        return
    if kind in ("open", "click"):
        if delivery is None:
            return
        properties: dict[str, Any] = {"delivery_id": delivery.dedupe_key}
        if kind == "click":
            properties["url"] = _text(event.get("url"))
        if event.get("sg_machine_open") is True:
            properties["machine_open"] = True
        name = EMAIL_OPENED if kind == "open" else EMAIL_LINK_CLICKED
        timeline.append(_event(delivery.customer_id, key, name, Touchpoint.EMAIL.value, properties, at, now))
        return
    if kind in SENDGRID_OPT_OUTS or kind in SENDGRID_OPT_INS:
        if delivery is not None:
            customers = [delivery.customer_id]
        else:
            customers = customers_with(session, "email", email) if email else []
        decide = opt_out if kind in SENDGRID_OPT_OUTS else opt_in
        properties = {"delivery_id": delivery.dedupe_key} if delivery is not None else None
        decide(
            session,
            customers,
            Channel.EMAIL.value,
            source=f"sendgrid:{kind}",
            now=now,
            at=at,
            touchpoint=Touchpoint.EMAIL.value,
            properties=properties,
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
        decide = opt_out if keyword == "stop" else opt_in
        decide(
            session,
            customers,
            Channel.SMS.value,
            source=f"twilio:{word}",
            now=now,
            touchpoint=Touchpoint.SMS.value,
            operator=True,
            properties={"message_sid": sid},
        )
    return outcome
