"""Carts and orders derived from e-commerce events, independent of the order events arrive in.

They are rebuilt from a customer's whole commerce history whenever a batch brings that customer a
commerce event (or a merge), so a late or shuffled event lands exactly where it belongs — except in
the common case that needs no history: a customer whose new events are product events and orders,
later than every commerce event stored for them, with no Order Updated in play, and not merged. Their
open cart is carried forward from its stored row (``carts.lines`` keeps every line, including those
removed down to zero) and a new order converts it, which gives the same rows a rebuild would
(:func:`plan_commerce`, :func:`apply_commerce`). The rules:

- An ``Order Completed`` on any channel (web, app, a store's POS; with or without ``cart_id``) is an
  order, and converts every cart activity before it (at the same instant counts as before).
- The open cart is the net of ``Product Added`` / ``Product Removed`` since the customer's last
  ``Order Completed``: lines keyed by product_id (else sku, else name), value Σ price × quantity over
  lines with quantity > 0, last activity the latest add / remove.
- ``Order Updated`` with ``status`` ``placed`` / ``ready_for_pickup`` / ``picked_up`` moves an order of
  the same customer (the latest update by event time wins); ``ready_for_pickup`` and ``picked_up`` mark
  it a pickup order.
- Fulfillment is ``properties.fulfillment`` when it is ``ship``, ``pickup`` or ``in_store``; else
  ``in_store`` for a purchase on the ``store`` channel and ``ship`` for the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import Touchpoint
from profiles.bulk import (
    delete_in,
    dialect_of,
    execute_sql,
    in_list,
    insert_rows,
    list_param,
    read_json,
    read_timestamp,
    sql_string,
    update_rows,
)
from profiles.models import Cart, CartStatus, Fulfillment, Order, OrderStatus
from profiles.segment import COMMERCE_EVENTS, ORDER_COMPLETED, ORDER_UPDATED, PRODUCT_EVENTS

FULFILLMENTS = tuple(f.value for f in Fulfillment)
# Events whose effect can be carried forward from the stored state (see plan_commerce); an Order
# Updated always means a rebuild.
CARRIED_EVENTS = PRODUCT_EVENTS | {ORDER_COMPLETED}
ORDER_STATUSES = tuple(s.value for s in OrderStatus)


def _num(value: Any, default: float | None = None) -> float | None:
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | dict | list):
        return None
    text = str(value).strip()
    return text or None


@dataclass
class _CartState:
    lines: dict[str, dict[str, Any]] = field(default_factory=dict)
    started_at: datetime | None = None
    updated_at: datetime | None = None
    cart_id: str | None = None
    currency: str | None = None

    def apply(self, name: str, props: dict, at: datetime) -> None:
        key = _text(props.get("product_id")) or _text(props.get("sku")) or _text(props.get("name")) or "?"
        line = self.lines.setdefault(
            key,
            {
                "product_id": _text(props.get("product_id")),
                "sku": None,
                "name": None,
                "price": None,
                "quantity": 0.0,
            },
        )
        quantity = _num(props.get("quantity"), 1.0) or 1.0
        line["quantity"] += quantity if name == "Product Added" else -quantity
        price = _num(props.get("price"))
        # The latest price seen wins (events are applied in time order).
        if price is not None:
            line["price"] = price
        for attr in ("sku", "name"):
            if _text(props.get(attr)):
                line[attr] = _text(props.get(attr))
        self.started_at = self.started_at or at
        self.updated_at = at
        self.cart_id = _text(props.get("cart_id")) or self.cart_id
        self.currency = _text(props.get("currency")) or self.currency

    @classmethod
    def from_stored(
        cls, lines: Any, started_at: Any, updated_at: Any, cart_id: str | None, currency: str | None
    ) -> _CartState:
        """The state of an open cart from its stored row (``lines`` as :meth:`row` wrote them).

        ``currency`` is stored cut to three characters; carrying the cut one forward gives the same row,
        since the row cuts it again.
        """
        return cls(
            lines={key: {**line, "quantity": float(line["quantity"])} for key, line in read_json(lines)},
            started_at=read_timestamp(started_at),
            updated_at=read_timestamp(updated_at),
            cart_id=cart_id,
            currency=currency,
        )

    def row(self, customer_id: int, status: str, **extra: Any) -> dict[str, Any]:
        items = []
        for line in self.lines.values():
            if line["quantity"] > 0:
                quantity = line["quantity"]
                items.append({**line, "quantity": int(quantity) if quantity.is_integer() else quantity})
        value = round(sum((item["price"] or 0.0) * item["quantity"] for item in items), 2)
        return {
            "customer_id": customer_id,
            "status": status,
            "cart_id": self.cart_id,
            "items": items,
            "item_count": int(sum(item["quantity"] for item in items)),
            "value": value,
            "currency": (self.currency or "")[:3] or None,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "converted_at": extra.get("converted_at"),
            "order_id": extra.get("order_id"),
            # Only an open cart is carried forward.
            "lines": [[key, line] for key, line in self.lines.items()] if status == CartStatus.OPEN else None,
        }


def _order_row(customer_id: int, event: Any) -> dict[str, Any]:
    props = event.properties or {}
    products = props.get("products") if isinstance(props.get("products"), list) else []
    items = [p for p in products if isinstance(p, dict)]
    total = _num(props.get("total"))
    if total is None:
        total = _num(props.get("revenue"))
    if total is None:
        total = sum((_num(p.get("price"), 0.0) or 0.0) * (_num(p.get("quantity"), 1.0) or 1.0) for p in items)
    fulfillment = _text(props.get("fulfillment"))
    if fulfillment not in FULFILLMENTS:
        in_store = event.channel == Touchpoint.STORE.value
        fulfillment = (Fulfillment.IN_STORE if in_store else Fulfillment.SHIP).value
    return {
        "order_id": (_text(props.get("order_id")) or event.message_id)[:255],
        "customer_id": customer_id,
        "channel": event.channel,
        "total": round(total, 2),
        "currency": (_text(props.get("currency")) or "")[:3] or None,
        "fulfillment": fulfillment,
        "store_id": _text(props.get("store_id")),
        "status": OrderStatus.PLACED.value,
        "items": items,
        "placed_at": event.occurred_at,
        "ready_at": None,
        "picked_up_at": None,
        "updated_at": event.occurred_at,
    }


def derive_commerce(customer_id: int, events: Iterable[Any]) -> tuple[list[dict], list[dict]]:
    """Carts and orders of one customer from their commerce events (any order)."""
    # Time order; at the same instant an order comes after the activity it converts.
    ordered = sorted(events, key=lambda e: (e.occurred_at, e.name == ORDER_COMPLETED, e.message_id))
    carts: list[dict] = []
    orders: dict[str, dict] = {}
    updates: list[Any] = []
    cart = _CartState()
    for event in ordered:
        props = event.properties or {}
        if event.name in PRODUCT_EVENTS:
            cart.apply(event.name, props, event.occurred_at)
        elif event.name == ORDER_COMPLETED:
            order = _order_row(customer_id, event)
            orders[order["order_id"]] = order
            if cart.started_at is not None:
                carts.append(
                    cart.row(
                        customer_id,
                        CartStatus.CONVERTED.value,
                        converted_at=event.occurred_at,
                        order_id=order["order_id"],
                    )
                )
                cart = _CartState()
        elif event.name == ORDER_UPDATED:
            updates.append(event)
    if cart.started_at is not None:
        carts.append(cart.row(customer_id, CartStatus.OPEN.value))
    for event in updates:
        props = event.properties or {}
        order = orders.get(_text(props.get("order_id")) or "")
        if order is None:
            continue
        status = _text(props.get("status"))
        if status in ORDER_STATUSES:
            order["status"] = status
            order["updated_at"] = event.occurred_at
            if status == OrderStatus.READY_FOR_PICKUP.value:
                order["ready_at"] = event.occurred_at
                order["fulfillment"] = Fulfillment.PICKUP.value
            elif status == OrderStatus.PICKED_UP.value:
                order["picked_up_at"] = event.occurred_at
                order["fulfillment"] = Fulfillment.PICKUP.value
        fulfillment = _text(props.get("fulfillment"))
        if fulfillment in FULFILLMENTS:
            order["fulfillment"] = fulfillment
        if _text(props.get("store_id")):
            order["store_id"] = _text(props.get("store_id"))
    return carts, list(orders.values())


class CommerceEvent(NamedTuple):
    name: str
    channel: str
    message_id: str
    properties: dict
    occurred_at: datetime


_NAMES_SQL = ", ".join(sql_string(name) for name in sorted(COMMERCE_EVENTS))
CART_COLUMNS = (
    "customer_id",
    "status",
    "cart_id",
    "items",
    "item_count",
    "value",
    "currency",
    "started_at",
    "updated_at",
    "converted_at",
    "order_id",
    "lines",
)
ORDER_COLUMNS = (
    "order_id",
    "customer_id",
    "channel",
    "total",
    "currency",
    "fulfillment",
    "store_id",
    "status",
    "items",
    "placed_at",
    "ready_at",
    "picked_up_at",
    "updated_at",
)
_TIMESTAMPS = frozenset({"started_at", "updated_at", "converted_at", "placed_at", "ready_at", "picked_up_at"})


def _row_key(row: Any, columns: Sequence[str]) -> tuple:
    """A derived row, or a stored one read below SQLAlchemy, as a comparable tuple of its content."""
    key = []
    for name, value in zip(columns, row, strict=True):
        if name in ("items", "lines"):
            value = orjson.dumps(read_json(value), option=orjson.OPT_SORT_KEYS)
        elif name in _TIMESTAMPS:
            value = read_timestamp(value)
        key.append(value)
    return tuple(key)


def rebuild_commerce(session: Session, customer_ids: Iterable[int]) -> None:
    """Re-derive the carts and orders of ``customer_ids`` from their events.

    The derived rows are compared with the stored ones and only the differences are written: a new
    product event usually changes the open cart alone, and rewriting every converted cart and order
    of the customer (and their index entries) each time cost more than deriving them.
    """
    ids = sorted(set(customer_ids))
    if not ids:
        return
    dialect = dialect_of(session)
    customers_in = in_list("customer_id", dialect)
    read_events = (
        "SELECT customer_id, name, channel, message_id, properties, occurred_at FROM events "
        f"WHERE {customers_in} AND name IN ({_NAMES_SQL})"
    )
    read_carts = f"SELECT id, {', '.join(CART_COLUMNS)} FROM carts WHERE {customers_in}"
    read_orders = f"SELECT {', '.join(ORDER_COLUMNS)} FROM orders WHERE {customers_in}"
    for chunk in chunked(ids, 5000):
        customers = list_param(chunk, dialect)
        by_customer: dict[int, list[CommerceEvent]] = defaultdict(list)
        for customer_id, name, channel, message_id, properties, occurred_at in execute_sql(
            session, read_events, (customers,)
        ):
            event = CommerceEvent(
                name, channel, message_id, read_json(properties) or {}, read_timestamp(occurred_at)
            )
            by_customer[customer_id].append(event)
        new_carts: list[dict] = []
        new_orders: dict[str, dict] = {}
        for customer_id, customer_events in by_customer.items():
            carts, orders = derive_commerce(customer_id, customer_events)
            new_carts.extend(carts)
            for order in orders:
                new_orders[order["order_id"]] = order

        stored_carts: dict[tuple, list[int]] = defaultdict(list)
        for row in execute_sql(session, read_carts, (customers,)):
            stored_carts[_row_key(row[1:], CART_COLUMNS)].append(row[0])
        insert_carts = []
        for cart in new_carts:
            same = stored_carts.get(_row_key([cart[c] for c in CART_COLUMNS], CART_COLUMNS))
            if same:
                same.pop()
            else:
                insert_carts.append(cart)
        stale_carts = [cart_id for cart_ids in stored_carts.values() for cart_id in cart_ids]

        stored_orders = {
            row[0]: _row_key(row, ORDER_COLUMNS) for row in execute_sql(session, read_orders, (customers,))
        }
        insert_orders = [
            order
            for order_id, order in new_orders.items()
            if stored_orders.get(order_id) != _row_key([order[c] for c in ORDER_COLUMNS], ORDER_COLUMNS)
        ]
        # Changed orders, orders no longer derived, and an order id derived for another customer
        # before (the latest derivation wins).
        stale_orders = [order_id for order_id in stored_orders if order_id not in new_orders]
        stale_orders += [order["order_id"] for order in insert_orders]

        delete_in(session, "carts", "id", stale_carts)
        delete_in(session, "orders", "order_id", stale_orders)
        insert_rows(session, Cart.__table__, insert_carts)
        insert_rows(session, Order.__table__, insert_orders)


@dataclass
class CommercePlan:
    """What a batch's commerce events need, decided before the batch's events are stored."""

    # Customers whose carts and orders are carried forward by their new events (in derivation order).
    carry: dict[int, list[CommerceEvent]]
    # Customers whose carts and orders are re-derived from their whole commerce history.
    rebuild: set[int]


def _derivation_order(event: CommerceEvent) -> tuple:
    # As derive_commerce orders events: at the same instant an order comes after the activity it converts.
    return (event.occurred_at, event.name == ORDER_COMPLETED, event.message_id)


def plan_commerce(
    session: Session, new_events: dict[int, list[CommerceEvent]], rebuild: Iterable[int]
) -> CommercePlan:
    """Split a batch's commerce customers into carried-forward carts and orders and full rebuilds.

    ``new_events`` are the batch's Product Added / Product Removed / Order Completed events by
    customer; ``rebuild`` the customers that must be re-derived anyway (an Order Updated in the batch,
    or a merge). Must run before the batch's events are stored. A customer is carried forward only
    when each of their new events is later than every commerce event already stored for them, so that
    applying the new events after the stored state is the order a rebuild would apply them in (at the
    same instant a rebuild orders by message id, so a tie means a rebuild); and, for a new order, when
    no Order Updated is stored for them (a rebuild applies updates to orders whatever their time, so
    one could be waiting for this order).
    """
    rebuild = set(rebuild)
    candidates = {c: events for c, events in new_events.items() if c not in rebuild}
    stored = _stored_commerce(session, sorted(candidates))
    carry: dict[int, list[CommerceEvent]] = {}
    for customer_id, events in candidates.items():
        events.sort(key=_derivation_order)
        latest, has_updates = stored.get(customer_id, (None, False))
        later = latest is None or events[0].occurred_at > latest
        if later and not (has_updates and any(e.name == ORDER_COMPLETED for e in events)):
            carry[customer_id] = events
        else:
            rebuild.add(customer_id)
    return CommercePlan(carry, rebuild)


def apply_commerce(session: Session, plan: CommercePlan) -> None:
    """Write a batch's carts and orders (after its events are stored), as :func:`plan_commerce` planned."""
    rebuild = plan.rebuild | _carry_forward(session, plan.carry)
    rebuild_commerce(session, rebuild)


