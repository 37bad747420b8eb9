"""Validation and normalisation of Segment-spec payloads (identify, track, page, screen, group, alias).

A payload either becomes a :class:`Payload` ready to store, or raises :class:`Rejected` with a reason a
person can act on. This is the hot path of ingestion, so the checks are plain Python, not pydantic.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import phonenumbers

from omni.core.channels import CONSENT_CHANNELS, TOUCHPOINTS, Channel, Touchpoint
from omni.core.settings import Settings
from omni.core.statuses import ConsentStatus
from profiles.models import Cart, Customer, Event, Identity, IdentityKind, Order

MAX_PAYLOAD_BYTES = 32 * 1024  # Segment: 32 KB per call or batch item
# Phone numbers written without a +country code are read in this country unless the caller says
# otherwise (the CLI and flows pass OMNI_DEFAULT_PHONE_REGION): the setting's default.
DEFAULT_PHONE_REGION: str = Settings.model_fields["default_phone_region"].default


def _length(column: Any) -> int:
    """The length limit of a ``String(n)`` column of the models (PostgreSQL enforces it)."""
    return column.type.length


# Values longer than the column they are stored in are rejected, never cut: the limits come from the
# models, so a column that grows takes its check with it.
MAX_MESSAGE_ID_CHARS = _length(Event.__table__.c.message_id)
MAX_EVENT_NAME_CHARS = _length(Event.__table__.c.name)
MAX_USER_ID_CHARS = min(_length(Event.__table__.c.user_id), _length(Identity.__table__.c.value))
MAX_IDENTITY_CHARS = _length(Identity.__table__.c.value)
MAX_EMAIL_CHARS = min(_length(Customer.__table__.c.email), MAX_IDENTITY_CHARS)
MAX_CART_ID_CHARS = _length(Cart.__table__.c.cart_id)
MAX_ORDER_ID_CHARS = min(_length(Order.__table__.c.order_id), _length(Cart.__table__.c.order_id))
MAX_STORE_ID_CHARS = min(_length(Order.__table__.c.store_id), _length(Customer.__table__.c.home_store_id))
PROFILE_LIMITS = {
    name: _length(Customer.__table__.c[name])
    for name in ("first_name", "last_name", "locale", "home_store_id")
}

# Event times Omni accepts: from the Unix epoch (anything earlier is a bug upstream, and the edges of
# the calendar overflow in arithmetic) up to ``max_future`` after the time of receipt.
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
# Amounts and quantities: finite, and small enough that sums of them stay finite (and exact to the cent).
MAX_AMOUNT = 1e15

PAYLOAD_TYPES = ("identify", "track", "page", "screen", "group", "alias")
OMNI_CHANNELS = frozenset(TOUCHPOINTS)
# Segment's own ``context.channel`` values (set by its libraries) mapped onto touchpoints.
SEGMENT_CHANNELS = {
    "browser": Touchpoint.WEB.value,
    "mobile": Touchpoint.APP.value,
    "server": Touchpoint.WEB.value,
}

# identify traits that carry consent: trait -> (channel, status when true, status when false)
CONSENT_TRAITS = {
    "email_opt_out": (Channel.EMAIL, ConsentStatus.OPTED_OUT, ConsentStatus.OPTED_IN),
    "sms_opt_in": (Channel.SMS, ConsentStatus.OPTED_IN, ConsentStatus.OPTED_OUT),
    "push_opt_in": (Channel.PUSH, ConsentStatus.OPTED_IN, ConsentStatus.OPTED_OUT),
    "ads_opt_out": (Channel.ADS, ConsentStatus.OPTED_OUT, ConsentStatus.OPTED_IN),
}
CONSENT_EVENTS = {"Unsubscribed": ConsentStatus.OPTED_OUT, "Subscribed": ConsentStatus.OPTED_IN}

PRODUCT_EVENTS = frozenset({"Product Added", "Product Removed"})
ORDER_COMPLETED = "Order Completed"
ORDER_UPDATED = "Order Updated"
COMMERCE_EVENTS = PRODUCT_EVENTS | {ORDER_COMPLETED, ORDER_UPDATED}


class Rejected(ValueError):
    """A payload that cannot be stored; the message is the reason kept in ``rejected_events``."""


@dataclass(slots=True)
class ConsentChange:
    channel: str
    status: str
    source: str


@dataclass(slots=True)
class Payload:
    """A valid payload, normalised."""

    message_id: str
    type: str
    name: str | None
    channel: str
    user_id: str | None
    anonymous_id: str | None
    properties: dict
    context: dict
    occurred_at: datetime
    # (kind, value) pairs that identify the customer
    identities: list[tuple[str, str]]
    # alias: the previous id to attach to userId's customer (kind decided against the store)
    previous_id: str | None = None
    # identify: normalised profile fields and the full traits
    profile: dict[str, Any] = field(default_factory=dict)
    traits: dict | None = None
    consents: list[ConsentChange] = field(default_factory=list)
    context_timezone: str | None = None


def parse_timestamp(value: Any, field_name: str) -> datetime:
    """ISO-8601 to an aware UTC datetime; a timestamp without an offset is read as UTC (Segment sends UTC)."""
    if not isinstance(value, str) or not value.strip():
        raise Rejected(f"unparseable {field_name} {value!r}: expected an ISO-8601 string")
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text)
        parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: a time at the edge of the calendar whose offset takes it out of years 1-9999.
        raise Rejected(
            f"unparseable {field_name} {value!r}: expected ISO-8601 within years 1970-9999"
        ) from None
    if parsed < EARLIEST_TIMESTAMP:
        raise Rejected(f"{field_name} {value!r} is before {EARLIEST_TIMESTAMP:%Y-%m-%d} (UTC)")
    return parsed


def _identifier(payload: dict, key: str) -> str | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Rejected(f"{key} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if len(text) > MAX_USER_ID_CHARS:
        raise Rejected(f"{key} is longer than {MAX_USER_ID_CHARS} characters")
    return text or None


def _limited(value: str, limit: int, what: str) -> str:
    if len(value) > limit:
        raise Rejected(f"{what} is longer than {limit} characters ({len(value)})")
    return value


# Text PostgreSQL cannot store (in text or jsonb): NUL, and lone UTF-16 surrogates (not Unicode text).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# In JSON text, where such a character can come from: an escape (\u0000, \udXXX) or the raw character.
_SUSPECT_JSON = re.compile(r"\\u(?:0000|[dD][89a-fA-F])|[\x00\ud800-\udfff]")
MIN_INT, MAX_INT = -(2**63), 2**63 - 1


def _unstorable_text(text: str) -> str | None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "a lone surrogate (not Unicode text)"


def find_unstorable(value: Any, path: str = "payload") -> str | None:
    """Why ``value`` (parsed JSON, keys included) cannot be stored on every backend, or None.

    NUL characters and lone surrogates in any string or key, non-finite numbers, and integers beyond
    64 bits (which JSON columns cannot carry).
    """
    if isinstance(value, str):
        problem = _unstorable_text(value)
        return f"{path} contains {problem}" if problem else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is not a finite number ({value!r})"
    if isinstance(value, int):
        return None if MIN_INT <= value <= MAX_INT else f"{path} is an integer beyond 64 bits"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key that is not a string ({key!r})"
            problem = _unstorable_text(key)
            if problem:
                return f"a key of {path} contains {problem}"
            found = find_unstorable(item, f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = find_unstorable(item, f"{path}[{index}]")
            if found:
                return found
        return None
    return f"{path} is not a JSON value ({type(value).__name__})"


def may_be_unstorable(raw: str) -> bool:
    """Whether the JSON text ``raw`` may hold a value :func:`find_unstorable` rejects (cheap, for the
    hot path: false means it certainly does not, given ``raw`` was parsed by orjson)."""
    return _SUSPECT_JSON.search(raw) is not None


def _object(payload: dict, key: str) -> dict:
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Rejected(f"'{key}' must be a JSON object, got {type(value).__name__}")
    return value


_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+")


def normalize_email(value: Any) -> str | None:
    """The address lower-cased and trimmed, or None when ``value`` is not an email address: exactly one
    ``@`` with something on each side, no whitespace or control characters (line breaks, spaces, tabs)
    inside, at most as long as the column that stores it."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    if len(email) > MAX_EMAIL_CHARS or _EMAIL.fullmatch(email) is None:
        return None
    return email


