"""Template contexts: what a message says about a customer, read from the store, and the rendering of a
template for a batch of customers.

Context (see :func:`build_contexts`): ``customer`` (id, first_name, last_name, name, email, phone, locale,
timezone; keys without a value are absent), ``cart`` (the open cart: items with name, sku, price,
quantity, line_total; total, currency, item_count), ``order`` (the latest pickup order not yet picked
up, with its ``store``), ``store`` (always defined, None when no store is the customer's: the store of
:func:`profiles.stores.customer_stores` — home store, else last in-store purchase or pickup, else nearest
— with name, address, full_address, phone, hours, hours_today and open_today (on the customer's local
day), opening_hours, source), ``unsubscribe_url`` (signed, see :mod:`sequences.unsubscribe`),
``links`` (shop, cart, order: UTM-tagged), ``brand``, ``now`` (in the customer's timezone,
:mod:`profiles.timezones`). Templates add the filters of :mod:`templates.filters`.

Interface for the engine and the CLI:

- ``render(session, template_name, customer_id, *, now, settings) -> Rendered`` (raises
  :class:`RenderError`);
- ``render_many(session, template_name, customer_ids, *, now, settings) -> dict[int, Rendered |
  RenderError]``: the same for a batch, with a handful of set-based queries per batch whatever its size;
  never raises for a template's fault (unknown, not compiling, over a render limit: every customer gets
  a RenderError with the reason), only for the database's;
- ``messages_of(rendered, delivery_id, *, to=None) -> list[connectors.Message]`` (push: one per device
  token, the first keeps ``delivery_id``, the others get ``delivery_id#2``, ``#3``...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from connectors.base import Message
from omni.core.batching import chunked
from omni.core.channels import CHANNELS, ChannelSpec
from omni.core.settings import Settings
from profiles.models import Cart, Customer, Identity, IdentityKind, Order
from profiles.stores import DAY_NAMES, DAYS, customer_stores, load_stores, stored_hours
from profiles.timezones import customer_timezone_sql, with_home_store, zone
from sequences.sql import Driver
from sequences.unsubscribe import make_token, unsubscribe_secret, unsubscribe_url
from templates.filters import add_utm
from templates.rendering import (
    Rendered,
    RenderError,
    TemplateInfo,
    assemble,
    describe,
    find_template,
    load_parts,
    render_parts,
    templates_dir,
)
from templates.sandbox import TIME_FAILURES_PER_BATCH

# Only the columns a context uses: whole rows cost more to read (JSON traits, timestamps) than to render.
CUSTOMER_COLUMNS = ("id", "first_name", "last_name", "email", "phone", "locale")
CART_COLUMNS = ("customer_id", "status", "items", "value", "currency", "updated_at")
ORDER_COLUMNS = (
    "customer_id",
    "order_id",
    "status",
    "store_id",
    "total",
    "currency",
    "items",
    "placed_at",
    "ready_at",
)
# The context key the device tokens of a push recipient travel under, from the query to the recipients.
DEVICE_TOKENS = "_device_tokens"


def render(
    session: Session, template_name: str, customer_id: int, *, now: datetime, settings: Settings
) -> Rendered:
    """Render ``template_name`` for one customer of the store. Raises :class:`RenderError`."""
    outcome = render_many(session, template_name, [customer_id], now=now, settings=settings)[customer_id]
    if isinstance(outcome, RenderError):
        raise outcome
    return outcome


def render_many(
    session: Session,
    template_name: str,
    customer_ids: Iterable[int],
    *,
    now: datetime,
    settings: Settings,
) -> dict[int, Rendered | RenderError]:
    """Render a template for many customers: each gets its :class:`Rendered` or its :class:`RenderError`
    (missing data, a render limit...); the others go on. A template that cannot be rendered for anyone
    (unknown, a part that does not compile) gives every customer a RenderError with the reason, and a
    template that runs out of time for :data:`~templates.sandbox.TIME_FAILURES_PER_BATCH` customers fails
    the rest of the batch at once. Nothing raises but the database (a failing query is not the customers'
    failure)."""
    ids = list(dict.fromkeys(customer_ids))
    directory = templates_dir(settings.templates_dir)
    try:
        info = find_template(template_name, directory)
    except RenderError as exc:
        return {c: RenderError(template_name, c, exc.reason) for c in ids}
    templates, broken = load_parts(info, directory=directory)
    if broken is not None:
        return {c: RenderError(info.name, c, broken) for c in ids}
    errors: dict[int, RenderError] = {}
    try:
        contexts = build_contexts(
            session, ids, now=now, channel=info.channel, template=info.name, settings=settings, errors=errors
        )
    except SQLAlchemyError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug building contexts fails the batch's renders, visibly
        reason = f"cannot build the message context: {describe(exc)}"
        return {c: RenderError(info.name, c, reason) for c in ids}
    channel = CHANNELS[info.channel]
    outcomes: dict[int, Rendered | RenderError] = {}
    timeouts: list[RenderError] = []
    for customer_id in ids:
        context = contexts.get(customer_id)
        try:
            if customer_id in errors:
                raise errors[customer_id]
            if context is None:
                raise RenderError(info.name, customer_id, "no such customer", kind="data")
            if len(timeouts) >= TIME_FAILURES_PER_BATCH:
                raise RenderError(
                    info.name,
                    customer_id,
                    f"not rendered: the template ran out of time for {len(timeouts)} customers of this "
                    f"batch ({timeouts[0].reason})",
                    kind="time",
                )
            recipients = _recipients(info, channel, context)
            parts = render_parts(
                info, context, directory=directory, customer_id=customer_id, templates=templates
            )
            outcomes[customer_id] = assemble(
                info, parts, customer_id=customer_id, recipients=recipients, context=context
            )
        except RenderError as exc:
            outcomes[customer_id] = exc
            if exc.kind == "time" and not exc.reason.startswith("not rendered"):
                timeouts.append(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. assembling an odd value: this customer's failure
            outcomes[customer_id] = RenderError(
                info.name, customer_id, f"error while rendering: {describe(exc)}"
            )
    return outcomes


def _recipients(info: TemplateInfo, channel: ChannelSpec, context: dict) -> list[str]:
    """Where the message goes: the customer's address for the channel (its ``address``)."""
    customer = context["customer"]
    address = channel.address
    if address == "none":
        # Another system, not the customer: the store of the order it is about, else the customer's store.
        store = (context.get("order") or {}).get("store") or context.get("store")
        return [f"store:{store['id']}" if store else f"customer:{customer['id']}"]
    if address == "device_token":
        found = list(context.pop(DEVICE_TOKENS, None) or [])
    else:
        found = [customer[address]] if customer.get(address) else []
    if not found:
        raise RenderError(info.name, customer["id"], f"the customer has {channel.no_address}", kind="data")
    return found


