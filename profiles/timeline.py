"""The unified view of one customer: profile, identities, consent and reachability, carts, orders, the
journeys they are in, the last message Omni sent on each channel, and the timeline of events across every
channel, newest first. What a call-centre agent sees so the customer never has to repeat themselves:
``omni profile show``, the profile API and the customer page of ``omni serve`` all read it from here.

The timeline pages by keyset on ``(occurred_at, id)``, newest first (:func:`timeline_page`): a page
after a cursor holds the same events however many arrive meanwhile (newer ones go before the first page).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, union_all
from sqlalchemy.orm import Session

from omni.core.channels import SENT_EVENTS
from omni.core.statuses import EnrollmentStatus
from profiles.consent import consents_of, reachability_of
from profiles.lookup import PROFILE_VIEWED
from profiles.models import (
    Cart,
    Customer,
    Delivery,
    Enrollment,
    Event,
    Identity,
    Order,
    Store,
    is_touchpoint,
)
from profiles.segment import CONSENT_EVENTS, ORDER_COMPLETED, ORDER_UPDATED
from profiles.timezones import customer_timezone_sql, with_home_store

PROFILE_FIELDS = (
    "id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "locale",
    "timezone",
    "context_timezone",
    "home_store_id",
    "traits",
    "created_at",
    "updated_at",
)


def _money(value: Any, props: dict) -> str:
    """``12.5`` as ``12.50`` (with the payload's currency when it names one); anything that is not a
    number is shown as it came."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return str(value)
    try:
        amount = f"{float(value):.2f}"
    except ValueError:
        return str(value)
    currency = props.get("currency")
    return f"{amount} {currency}" if isinstance(currency, str) and currency else amount


_SENT_NAMES = frozenset(SENT_EVENTS.values())


def summarize_event(name: str | None, kind: str, properties: dict) -> str:
    """A one-line human summary of an event's content."""
    props = properties or {}
    if name in ("Product Added", "Product Removed", "Product Viewed"):
        label = props.get("name") or props.get("sku") or props.get("product_id") or "?"
        quantity = props.get("quantity", 1)
        price = props.get("price")
        return f"{label} x{quantity}" + (f" @ {_money(price, props)}" if price is not None else "")
    if name == ORDER_COMPLETED:
        total = props.get("total", props.get("revenue"))
        return f"order {props.get('order_id', '?')} total {_money(total, props)}" + (
            f" at store {props['store_id']}" if props.get("store_id") else ""
        )
    if name == ORDER_UPDATED:
        return f"order {props.get('order_id', '?')} -> {props.get('status', '?')}"
    if name in CONSENT_EVENTS:
        return f"{name.lower()} from {props.get('channel')}"
    if name in _SENT_NAMES:
        # What Omni sent: the subject (or template, or ad audience) and the journey or campaign.
        what = props.get("subject") or props.get("template") or props.get("audience") or "?"
        if props.get("action") and props.get("audience"):
            what = f"{props['action']} {what}"
        origin = props.get("sequence") or props.get("campaign")
        return f"{what} ({origin}, {props.get('step')})" if origin else str(what)
    if name == PROFILE_VIEWED:
        return f"looked up by {props.get('source', '?')} via {props.get('via', '?')}"
    if kind == "identify":
        return ", ".join(f"{k}={v}" for k, v in list(props.items())[:4])
    if kind == "alias":
        return f"previousId={props.get('previousId')}"
    return ", ".join(f"{k}={v}" for k, v in list(props.items())[:3] if not isinstance(v, dict | list))


# Most enrollments a view lists (newest first); a customer is rarely in more than a few journeys at once.
JOURNEYS_SHOWN = 20


def customer_view(
    session: Session, customer_id: int, *, limit: int = 50, orders_limit: int | None = None
) -> dict[str, Any]:
    """The profile of one customer; ``timezone``: theirs by the one rule (:mod:`profiles.timezones`),
    None when none is known (the default timezone applies).

    ``limit``: the newest events to include (0: none, for callers that page the timeline with
    :func:`timeline_page`); ``orders_limit``: the newest orders (None: all).

    Every read is an indexed lookup by the customer's id: ``customers`` (primary key, and ``merged_into``
    for the customers merged into this one), ``identities`` / ``carts`` / ``orders`` / ``enrollments``
    (their ``customer_id`` index), ``consents`` (unique (customer_id, channel)), ``events`` (the index
    (customer_id, name, occurred_at): the channels used, one newest ``… Sent`` event per channel, the
    timeline), ``deliveries`` (unique dedupe_key) and ``stores`` (primary key).
    """
    customers = Customer.__table__
    row = session.execute(select(customers).where(customers.c.id == customer_id)).one()
    timezone = session.execute(
        select(customer_timezone_sql(customers))
        .select_from(with_home_store(customers))
        .where(customers.c.id == customer_id)
    ).scalar()
    identities = Identity.__table__
    events = Event.__table__
    carts = Cart.__table__
    orders = Order.__table__
    merged_ids = list(
        session.execute(
            select(customers.c.id).where(customers.c.merged_into == customer_id).order_by(customers.c.id)
        ).scalars()
    )
    order_query = (
        select(orders).where(orders.c.customer_id == customer_id).order_by(orders.c.placed_at.desc())
    )
    if orders_limit is not None:
        order_query = order_query.limit(orders_limit)
    order_rows = [dict(r._mapping) for r in session.execute(order_query)]
    store_names = _store_names(session, [row.home_store_id, *(o["store_id"] for o in order_rows)])
    for order in order_rows:
        order["store_name"] = store_names.get(order["store_id"], {}).get("name")
    store = None
    if row.home_store_id:
        store = store_names.get(row.home_store_id) or {"id": row.home_store_id}
    channels = sorted(
        set(
            session.execute(
                select(events.c.channel)
                .where(
                    events.c.customer_id == customer_id,
                    is_touchpoint(events.c.name, events.c.channel),
                )
                .distinct()
            ).scalars()
        )
    )
    return {
        "customer": {name: getattr(row, name) for name in PROFILE_FIELDS},
        "merged_from": merged_ids,
        "timezone": timezone,
        "home_store": store,
        "identities": [
            {"kind": r.kind, "value": r.value}
            for r in session.execute(
                select(identities.c.kind, identities.c.value)
                .where(identities.c.customer_id == customer_id)
                .order_by(identities.c.kind, identities.c.value)
            )
        ],
        "consents": reachability(session, customer_id),
        "channels": channels,
        "carts": [
            dict(r._mapping)
            for r in session.execute(
                select(carts).where(carts.c.customer_id == customer_id).order_by(carts.c.updated_at.desc())
            )
        ],
        "orders": order_rows,
        "journeys": journeys(session, customer_id),
        "last_messages": last_messages(session, customer_id),
        "events": timeline_page(session, customer_id, limit=limit)[0] if limit > 0 else [],
    }


def _store_names(session: Session, store_ids: Sequence[str | None]) -> dict[str, dict]:
    """store id -> the store's row, for the ids that name a known store (one primary-key lookup)."""
    wanted = sorted({store_id for store_id in store_ids if store_id})
    if not wanted:
        return {}
    stores = Store.__table__
    return {r.id: dict(r._mapping) for r in session.execute(select(stores).where(stores.c.id.in_(wanted)))}


def reachability(session: Session, customer_id: int) -> dict[str, dict]:
    """:func:`profiles.consent.consents_of` with, per channel, whether Omni can message the customer on
    it now (``reachable``) and why not (``unreachable_reason``): consent, the address the channel sends
    to and its suppression, by the one rule of :mod:`profiles.consent` (:func:`reachability_of`)."""
    consents = consents_of(session, customer_id)
    reasons = reachability_of(session, customer_id)
    for channel, state in consents.items():
        state["reachable"] = reasons[channel] is None
        state["unreachable_reason"] = reasons[channel]
    return consents


def journeys(session: Session, customer_id: int, *, limit: int = JOURNEYS_SHOWN) -> list[dict[str, Any]]:
    """The customer's enrollments, newest first: open ones (``active``, ``holdout``) are the journeys
    they are in; finished ones say how they ended."""
    enrollments = Enrollment.__table__
    rows = session.execute(
        select(
            enrollments.c.id,
            enrollments.c.sequence,
            enrollments.c.status,
            enrollments.c.step_index,
            enrollments.c.next_run_at,
            enrollments.c.enrolled_at,
            enrollments.c.exited_at,
            enrollments.c.exit_reason,
        )
        .where(enrollments.c.customer_id == customer_id)
        .order_by(enrollments.c.enrolled_at.desc(), enrollments.c.id.desc())
        .limit(limit)
    )
    open_statuses = EnrollmentStatus.open()
    return [{**dict(r._mapping), "open": r.status in open_statuses} for r in rows]


def last_messages(session: Session, customer_id: int) -> dict[str, dict[str, Any]]:
    """send channel -> the newest message Omni sent the customer on it, from the ``… Sent`` events the
    dispatcher writes (one indexed lookup per channel, in one statement), with its delivery's status.
    Channels nothing was sent on are left out."""
    events = Event.__table__
    newest = [
        select(
            events.c.name,
            events.c.channel,
            events.c.occurred_at,
            events.c.properties,
        )
        .where(events.c.customer_id == customer_id, events.c.name == name)
        .order_by(events.c.occurred_at.desc(), events.c.id.desc())
        .limit(1)
        .subquery()
        for name in SENT_EVENTS.values()
    ]
    statement = union_all(*(select(*sub.c) for sub in newest))
    by_name = {r.name: r for r in session.execute(statement)}
    deliveries = Delivery.__table__
    extra = [deliveries.c[name] for name in ("provider_status", "delivered_at") if name in deliveries.c]
    delivery_ids = [
        r.properties.get("delivery_id") for r in by_name.values() if isinstance(r.properties, dict)
    ]
    found: dict[str, Any] = {}
    if any(delivery_ids):
        found = {
            r.dedupe_key: r
            for r in session.execute(
                select(deliveries.c.dedupe_key, deliveries.c.status, *extra).where(
                    deliveries.c.dedupe_key.in_([d for d in delivery_ids if d])
                )
            )
        }
    result: dict[str, dict[str, Any]] = {}
    for channel, name in SENT_EVENTS.items():
        event = by_name.get(name)
        if event is None:
            continue
        props = event.properties if isinstance(event.properties, dict) else {}
        delivery = found.get(props.get("delivery_id"))
        result[channel] = {
            "channel": channel,
            "event": name,
            "touchpoint": event.channel,
            "sent_at": event.occurred_at,
            "template": props.get("template"),
            "subject": props.get("subject"),
            "sequence": props.get("sequence"),
            "campaign": props.get("campaign"),
            "step": props.get("step"),
            "audience": props.get("audience"),
            "action": props.get("action"),
            "delivery_id": props.get("delivery_id"),
            "delivery_status": delivery.status if delivery is not None else None,
            **{
                column.name: getattr(delivery, column.name, None) if delivery is not None else None
                for column in extra
            },
        }
    return result


def timeline_page(
    session: Session,
    customer_id: int,
    *,
    limit: int = 50,
    channels: Sequence[str] | None = None,
    before: tuple[datetime, int] | None = None,
) -> tuple[list[dict[str, Any]], tuple[datetime, int] | None]:
    """The customer's newest ``limit`` events (of ``channels`` only, when given) older than ``before``
    (an ``(occurred_at, id)`` position, exclusive), newest first; and the position of the last one when
    more follow (None: this is the last page).

    Keyset paging on the events' index (customer_id, ...): the order is ``occurred_at`` then ``id``, both
    descending, so equal times page deterministically and events arriving meanwhile never shift a page.
    """
    events = Event.__table__
    query = select(
        events.c.id,
        events.c.occurred_at,
        events.c.channel,
        events.c.type,
        events.c.name,
        events.c.properties,
        events.c.message_id,
    ).where(events.c.customer_id == customer_id)
    if channels:
        query = query.where(events.c.channel.in_(list(channels)))
    if before is not None:
        at, event_id = before
        query = query.where(
            or_(events.c.occurred_at < at, and_(events.c.occurred_at == at, events.c.id < event_id))
        )
    rows = session.execute(
        query.order_by(events.c.occurred_at.desc(), events.c.id.desc()).limit(limit + 1)
    ).all()
    page = rows[:limit]
    position = (page[-1].occurred_at, page[-1].id) if len(rows) > limit and page else None
    return [
        {
            "occurred_at": r.occurred_at,
            "channel": r.channel,
            "type": r.type,
            "name": r.name,
            "summary": summarize_event(r.name, r.type, r.properties),
            "properties": r.properties,
            "message_id": r.message_id,
        }
        for r in page
    ], position