def _email(traits: dict, where: str) -> str | None:
    """The normalised ``email`` of ``traits``; absent or empty is None, anything else that is not an
    email address rejects the payload (an identity is never made of it)."""
    value = traits.get("email")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    email = normalize_email(value)
    if email is None:
        raise Rejected(f"{where}.email {str(value)[:100]!r} is not an email address")
    return email


def normalize_phone(value: Any, default_region: str) -> str | None:
    """E.164 (``+14155550100``) or None when the number is not a valid phone number."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return _parse_phone(value, default_region)


@lru_cache(maxsize=65536)
def _parse_phone(value: str, default_region: str) -> str | None:
    # Parsing is slow (about 80 µs) and the same customer's number comes back with every identify.
    try:
        number = phonenumbers.parse(value.strip(), default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def valid_timezone(name: Any) -> str | None:
    if not isinstance(name, str) or not name or len(name) > 64:
        return None
    return name if _is_zone(name) else None


@lru_cache(maxsize=4096)
def _is_zone(name: str) -> bool:
    # Bounded: the names come from the feed, and a feed can hold any number of different wrong ones.
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def derive_message_id(payload: dict) -> str:
    """A deterministic id from the payload's content, for payloads sent without a messageId."""
    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"omni-{digest[:40]}"


def resolve_channel(context: dict) -> str:
    raw = context.get("channel")
    if raw is None or raw == "":
        return Touchpoint.WEB.value
    if not isinstance(raw, str):
        raise Rejected(f"context.channel must be a string, got {type(raw).__name__}")
    value = raw.strip().lower()
    if value in OMNI_CHANNELS:
        return value
    if value in SEGMENT_CHANNELS:
        return SEGMENT_CHANNELS[value]
    allowed = ", ".join(sorted(OMNI_CHANNELS | SEGMENT_CHANNELS.keys()))
    raise Rejected(f"unknown context.channel {raw!r} (expected one of {allowed})")