def messages_of(rendered: Rendered, delivery_id: str, *, to: str | None = None) -> list[Message]:
    """The connector messages of a render (``to`` overrides the recipients, e.g. a test send)."""
    recipients = [to] if to else rendered.recipients
    return [
        Message(
            delivery_id=delivery_id if index == 0 else f"{delivery_id}#{index + 1}",
            channel=rendered.channel,
            to=recipient,
            customer_id=rendered.customer_id,
            template=rendered.template,
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
            title=rendered.title,
            unsubscribe_url=rendered.unsubscribe_url,
            categories=(rendered.template.replace("/", "_"),),
            data=rendered.data if rendered.data is not None else {"template": rendered.template},
        )
        for index, recipient in enumerate(recipients)
    ]


# --- contexts ------------------------------------------------------------------------------------------


def build_contexts(
    session: Session,
    customer_ids: Sequence[int],
    *,
    now: datetime,
    channel: str,
    template: str,
    settings: Settings,
    errors: dict[int, RenderError] | None = None,
) -> dict[int, dict[str, Any]]:
    """The template context of each customer, loaded with a few queries per 1,000 customers.

    ``store`` is always there: the customer's store by :func:`profiles.stores.customer_stores` (home
    store, else last in-store purchase or pickup, else nearest), or None. The customer's timezone is
    :func:`profiles.timezones.customer_timezone_sql`'s (their own, their context's, their home store's,
    else the default), whichever store the message talks about. A customer whose context cannot be built
    (odd data) is left out, with the reason in ``errors``."""
    errors = {} if errors is None else errors
    secret = unsubscribe_secret(session, settings)
    campaign = template.split("/")[-1]
    customers_t, carts_t, orders_t, identities_t = (
        Customer.__table__,
        Cart.__table__,
        Order.__table__,
        Identity.__table__,
    )
    with_tokens = CHANNELS[channel].address == "device_token"
    contexts: dict[int, dict[str, Any]] = {}
    # The same for every customer of the batch: computed once (URL building was a large share of a render).
    shop_link = add_utm(settings.site_url, medium=channel, campaign=campaign)
    cart_link = add_utm(settings.site_url.rstrip("/") + "/cart", medium=channel, campaign=campaign)
    local_nows: dict[ZoneInfo, datetime] = {}
    store_dicts: dict[tuple[str, str], dict[str, Any]] = {}

    def store_context(store: Mapping[str, Any], zone: ZoneInfo, local_now: datetime) -> dict[str, Any]:
        # A store's details are the same for every customer of a timezone at ``now``: built once per
        # timezone (its "today" is the customer's local day), copied for each (a template may not change
        # what another customer's message says).
        key = (store["id"], zone.key)
        if key not in store_dicts:
            store_dicts[key] = _store_dict({**store, "source": None}, local_now)
        copied = _copy_store(store_dicts[key])
        if store.get("source"):
            copied["source"] = store["source"]
        return copied

    customer_columns = [
        *(customers_t.c[name] for name in CUSTOMER_COLUMNS),
        customer_timezone_sql(customers_t).label("zone"),
    ]
    cart_columns = [carts_t.c[name] for name in CART_COLUMNS]
    order_columns = [orders_t.c[name] for name in ORDER_COLUMNS]
    sql = Driver(session)
    for chunk in chunked(list(customer_ids)):
        customers = {
            r.id: r
            for r in session.execute(
                select(*customer_columns)
                .select_from(with_home_store(customers_t))
                .where(sql.among(customers_t.c.id, chunk))
            ).all()
        }
        carts: dict[int, Any] = {}
        # The status is checked here, not in SQL: with "status = 'open'" SQLite would walk the (status,
        # updated_at) index through every open cart in the store instead of looking up these customers.
        for row in session.execute(
            select(*cart_columns)
            .where(sql.among(carts_t.c.customer_id, chunk))
            .order_by(carts_t.c.updated_at)
        ).all():
            if row.status == "open":
                carts[row.customer_id] = row  # the latest open cart wins
        orders: dict[int, Any] = {}
        for row in session.execute(
            select(*order_columns)
            .where(
                sql.among(orders_t.c.customer_id, chunk),
                orders_t.c.fulfillment == "pickup",
                orders_t.c.status != "picked_up",
            )
            .order_by(orders_t.c.updated_at)
        ):
            current = orders.get(row.customer_id)
            # A ready order beats one still being prepared; otherwise the latest.
            if current is None or not (
                current.status == "ready_for_pickup" and row.status != "ready_for_pickup"
            ):
                orders[row.customer_id] = row
        tokens: dict[int, list[str]] = {}
        if with_tokens:
            # The kind is checked here, not in SQL (which would walk the (kind, value) index through every
            # device token in the store instead of looking up these customers).
            for row in session.execute(
                select(identities_t.c.customer_id, identities_t.c.kind, identities_t.c.value)
                .where(sql.among(identities_t.c.customer_id, chunk))
                .order_by(identities_t.c.created_at.desc(), identities_t.c.id.desc())
            ):
                if row.kind == IdentityKind.DEVICE_TOKEN.value:
                    tokens.setdefault(row.customer_id, []).append(row.value)
        their_stores = customer_stores(session, list(customers))
        order_stores = load_stores(session, {o.store_id for o in orders.values() if o.store_id})
        for customer_id in chunk:
            row = customers.get(customer_id)
            if row is None:
                continue
            try:
                customer_zone = zone(row.zone, settings.default_timezone)
                local_now = local_nows.get(customer_zone)
                if local_now is None:
                    local_now = local_nows[customer_zone] = now.astimezone(customer_zone)
                context = _customer_context(
                    row,
                    store=their_stores.get(customer_id),
                    order=orders.get(customer_id),
                    order_store=order_stores.get(orders[customer_id].store_id)
                    if customer_id in orders and orders[customer_id].store_id
                    else None,
                    cart=carts.get(customer_id),
                    zone=customer_zone,
                    local_now=local_now,
                    store_context=store_context,
                    settings=settings,
                    channel=channel,
                    campaign=campaign,
                    shop_link=shop_link,
                    cart_link=cart_link,
                    unsubscribe=unsubscribe_url(
                        settings.unsubscribe_base_url, make_token(secret, row.id, channel)
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - odd data of one customer fails that customer only
                errors[customer_id] = RenderError(
                    template, customer_id, f"cannot build the message context: {describe(exc)}", kind="data"
                )
                continue
            if with_tokens:
                context[DEVICE_TOKENS] = tokens.get(customer_id, [])
            contexts[customer_id] = context
    return contexts


def _customer_context(
    row: Any,
    *,
    store: Mapping[str, Any] | None,
    order: Any,
    order_store: Mapping[str, Any] | None,
    cart: Any,
    zone: ZoneInfo,
    local_now: datetime,
    store_context: Callable[[Mapping[str, Any], ZoneInfo, datetime], dict[str, Any]],
    settings: Settings,
    channel: str,
    campaign: str,
    shop_link: str,
    cart_link: str,
    unsubscribe: str,
) -> dict[str, Any]:
    name = " ".join(p for p in (row.first_name, row.last_name) if p) or None
    customer = {
        "id": row.id,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "name": name,
        "email": row.email,
        "phone": row.phone,
        "locale": row.locale,
        "timezone": zone.key,
    }
    links = {"shop": shop_link}
    context: dict[str, Any] = {
        "customer": {k: v for k, v in customer.items() if v is not None},
        "brand": settings.brand_name,
        "now": local_now,
        "channel": channel,
        "campaign": campaign,
        "links": links,
        "unsubscribe_url": unsubscribe,
        # Always defined, possibly None: templates say {% if store %} ... {% else %} ... {% endif %}.
        "store": store_context(store, zone, local_now) if store is not None else None,
    }
    if cart is not None and cart.items:
        items = _items(cart.items)
        context["cart"] = {
            "items": items,
            "item_count": sum(int(i.get("quantity") or 0) for i in items),
            "total": float(cart.value or 0),
            "currency": cart.currency or "USD",
            "updated_at": cart.updated_at.astimezone(zone),
        }
        links["cart"] = cart_link
    if order is not None:
        order_context = {
            "order_id": order.order_id,
            "status": order.status,
            "ready": order.status == "ready_for_pickup",
            "total": float(order.total or 0),
            "currency": order.currency or "USD",
            "items": _items(order.items),
            "placed_at": order.placed_at.astimezone(zone) if order.placed_at else None,
            "ready_at": order.ready_at.astimezone(zone) if order.ready_at else None,
        }
        if order_store is not None:
            same = context["store"] is not None and context["store"].get("id") == order_store["id"]
            order_context["store"] = context["store"] if same else store_context(order_store, zone, local_now)
        context["order"] = {k: v for k, v in order_context.items() if v is not None}
        links["order"] = add_utm(
            f"{settings.site_url.rstrip('/')}/orders/{order.order_id}",
            medium=channel,
            campaign=campaign,
        )
    return context


def _store_dict(store: Mapping[str, Any], local_now: datetime) -> dict[str, Any]:
    """A store as templates see it. Its "today" is the customer's local day (``local_now``, in the
    customer's timezone): the day the customer reads the message on."""
    hours = stored_hours(store.get("hours"))
    today = DAYS[local_now.weekday()]
    address_parts = [
        store.get("address"),
        " ".join(p for p in (store.get("postal_code"), store.get("city")) if p),
        store.get("region"),
    ]
    value = {
        "id": store.get("id"),
        "name": store.get("name"),
        "address": store.get("address"),
        "city": store.get("city"),
        "region": store.get("region"),
        "postal_code": store.get("postal_code"),
        "country": store.get("country"),
        "phone": store.get("phone"),
        "email": store.get("email"),
        "timezone": store.get("timezone"),
        "hours": hours,
        # A day the hours do not give is closed; no hours at all: unknown (left out).
        "hours_today": hours.get(today, "closed") if hours else None,
        "open_today": hours.get(today, "closed") != "closed" if hours else None,
        "opening_hours": [
            {"day": name, "hours": hours.get(key, "closed")}
            for key, name in zip(DAYS, DAY_NAMES, strict=True)
        ]
        if hours
        else None,
        "full_address": ", ".join(p for p in address_parts if p) or None,
        "source": store.get("source"),
    }
    return {k: v for k, v in value.items() if v is not None}


def _copy_store(value: dict[str, Any]) -> dict[str, Any]:
    copied = dict(value)
    if "hours" in copied:
        copied["hours"] = dict(copied["hours"])
    if "opening_hours" in copied:
        copied["opening_hours"] = [dict(day) for day in copied["opening_hours"]]
    return copied


def _items(items: list) -> list[dict[str, Any]]:
    lines = []
    for item in items or []:
        quantity = item.get("quantity") or 1
        price = float(item.get("price") or 0)
        line = {
            "product_id": item.get("product_id"),
            "sku": item.get("sku"),
            "name": item.get("name") or item.get("sku") or item.get("product_id"),
            "price": price,
            "quantity": quantity,
            "line_total": round(price * quantity, 2),
        }
        lines.append({k: v for k, v in line.items() if v is not None})
    return lines
