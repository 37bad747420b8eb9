"""The unified view of one customer: profile, identities, consent, carts, orders and the timeline of
events across every channel, newest first. What a call-centre agent sees so the customer never has to
repeat themselves."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from profiles.consent import consents_of
from profiles.models import Cart, Customer, Event, Identity, Order, Store, is_touchpoint
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
    if kind == "identify":
        return ", ".join(f"{k}={v}" for k, v in list(props.items())[:4])
    if kind == "alias":
        return f"previousId={props.get('previousId')}"
    return ", ".join(f"{k}={v}" for k, v in list(props.items())[:3] if not isinstance(v, dict | list))


def customer_view(session: Session, customer_id: int, *, limit: int = 50) -> dict[str, Any]:
    """The profile of one customer; ``timezone``: theirs by the one rule (:mod:`profiles.timezones`),
    None when none is known (the default timezone applies)."""
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
    stores = Store.__table__
    merged_ids = list(
        session.execute(select(customers.c.id).where(customers.c.merged_into == customer_id)).scalars()
    )
    store = None
    if row.home_store_id:
        store_row = session.execute(select(stores).where(stores.c.id == row.home_store_id)).first()
        store = dict(store_row._mapping) if store_row else {"id": row.home_store_id}
    timeline = session.execute(
        select(
            events.c.occurred_at,
            events.c.channel,
            events.c.type,
            events.c.name,
            events.c.properties,
            events.c.message_id,
        )
        .where(events.c.customer_id == customer_id)
        .order_by(events.c.occurred_at.desc(), events.c.id.desc())
        .limit(limit)
    ).all()
    channels = sorted(
        set(
            session.execute(
                select(events.c.channel)
                .where(events.c.customer_id == customer_id, is_touchpoint(events.c.name))
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
        "consents": consents_of(session, customer_id),
        "channels": channels,
        "carts": [
            dict(r._mapping)
            for r in session.execute(
                select(carts).where(carts.c.customer_id == customer_id).order_by(carts.c.updated_at.desc())
            )
        ],
        "orders": [
            dict(r._mapping)
            for r in session.execute(
                select(orders).where(orders.c.customer_id == customer_id).order_by(orders.c.placed_at.desc())
            )
        ],
        "events": [
            {
                "occurred_at": r.occurred_at,
                "channel": r.channel,
                "type": r.type,
                "name": r.name,
                "summary": summarize_event(r.name, r.type, r.properties),
                "properties": r.properties,
                "message_id": r.message_id,
            }
            for r in timeline
        ],
    }
