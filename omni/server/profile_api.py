"""The profile API: who a customer is, for every channel's staff and tools (a contact-centre desk, a chat
tool, a store's clienteling app).

- ``GET /v1/profiles/{key}``: traits, identities, consent and reachability per channel, the open cart,
  recent orders, the journeys the customer is in and the last message Omni sent on each channel.
- ``GET /v1/profiles/{key}/timeline``: every event across channels, newest first, cursor-paged
  (``limit``, ``cursor`` from ``next_cursor``), filterable by touchpoint (``?channel=chat&channel=web``).

``key``: an email, an E.164 phone, or ``kind:value`` (:mod:`profiles.lookup`). Read keys only (the
Basic-auth user name, as Segment sends write keys). A profile lookup, and the first page of a timeline,
is recorded on the customer's timeline as ``Profile Viewed`` (``via: api``). Answers: 400 for a
malformed key, cursor or channel, 401 without a read key, 404 for a key no customer has, each with a
JSON ``detail``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from omni.core.channels import TOUCHPOINTS
from omni.server.deps import app_settings, now_of, require_key, store_engine
from profiles.apikeys import ApiKey
from profiles.db import session_scope
from profiles.lookup import (
    VIEWED_CHANNEL,
    BadCursor,
    BadKey,
    decode_cursor,
    encode_cursor,
    find_customer,
    parse_key,
    record_view,
)
from profiles.models import CartStatus
from profiles.timeline import customer_view, timeline_page
from sequences.definitions import step_label, step_labels

# Orders a profile shows (newest first); the timeline has every one.
ORDERS_SHOWN = 10
TIMELINE_DEFAULT = 50
TIMELINE_MAX = 200
# What ?channel= may name: the touchpoints, and Omni's own channel (staff looking the customer up).
TIMELINE_CHANNELS: tuple[str, ...] = (*TOUCHPOINTS, VIEWED_CHANNEL)


class Problem(BaseModel):
    detail: str = Field(description="Why the request was refused.")


class IdentityOut(BaseModel):
    kind: str = Field(description="user_id, anonymous_id, email, phone, device_token or loyalty_id.")
    value: str


class ConsentOut(BaseModel):
    status: str = Field(description="opted_in, opted_out, or default (never asked).")
    source: str | None = Field(description="Who or what recorded the decision.")
    updated_at: datetime | None = Field(description="When the decision was made.")
    allowed: bool = Field(description="Marketing on the channel is allowed by consent alone.")
    reachable: bool = Field(
        description="Omni can message the customer on the channel now: consent and address."
    )
    unreachable_reason: str | None = Field(description="Why not, when not reachable.")


class StoreRef(BaseModel):
    id: str
    name: str | None = None
    city: str | None = None
    timezone: str | None = None


class CartItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    product_id: str | None = None
    sku: str | None = None
    name: str | None = None
    price: float | None = None
    quantity: float = 0


class OpenCart(BaseModel):
    cart_id: str | None
    items: list[CartItem]
    item_count: int
    value: float
    currency: str | None
    started_at: datetime
    updated_at: datetime = Field(description="Last activity: the latest add or remove.")


class OrderOut(BaseModel):
    order_id: str
    channel: str = Field(description="The touchpoint the order was placed on (web, app, store ...).")
    store: StoreRef | None = Field(description="The store of a till sale or a pickup.")
    total: float
    currency: str | None
    status: str = Field(description="placed, ready_for_pickup or picked_up.")
    fulfillment: str = Field(description="ship, pickup or in_store.")
    placed_at: datetime
    ready_at: datetime | None
    picked_up_at: datetime | None
    items: list[dict[str, Any]] = Field(description="The products as the order event listed them.")


class JourneyOut(BaseModel):
    sequence: str
    status: str = Field(description="active, holdout (control group: sent nothing), completed or exited.")
    open: bool = Field(description="The customer is in the journey now (active or holdout).")
    step_index: int = Field(description="The step the journey is at (0: the first).")
    step: str | None = Field(
        default=None, description="The id of that step (and its channel), when the sequence is defined here."
    )
    steps: int | None = Field(default=None, description="The number of steps of the sequence.")
    next_run_at: datetime | None = Field(description="When the next step is due.")
    enrolled_at: datetime
    exited_at: datetime | None
    exit_reason: str | None


class LastMessageOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    channel: str = Field(description="email, sms, push, ads or webhook.")
    event: str = Field(description="The event recorded on the timeline (Email Sent ...).")
    sent_at: datetime
    template: str | None = None
    subject: str | None = None
    sequence: str | None = None
    campaign: str | None = None
    step: str | None = None
    audience: str | None = Field(default=None, description="ads: the ad audience synced.")
    action: str | None = Field(default=None, description="ads: add or remove.")
    delivery_id: str | None = None
    delivery_status: str | None = Field(default=None, description="The delivery's status in Omni.")


class Profile(BaseModel):
    customer_id: int = Field(description="Omni's id of the (surviving) customer.")
    merged_from: list[int] = Field(description="Customers merged into this one.")
    name: str | None
    email: str | None
    phone: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    timezone: str | None = Field(description="Theirs, their last context's, or their home store's.")
    home_store: StoreRef | None
    traits: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    identities: list[IdentityOut]
    channels_used: list[str] = Field(description="The touchpoints the customer used (not what Omni sent).")
    consents: dict[str, ConsentOut] = Field(description="Per consent channel (email, sms, push, ads).")
    open_cart: OpenCart | None
    orders: list[OrderOut] = Field(description=f"The newest {ORDERS_SHOWN} orders, newest first.")
    journeys: list[JourneyOut] = Field(description="Enrollments, newest first; open ones first in meaning.")
    last_messages: dict[str, LastMessageOut] = Field(
        description="Per send channel, the newest message Omni sent (channels never sent on are absent)."
    )


class TimelineEvent(BaseModel):
    occurred_at: datetime
    channel: str = Field(description="The touchpoint (web, app, store, call_center, chat ...), or omni.")
    type: str = Field(description="track, page, screen, identify, group or alias.")
    name: str | None
    summary: str = Field(description="One line for people.")
    properties: dict[str, Any]
    message_id: str


class TimelinePage(BaseModel):
    customer_id: int
    events: list[TimelineEvent]
    next_cursor: str | None = Field(
        description="Pass as ?cursor= for the next (older) page; null: last page."
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Malformed key, cursor or channel."},
    401: {"model": Problem, "description": "No read key, or an unknown, revoked or write key."},
    404: {"model": Problem, "description": "No customer has this key."},
}

router = APIRouter(prefix="/v1/profiles", tags=["profiles"])


def _customer_id(request: Request, session: Any, key: str) -> int:
    settings = app_settings(request)
    try:
        parsed = parse_key(key, default_region=settings.default_phone_region)
    except BadKey as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    customer_id = find_customer(session, parsed)
    if customer_id is None:
        raise HTTPException(status_code=404, detail=f"no customer has {parsed.kind} {parsed.value!r}")
    return customer_id


def load_profile(request: Request, key: str, *, api_key: ApiKey, via: str, record: bool = True) -> Profile:
    """The profile ``key`` names, the lookup recorded as ``Profile Viewed`` (``via``) when ``record``;
    HTTPException 400 / 404. Shared by the API and the customer page."""
    with session_scope(store_engine(request)) as session:
        customer_id = _customer_id(request, session, key)
        view = customer_view(session, customer_id, limit=0, orders_limit=ORDERS_SHOWN)
        if record:
            record_view(session, customer_id, source=api_key.source, via=via, now=now_of(request))
    settings = app_settings(request)
    return profile_of(view, step_labels(settings.sequences_dir, settings.audiences_dir))


def load_timeline(
    request: Request,
    key: str,
    *,
    api_key: ApiKey,
    via: str,
    limit: int,
    cursor: str | None,
    channels: list[str] | None,
    record: bool | None = None,
) -> TimelinePage:
    """A page of the timeline ``key`` names, recorded as a lookup (``via``) when ``record`` (default:
    when it is the first page; the next pages continue the same lookup)."""
    unknown = [channel for channel in channels or () if channel not in TIMELINE_CHANNELS]
    if unknown:
        raise HTTPException(
            status_code=400,
            detail=f"unknown channel {unknown[0]!r} (expected one of {', '.join(TIMELINE_CHANNELS)})",
        )
    try:
        before = decode_cursor(cursor) if cursor else None
    except BadCursor as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    with session_scope(store_engine(request)) as session:
        customer_id = _customer_id(request, session, key)
        events, position = timeline_page(session, customer_id, limit=limit, channels=channels, before=before)
        if (before is None) if record is None else record:
            record_view(session, customer_id, source=api_key.source, via=via, now=now_of(request))
    return TimelinePage(
        customer_id=customer_id,
        events=[TimelineEvent(**event) for event in events],
        next_cursor=encode_cursor(position) if position else None,
    )


def _journey(journey: dict[str, Any], steps: dict[str, tuple[str, ...]]) -> JourneyOut:
    known = steps.get(journey["sequence"])
    return JourneyOut(
        **journey,
        step=step_label(steps, journey["sequence"], journey["step_index"]),
        steps=len(known) if known else None,
    )


def _store_ref(store_id: str | None, store: dict | None) -> StoreRef | None:
    if not store_id:
        return None
    store = store or {}
    return StoreRef(
        id=store_id, name=store.get("name"), city=store.get("city"), timezone=store.get("timezone")
    )


def profile_of(view: dict[str, Any], steps: dict[str, tuple[str, ...]] | None = None) -> Profile:
    """The API's profile from :func:`profiles.timeline.customer_view`; ``steps``: the sequences' steps
    (:func:`sequences.definitions.step_labels`), to name the step each journey is at."""
    customer = view["customer"]
    open_cart = next((cart for cart in view["carts"] if cart["status"] == CartStatus.OPEN), None)
    home = view["home_store"]
    name = " ".join(part for part in (customer["first_name"], customer["last_name"]) if part) or None
    return Profile(
        customer_id=customer["id"],
        merged_from=view["merged_from"],
        name=name,
        email=customer["email"],
        phone=customer["phone"],
        first_name=customer["first_name"],
        last_name=customer["last_name"],
        locale=customer["locale"],
        timezone=view["timezone"],
        home_store=_store_ref(customer["home_store_id"], home),
        traits=customer["traits"] or {},
        created_at=customer["created_at"],
        updated_at=customer["updated_at"],
        identities=[IdentityOut(**identity) for identity in view["identities"]],
        channels_used=view["channels"],
        consents={channel: ConsentOut(**state) for channel, state in view["consents"].items()},
        open_cart=OpenCart(**open_cart) if open_cart else None,
        orders=[
            OrderOut(
                **{k: v for k, v in order.items() if k in OrderOut.model_fields},
                store=_store_ref(order["store_id"], {"name": order.get("store_name")}),
            )
            for order in view["orders"]
        ],
        journeys=[_journey(journey, steps or {}) for journey in view["journeys"]],
        last_messages={
            channel: LastMessageOut(**message) for channel, message in view["last_messages"].items()
        },
    )


ReadKey = Annotated[ApiKey, Depends(require_key("read"))]


@router.get("/{key}", response_model=Profile, responses=ERRORS, summary="A customer's profile")
def get_profile(key: str, request: Request, api_key: ReadKey) -> Profile:
    """The customer ``key`` names (an email, an E.164 phone, or ``kind:value``): who they are, consent
    and reachability per channel, open cart, recent orders, journeys, and the last message per channel."""
    return load_profile(request, key, api_key=api_key, via="api")


@router.get("/{key}/timeline", response_model=TimelinePage, responses=ERRORS, summary="A customer's timeline")
def get_timeline(
    key: str,
    request: Request,
    api_key: ReadKey,
    limit: Annotated[int, Query(ge=1, le=TIMELINE_MAX, description="Events per page.")] = TIMELINE_DEFAULT,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    channel: Annotated[
        list[str] | None, Query(description=f"Only these channels: {', '.join(TIMELINE_CHANNELS)}.")
    ] = None,
) -> TimelinePage:
    """Every event of the customer across channels, newest first, ``limit`` at a time."""
    return load_timeline(
        request, key, api_key=api_key, via="api", limit=limit, cursor=cursor, channels=channel
    )