def _stored_commerce(session: Session, customer_ids: Sequence[int]) -> dict[int, tuple[datetime, bool]]:
    """For each customer with stored commerce events: the latest one's time, and whether an Order
    Updated is among them."""
    dialect = dialect_of(session)
    sql = (
        "SELECT customer_id, max(occurred_at), "
        f"max(CASE WHEN name = {sql_string(ORDER_UPDATED)} THEN 1 ELSE 0 END) "
        f"FROM events WHERE {in_list('customer_id', dialect)} AND name IN ({_NAMES_SQL}) "
        "GROUP BY customer_id"
    )
    stored: dict[int, tuple[datetime, bool]] = {}
    for chunk in chunked(customer_ids, 5000):
        for customer_id, occurred_at, has_updates in execute_sql(session, sql, (list_param(chunk, dialect),)):
            stored[customer_id] = (read_timestamp(occurred_at), bool(has_updates))
    return stored


# What new product events change on a stored open cart (its customer, status and start stay), and
# what an order converting it changes besides.
_CARRIED = ("cart_id", "items", "item_count", "value", "currency", "updated_at", "lines")
_CONVERTED = (*_CARRIED, "status", "converted_at", "order_id")


def open_carts_sql(dialect: str) -> str:
    """The open carts of a list of customers (bound with ``list_param``), with what carrying them
    forward needs."""
    # "status || ''": not a term ix_carts_status_updated can serve, so that SQLite (without statistics)
    # looks the carts up by customer, a few rows each, instead of scanning every open cart in the store
    # for each batch (which made a 1,000,000-event ingest's carts 2.5 times slower).
    return (
        "SELECT id, customer_id, lines, started_at, updated_at, cart_id, currency FROM carts "
        f"WHERE {in_list('customer_id', dialect)} AND status || '' = '{CartStatus.OPEN.value}'"
    )