def _amount(value: Any, what: str) -> float | None:
    """A number (or numeric string) that is finite and at most :data:`MAX_AMOUNT` in size, else Rejected."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value) if abs(value) <= MAX_AMOUNT else math.inf
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None:
        raise Rejected(f"{what} must be a number, got {str(value)[:100]!r}")
    if not math.isfinite(number) or abs(number) > MAX_AMOUNT:
        raise Rejected(
            f"{what} must be a finite number of at most {MAX_AMOUNT:.0e}, got {str(value)[:100]!r}"
        )
    return number


def _number(properties: dict, key: str, event: str) -> float | None:
    return _amount(properties.get(key), f"{event}: properties.{key}")


def _id_property(properties: dict, key: str, limit: int, event: str) -> None:
    value = properties.get(key)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        _limited(str(value).strip(), limit, f"{event}: properties.{key}")


def _check_commerce(event: str, properties: dict) -> None:
    if event in PRODUCT_EVENTS:
        _number(properties, "price", event)
        quantity = _number(properties, "quantity", event)
        if quantity is not None and quantity <= 0:
            raise Rejected(f"{event}: properties.quantity must be positive, got {properties['quantity']!r}")
        if not any(properties.get(k) not in (None, "") for k in ("product_id", "sku", "name")):
            raise Rejected(f"{event} without properties.product_id, sku or name")
        _id_property(properties, "cart_id", MAX_CART_ID_CHARS, event)
    elif event == ORDER_COMPLETED:
        for key in ("total", "revenue", "subtotal"):
            _number(properties, key, event)
        products = properties.get("products")
        if products is not None and not isinstance(products, list):
            raise Rejected(f"{event}: properties.products must be an array")
        for index, product in enumerate(products or ()):
            if isinstance(product, dict):
                for key in ("price", "quantity"):
                    _amount(product.get(key), f"{event}: properties.products[{index}].{key}")
        _id_property(properties, "order_id", MAX_ORDER_ID_CHARS, event)
        _id_property(properties, "store_id", MAX_STORE_ID_CHARS, event)
        _id_property(properties, "cart_id", MAX_CART_ID_CHARS, event)
    elif event == ORDER_UPDATED:
        if properties.get("order_id") in (None, ""):
            raise Rejected(f"{event} without properties.order_id")
        _id_property(properties, "order_id", MAX_ORDER_ID_CHARS, event)
        _id_property(properties, "store_id", MAX_STORE_ID_CHARS, event)


def _profile_from_traits(traits: dict, context: dict, default_region: str) -> dict[str, Any]:
    profile: dict[str, Any] = {}
    email = _email(traits, "traits")
    if email:
        profile["email"] = email
    phone = normalize_phone(traits.get("phone"), default_region)
    if phone:
        profile["phone"] = phone
    for column, keys in (
        ("first_name", ("first_name", "firstName")),
        ("last_name", ("last_name", "lastName")),
    ):
        for key in keys:
            value = traits.get(key)
            if isinstance(value, str) and value.strip():
                profile[column] = _limited(value.strip(), PROFILE_LIMITS[column], f"traits.{key}")
                break
    locale = traits.get("locale") or context.get("locale")
    if isinstance(locale, str) and locale.strip():
        profile["locale"] = _limited(locale.strip(), PROFILE_LIMITS["locale"], "locale")
    timezone = valid_timezone(traits.get("timezone"))
    if timezone:
        profile["timezone"] = timezone
    store = traits.get("home_store_id")
    if isinstance(store, str | int) and not isinstance(store, bool) and str(store).strip():
        profile["home_store_id"] = _limited(
            str(store).strip(), PROFILE_LIMITS["home_store_id"], "traits.home_store_id"
        )
    return profile


def _identities(
    user_id: str | None,
    anonymous_id: str | None,
    traits: dict,
    context: dict,
    default_region: str,
    where: str,
) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    if user_id:
        keys.append((IdentityKind.USER_ID.value, user_id))
    if anonymous_id:
        keys.append((IdentityKind.ANONYMOUS_ID.value, anonymous_id))
    email = _email(traits, where)
    if email:
        keys.append((IdentityKind.EMAIL.value, email))
    phone = normalize_phone(traits.get("phone"), default_region)
    if phone:
        keys.append((IdentityKind.PHONE.value, phone))
    loyalty = traits.get("loyalty_id")
    if isinstance(loyalty, str | int) and not isinstance(loyalty, bool) and str(loyalty).strip():
        value = _limited(str(loyalty).strip(), MAX_IDENTITY_CHARS, f"{where}.loyalty_id")
        keys.append((IdentityKind.LOYALTY_ID.value, value))
    device = context.get("device")
    if isinstance(device, dict):
        token = device.get("token")
        if isinstance(token, str) and token.strip():
            value = _limited(token.strip(), MAX_IDENTITY_CHARS, "context.device.token")
            keys.append((IdentityKind.DEVICE_TOKEN.value, value))
    return keys


def _describe(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:g} hours"


def validate_payload(
    obj: Any,
    *,
    size: int,
    received_at: datetime,
    default_region: str,
    max_future: timedelta | None,
    raw: str | None = None,
    correct_clock_skew: bool = False,
) -> Payload:
    """Validate one Segment payload (already parsed JSON) and normalise it.

    Args:
        obj: the parsed payload.
        size: its size in bytes as received, for the 32 KB limit.
        received_at: when Omni received it; the event time when it has neither timestamp nor sentAt.
        default_region: ISO country for phone numbers without a country code.
        max_future: how far ahead of ``received_at`` the event time may be (None: no limit).
        raw: the JSON text ``obj`` was parsed from by orjson, if so: lets the walk of every value for
            text PostgreSQL cannot store be skipped when the text shows there is none.
        correct_clock_skew: the payload came straight from its sender (the tracking API): with a
            ``sentAt``, the event time is corrected for the sender's clock as Segment does,
            ``received_at - (sentAt - timestamp)`` (``timestamp`` defaults to ``sentAt``).

    Raises:
        Rejected: with the reason, when the payload cannot be stored.
    """
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number"
        )
        raise Rejected(f"expected a JSON object, got {kind}")
    if size > MAX_PAYLOAD_BYTES:
        raise Rejected(
            f"payload is {size} bytes, over the Segment limit of 32 KB ({MAX_PAYLOAD_BYTES} bytes)"
        )
    if raw is None or may_be_unstorable(raw):
        problem = find_unstorable(obj)
        if problem:
            raise Rejected(problem)

    kind = obj.get("type")
    if kind is None:
        raise Rejected("missing 'type'")
    if not isinstance(kind, str) or kind.strip().lower() not in PAYLOAD_TYPES:
        if kind == "batch":
            raise Rejected("a batch envelope cannot be nested inside another batch")
        raise Rejected(f"unknown type {kind!r} (expected one of {', '.join(PAYLOAD_TYPES)})")
    kind = kind.strip().lower()

    user_id = _identifier(obj, "userId")
    anonymous_id = _identifier(obj, "anonymousId")
    context = _object(obj, "context")
    properties = _object(obj, "properties")
    traits = _object(obj, "traits")
    context_traits = context.get("traits") if isinstance(context.get("traits"), dict) else {}

    previous_id = None
    if kind == "alias":
        previous_id = _identifier(obj, "previousId")
        if not previous_id:
            raise Rejected("alias without a previousId")
        if not user_id:
            raise Rejected("alias without a userId")
    elif not user_id and not anonymous_id:
        raise Rejected("neither userId nor anonymousId")

    name: str | None = None
    if kind == "track":
        event = obj.get("event")
        if not isinstance(event, str) or not event.strip():
            raise Rejected("track without an event name")
        name = _limited(event.strip(), MAX_EVENT_NAME_CHARS, "event")
    elif kind in ("page", "screen"):
        page = obj.get("name")
        if isinstance(page, str) and page.strip():
            name = _limited(page.strip(), MAX_EVENT_NAME_CHARS, "name")
    elif kind == "group":
        group_id = _identifier(obj, "groupId")
        if not group_id:
            raise Rejected("group without a groupId")
        traits = {**traits, "groupId": group_id}

    message_id = obj.get("messageId")
    if message_id is None or message_id == "":
        message_id = derive_message_id(obj)
    elif isinstance(message_id, bool) or not isinstance(message_id, str | int):
        raise Rejected(f"messageId must be a string, got {type(message_id).__name__}")
    else:
        message_id = str(message_id)
        if len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise Rejected(f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters")

    if obj.get("timestamp") not in (None, ""):
        occurred_at = parse_timestamp(obj["timestamp"], "timestamp")
    elif obj.get("sentAt") not in (None, ""):
        occurred_at = parse_timestamp(obj["sentAt"], "sentAt")
    else:
        occurred_at = received_at
    if correct_clock_skew and obj.get("sentAt") not in (None, ""):
        occurred_at = received_at - (parse_timestamp(obj["sentAt"], "sentAt") - occurred_at)
    if max_future is not None and occurred_at > received_at + max_future:
        raise Rejected(
            f"event time {occurred_at.isoformat()} is more than {_describe(max_future)} after the time of "
            f"receipt {received_at.isoformat()} (OMNI_INGEST_MAX_FUTURE_HOURS)"
        )

    channel = resolve_channel(context)

    consents: list[ConsentChange] = []
    profile: dict[str, Any] = {}
    identity_traits = {**context_traits, **traits} if kind == "identify" else context_traits
    if kind == "identify":
        for trait, (consent_channel, when_true, when_false) in CONSENT_TRAITS.items():
            if trait in traits:
                value = traits[trait]
                if not isinstance(value, bool):
                    raise Rejected(f"traits.{trait} must be true or false, got {value!r}")
                status = when_true if value else when_false
                consents.append(
                    ConsentChange(consent_channel.value, status.value, f"identify:traits.{trait}")
                )
        profile = _profile_from_traits(traits, context, default_region)
    elif kind == "track":
        if name in CONSENT_EVENTS:
            consent_channel = properties.get("channel")
            if consent_channel not in CONSENT_CHANNELS:
                raise Rejected(
                    f"{name}: properties.channel must be one of {', '.join(sorted(CONSENT_CHANNELS))}, "
                    f"got {consent_channel!r}"
                )
            consents.append(ConsentChange(consent_channel, CONSENT_EVENTS[name].value, f"track:{name}"))
        elif name in COMMERCE_EVENTS:
            _check_commerce(name, properties)

    if kind == "identify":
        stored = traits
    elif kind == "group":
        stored = traits
    elif kind == "alias":
        stored = {"previousId": previous_id}
    else:
        stored = properties

    return Payload(
        message_id=message_id,
        type=kind,
        name=name,
        channel=channel,
        user_id=user_id,
        anonymous_id=anonymous_id,
        properties=stored,
        context=context,
        occurred_at=occurred_at,
        identities=_identities(
            user_id,
            anonymous_id,
            identity_traits,
            context,
            default_region,
            "traits" if kind == "identify" else "context.traits",
        ),
        previous_id=previous_id,
        profile=profile,
        traits=traits if kind == "identify" else None,
        consents=consents,
        context_timezone=valid_timezone(context.get("timezone")),
    )
