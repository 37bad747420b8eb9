"""Looking a customer up by a key other systems hold, as the profile API and the customer page do.

A key is one of:

- an email address (``ana@example.org``; case and surrounding spaces do not matter);
- a phone number in E.164 (``+14155550123``; a national number is read in the default phone region);
- ``kind:value`` for any identity kind (:class:`profiles.models.IdentityKind`: ``user_id:u-42``,
  ``anonymous_id:…``, ``email:…``, ``phone:…``, ``device_token:…``, ``loyalty_id:…``), or
  ``customer_id:17`` for Omni's own id.

A malformed key (no such kind, a phone number that is not one) is :class:`BadKey`, whose message names
it. A key resolves to the surviving customer: identities move to the survivor when customers merge,
and a merged-away customer's id follows ``merged_into``. The lookup is one read of the unique index
``identities (kind, value)`` and one primary-key read of ``customers`` per hop of ``merged_into``.

The CLI (:func:`resolve_customer_key`) takes every key above and, as a person types them, also a bare
customer id or any identity value without its kind (``u-42``, a loyalty number).

Every lookup through the API or the page is recorded on the customer's timeline as a ``Profile
Viewed`` event (properties ``source``: the read key's source, ``via``: ``api`` or ``page``) on the
channel :data:`VIEWED_CHANNEL`, which is no touchpoint of the customer's: staff looking a customer up is
not the customer using a channel (reports read it for first-contact resolution with context).

Cursors of the timeline are opaque strings (:func:`encode_cursor`) of an ``(occurred_at, id)`` position.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

# The event recording that someone looked the customer up, and the channel it is recorded on: not a
# touchpoint (omni.core.channels.TOUCHPOINTS), so no channel filter, audience or report counts it as one.
from omni.core.channels import OMNI_CHANNEL as VIEWED_CHANNEL
from omni.core.channels import PROFILE_VIEWED
from omni.core.clock import aware
from profiles.identity import survivor_of
from profiles.models import Customer, Event, Identity, IdentityKind
from profiles.segment import DEFAULT_PHONE_REGION, normalize_email, normalize_phone

VIEWED_VIA = ("api", "page")

CUSTOMER_ID = "customer_id"
KEY_KINDS: tuple[str, ...] = (*(kind.value for kind in IdentityKind), CUSTOMER_ID)
_PHONE_LIKE = re.compile(r"^\+?[0-9(][0-9 ().-]*$")
# How many hops of merged_into are followed (merges keep it one hop; this only bounds a corrupt chain).


class BadKey(ValueError):
    """A key that is not an email, a phone number or ``kind:value`` with a known kind."""


class BadCursor(ValueError):
    """A timeline cursor that this server did not hand out."""


@dataclass(frozen=True, slots=True)
class CustomerKey:
    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_key(key: str, *, default_region: str) -> CustomerKey:
    """The identity ``key`` names, normalised as ingest stores it; :class:`BadKey` when it names none."""
    text = (key or "").strip()
    if not text:
        raise BadKey("empty customer key")
    prefix, colon, rest = text.partition(":")
    if colon and "@" not in prefix:
        kind = prefix.strip().lower()
        if kind not in KEY_KINDS:
            raise BadKey(
                f"unknown identity kind {prefix!r} in key {key!r} (expected one of {', '.join(KEY_KINDS)})"
            )
        return _normalised(kind, rest.strip(), key, default_region)
    if "@" in text:
        return _normalised(IdentityKind.EMAIL.value, text, key, default_region)
    if _PHONE_LIKE.match(text):
        return _normalised(IdentityKind.PHONE.value, text, key, default_region)
    raise BadKey(
        f"cannot read customer key {key!r}: expected an email, an E.164 phone number (+14155550123) or "
        f"kind:value with kind one of {', '.join(KEY_KINDS)}"
    )


def _normalised(kind: str, value: str, key: str, default_region: str) -> CustomerKey:
    if not value:
        raise BadKey(f"empty {kind} in key {key!r}")
    if kind == IdentityKind.EMAIL.value:
        email = normalize_email(value)
        if email is None:
            raise BadKey(f"malformed email address {value!r} in key {key!r}")
        return CustomerKey(kind, email)
    if kind == IdentityKind.PHONE.value:
        phone = normalize_phone(value, default_region) if _PHONE_LIKE.match(value) else None
        if phone is None:
            raise BadKey(
                f"malformed phone number {value!r} in key {key!r}: expected E.164, e.g. +14155550123"
            )
        return CustomerKey(kind, phone)
    if kind == CUSTOMER_ID and not value.isdigit():
        raise BadKey(f"malformed customer id {value!r} in key {key!r}: expected digits")
    return CustomerKey(kind, value)


def resolve_customer_key(
    session: Session, key: str, *, default_region: str = DEFAULT_PHONE_REGION
) -> int | None:
    """A customer id from a key a person types at the CLI: every key the profile API takes (an email, an
    E.164 phone, ``kind:value``), and also a bare customer id or any identity value (a userId, an
    anonymousId, a loyalty number). Merged-away customers resolve to their survivor."""
    key = key.strip()
    try:
        parsed = parse_key(key, default_region=default_region)
    except BadKey:
        parsed = None
    if parsed is not None:
        found = find_customer(session, parsed)
        if found is not None:
            return found
    customers = Customer.__table__
    candidates: list[int] = []
    if key.isdigit():
        found = session.execute(select(customers.c.id).where(customers.c.id == int(key))).scalar()
        if found is not None:
            candidates.append(found)
    if not candidates:
        identities = Identity.__table__
        values = {key}
        email = normalize_email(key)
        if email:
            values.add(email)
        phone = normalize_phone(key, default_region) if any(ch.isdigit() for ch in key) else None
        if phone:
            values.add(phone)
        candidates = list(
            session.execute(
                select(identities.c.customer_id).where(identities.c.value.in_(values)).distinct()
            ).scalars()
        )
    if not candidates:
        return None
    return survivor_of(session, candidates[0])


def find_customer(session: Session, key: CustomerKey) -> int | None:
    """The id of the surviving customer ``key`` names, or None when no customer has it."""
    customers = Customer.__table__
    if key.kind == CUSTOMER_ID:
        found = session.execute(select(customers.c.id).where(customers.c.id == int(key.value))).scalar()
    else:
        identities = Identity.__table__
        found = session.execute(
            select(identities.c.customer_id).where(
                identities.c.kind == key.kind, identities.c.value == key.value
            )
        ).scalar()
    if found is None:
        return None
    return survivor_of(session, found)


def record_view(session: Session, customer_id: int, *, source: str, via: str, now: datetime) -> None:
    """Write a ``Profile Viewed`` event on the customer's timeline: ``source`` (the read key's source)
    looked them up ``via`` the API or the customer page."""
    if via not in VIEWED_VIA:
        raise ValueError(f"via must be one of {', '.join(VIEWED_VIA)}, got {via!r}")
    session.execute(
        insert(Event.__table__).values(
            message_id=f"omni:viewed:{uuid.uuid4().hex}",
            customer_id=customer_id,
            type="track",
            name=PROFILE_VIEWED,
            channel=VIEWED_CHANNEL,
            properties={"source": source, "via": via},
            context={"library": {"name": "omni"}},
            user_id=None,
            anonymous_id=None,
            occurred_at=now,
            received_at=now,
        )
    )


def encode_cursor(position: tuple[datetime, int]) -> str:
    """An opaque cursor for the timeline position ``(occurred_at, id)``."""
    at, event_id = position
    raw = orjson.dumps({"t": aware(at).isoformat(), "i": int(event_id)})
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """The position an :func:`encode_cursor` cursor holds; :class:`BadCursor` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = orjson.loads(raw)
        at = datetime.fromisoformat(data["t"])
        event_id = data["i"]
    except (binascii.Error, ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        raise BadCursor(
            f"malformed cursor {cursor[:100]!r}: pass the next_cursor of a previous page"
        ) from None
    if at.tzinfo is None or isinstance(event_id, bool) or not isinstance(event_id, int):
        raise BadCursor(f"malformed cursor {cursor[:100]!r}: pass the next_cursor of a previous page")
    return at, event_id