def _carry_forward(session: Session, carry: dict[int, list[CommerceEvent]]) -> set[int]:
    """Apply new commerce events to their customers' stored open carts, converting them on an order;
    return the customers that cannot be carried forward (an open cart row without ``lines``, written
    before they were kept), left for a rebuild."""
    if not carry:
        return set()
    dialect = dialect_of(session)
    sql = open_carts_sql(dialect)
    stored: dict[int, list[tuple]] = defaultdict(list)
    for chunk in chunked(sorted(carry), 5000):
        for row in execute_sql(session, sql, (list_param(chunk, dialect),)):
            stored[row[1]].append(row)
    unusable = {c for c, rows in stored.items() if len(rows) > 1 or read_json(rows[0][2]) is None}
    inserts: list[dict[str, Any]] = []
    carried: list[dict[str, Any]] = []
    converted: list[dict[str, Any]] = []
    orders: dict[str, dict[str, Any]] = {}
    for customer_id, events in carry.items():
        if customer_id in unusable:
            continue
        rows = stored.get(customer_id)
        cart = _CartState.from_stored(*rows[0][2:]) if rows else _CartState()
        stored_id = rows[0][0] if rows else None
        for event in events:
            if event.name != ORDER_COMPLETED:
                cart.apply(event.name, event.properties, event.occurred_at)
                continue
            order = _order_row(customer_id, event)
            orders[order["order_id"]] = order
            if cart.started_at is not None:
                row = cart.row(
                    customer_id,
                    CartStatus.CONVERTED.value,
                    converted_at=event.occurred_at,
                    order_id=order["order_id"],
                )
                if stored_id is None:
                    inserts.append(row)
                else:
                    converted.append({"id": stored_id, **{name: row[name] for name in _CONVERTED}})
                    stored_id = None
            cart = _CartState()
        if cart.started_at is not None:
            row = cart.row(customer_id, CartStatus.OPEN.value)
            if stored_id is None:
                inserts.append(row)
            else:
                carried.append({"id": stored_id, **{name: row[name] for name in _CARRIED}})
    update_rows(session, Cart.__table__, "id", carried)
    update_rows(session, Cart.__table__, "id", converted)
    insert_rows(session, Cart.__table__, inserts)
    # An order id derived before (for this customer or another) is replaced: the latest wins.
    delete_in(session, "orders", "order_id", sorted(orders))
    insert_rows(session, Order.__table__, list(orders.values()))
    return unusable
