"""``omni demo``: seed a small retailer and walk the flagship journeys through simulated days.

Everything here is deterministic (a seeded :class:`random.Random`, fixed simulated times) and needs no
credentials: every channel goes to the local outbox. The command line (``omni/cli/demo.py``) only prints
what :func:`run_demo` returns.

The story:

- **Seed** (before T): three stores in three timezones (New York, Chicago, Lisbon) and ``customers``
  shoppers identified on the web, in the app or at a store's till, with email, phone, SMS / push
  consents, a home store and device tokens; browsing on web and app; past orders online and in store;
  about 45 % leave a cart online between 2 and 40 hours before T (``cart_abandoners``), a few add to
  a cart in the last hour (they become abandoners by the next tick), and about 6 % have a pickup order
  that the store marked ready (``pickup_ready``).
- **Service** (before T): about 12 % of shoppers contacted the service desk by phone (call centre) or
  chat about a ticket (``Support Contact`` with ``ticket_id``), some twice, some after contacting it on
  the other channel a few days before; every ticket is resolved (``Support Ticket Resolved``), and for
  half the desk looked the shopper up through the profile API (``Profile Viewed``).
- **Tick at T**, **T + 1 day**, **T + 3 days** (15:00 UTC: daytime in all three cities) run the
  ``abandoned_cart`` and ``pickup_ready`` sequences. In between, abandoners buy online or at the till
  with a simulated probability that is higher for those the journey messaged than for those it held
  out (:data:`BUY_IF_MESSAGED`, :data:`BUY_IF_HELD_OUT`), and pickup orders are collected: every one
  of them exits, whatever the channel.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, select

from omni.core.channels import SEND_CHANNELS, Touchpoint, spec
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Customer, Delivery, Enrollment, Event, IdentityKind, OutboxMessage, Store
from profiles.stores import parse_store, upsert_stores

# A Tuesday, 15:00 UTC: 11:00 in New York, 10:00 in Chicago, 16:00 in Lisbon (outside quiet hours).
T0 = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
TICK_OFFSETS = (("T", timedelta(0)), ("T + 1 day", timedelta(days=1)), ("T + 3 days", timedelta(days=3)))
SEQUENCES = ("abandoned_cart", "pickup_ready")
# What the shoppers receive: every marketing channel (a webhook tells a store's system, not the shopper).
CHANNELS = tuple(channel for channel in SEND_CHANNELS if spec(channel).marketing)
AUDIENCE_CHANNELS = tuple(channel for channel in CHANNELS if spec(channel).delivery == "audience")
DEFAULT_CUSTOMERS = 300
DEFAULT_SEED = 42
# Simulated shoppers (not a model of anyone's): the chance that a shopper with an abandoned cart buys
# (online or at the till) between T and T + 1 day, and between T + 1 day and T + 3 days, when the
# abandoned-cart journey messaged them, and the lower base rate when it held them out. The report at the
# end measures the difference as the journey's lift.
BUY_IF_MESSAGED = (0.30, 0.16)
BUY_IF_HELD_OUT = (0.12, 0.06)
# Service tickets: the share of shoppers with one, of those a second contact before it was resolved,
# an earlier contact on the other channel, and a desk that looked the shopper up (the profile API).
RETURNING = 0.35  # shoppers with an order last season (90 to 180 days before T)
TICKET_SHARE, SECOND_CONTACT, EARLIER_CONTACT, LOOKED_UP = 0.12, 0.3, 0.3, 0.5
SUPPORT_CONTACT, SUPPORT_RESOLVED, TICKET_ID = "Support Contact", "Support Ticket Resolved", "ticket_id"
SERVICE_CHANNELS = (Touchpoint.CALL_CENTER.value, Touchpoint.CHAT.value)
TOPICS = ("where is my order", "return", "size exchange", "store hours", "loyalty points")

STORES = [
    {
        "id": "nyc-soho",
        "name": "Omni SoHo",
        "address": "120 Prince St",
        "city": "New York",
        "country": "US",
        "timezone": "America/New_York",
        "hours": {"mon-sat": "10:00-21:00", "sun": "11:00-19:00"},
    },
    {
        "id": "chi-loop",
        "name": "Omni Loop",
        "address": "25 N State St",
        "city": "Chicago",
        "country": "US",
        "timezone": "America/Chicago",
        "hours": {"mon-sat": "10:00-20:00", "sun": "11:00-18:00"},
    },
    {
        "id": "lis-chiado",
        "name": "Omni Chiado",
        "address": "Rua Garrett 12",
        "city": "Lisbon",
        "country": "PT",
        "timezone": "Europe/Lisbon",
        "hours": {"mon-sat": "09:00-20:00"},
    },
]
STORE_NAMES = {s["id"]: s["name"] for s in STORES}
# store id -> (share of customers, phone prefix before 7 digits unique per shopper)
STORE_MIX = {"nyc-soho": (0.45, "+1212"), "chi-loop": (0.30, "+1312"), "lis-chiado": (0.25, "+35191")}
PRODUCTS = [
    ("tee-black", "Black Tee", 19.5),
    ("jeans-indigo", "Indigo Jeans", 79.0),
    ("sneaker-white", "White Sneakers", 95.0),
    ("cap-olive", "Olive Cap", 24.0),
    ("jacket-rain", "Rain Jacket", 129.0),
    ("socks-3", "Socks (3 pairs)", 12.0),
    ("tote-canvas", "Canvas Tote", 29.0),
]
FIRST_NAMES = [
    "Ana", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Inês", "Jamal", "Kim", "Luis",
    "Maya", "Nuno", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tiago", "Uma", "Victor", "Wen", "Zoe",
]  # fmt: skip
LAST_NAMES = [
    "Silva", "Johnson", "Costa", "Smith", "Garcia", "Lee", "Santos", "Brown", "Ferreira", "Nguyen",
    "Miller", "Pereira", "Davis", "Almeida", "Wilson", "Rodrigues", "Clark", "Martins",
]  # fmt: skip


@dataclass
class Shopper:
    number: int
    user_id: str
    first_name: str
    email: str | None
    store: str
    cart_at: datetime | None = None
    pickup_order: str | None = None


@dataclass
class World:
    """What was seeded, and what the simulation may still make happen."""

    shoppers: list[Shopper] = field(default_factory=list)
    payloads: int = 0

    def by_kind(self) -> dict[str, int]:
        return {
            "customers": len(self.shoppers),
            "stores": len(STORES),
            "events": self.payloads,
            "open_carts": sum(1 for s in self.shoppers if s.cart_at is not None),
            "pickup_orders_ready": sum(1 for s in self.shoppers if s.pickup_order),
        }


def _when(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A time between ``start`` and ``end``, to the second."""
    seconds = int((end - start).total_seconds())
    return start + timedelta(seconds=rng.randint(0, max(seconds, 0)))


class _Feed:
    """Builds Segment payloads with unique, stable message ids."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    def add(self, kind: str, user: str, at: datetime, channel: str, **fields: Any) -> None:
        context = fields.pop("context", {})
        context["channel"] = channel
        self.payloads.append(
            {
                "type": kind,
                "userId": user,
                "messageId": f"demo-{len(self.payloads) + 1:07d}",
                "timestamp": at.isoformat(),
                "context": context,
                **fields,
            }
        )

    def order(
        self,
        user: str,
        at: datetime,
        channel: str,
        order_id: str,
        products: list[tuple[str, str, float]],
        **properties: Any,
    ) -> None:
        self.add(
            "track",
            user,
            at,
            channel,
            event="Order Completed",
            properties={
                "order_id": order_id,
                "total": round(sum(p for _, _, p in products), 2),
                "currency": "EUR" if properties.get("store_id") == "lis-chiado" else "USD",
                "products": [{"product_id": i, "name": n, "price": p, "quantity": 1} for i, n, p in products],
                **properties,
            },
        )


def seed_retailer(
    engine: Engine, *, customers: int = DEFAULT_CUSTOMERS, now: datetime = T0, seed: int = DEFAULT_SEED
) -> World:
    """Stores and ``customers`` shoppers with web, app and store histories, all before ``now``."""
    rng = random.Random(seed)
    # Last season's orders and service tickets draw from their own stream: the rest of the story (carts,
    # pickups, who buys) is the same as without them.
    more = random.Random(seed + 7)
    with session_scope(engine) as session:
        upsert_stores(session, [parse_store(s) for s in STORES], now=now - timedelta(days=90))
    world = World()
    feed = _Feed()
    lookups: list[tuple[str, datetime]] = []
    stores = list(STORE_MIX)
    weights = [STORE_MIX[s][0] for s in stores]
    for n in range(1, customers + 1):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        store = rng.choices(stores, weights)[0]
        user = f"demo-{n:05d}"
        app_user = rng.random() < 0.5
        signup_channel = (
            Touchpoint.APP.value
            if app_user
            else rng.choice([Touchpoint.WEB.value, Touchpoint.WEB.value, Touchpoint.STORE.value])
        )
        traits: dict[str, Any] = {"first_name": first, "last_name": last, "home_store_id": store}
        email = None
        if rng.random() < 0.95:
            email = f"{first.lower().replace('ê', 'e')}.{last.lower()}.{n}@example.org"
            traits["email"] = email
        if rng.random() < 0.75:
            # Unique per shopper (7919 is prime to 10^7), so no two shoppers share a number.
            traits["phone"] = f"{STORE_MIX[store][1]}{2_000_000 + (n * 7919) % 8_000_000:07d}"
            traits["sms_opt_in"] = rng.random() < 0.6
        context: dict[str, Any] = {}
        if app_user:
            traits["push_opt_in"] = rng.random() < 0.7
            context["device"] = {"token": f"fcm-demo-{n:05d}-{rng.randrange(16**8):08x}", "type": "ios"}
        # A third are customers of last season too: signed up earlier, with an order then (retention).
        returning = more.random() < RETURNING
        signed_up = _when(rng, now - timedelta(days=60), now - timedelta(days=20))
        if returning:
            signed_up = _when(more, now - timedelta(days=300), now - timedelta(days=200))
        feed.add("identify", user, signed_up, signup_channel, traits=traits, context=context)
        # Browsing: web pages and app screens over the last month.
        for _ in range(rng.randint(1, 4)):
            at = _when(rng, now - timedelta(days=30), now - timedelta(hours=3))
            product = rng.choice(PRODUCTS)
            if app_user and rng.random() < 0.6:
                feed.add(
                    "screen",
                    user,
                    at,
                    Touchpoint.APP.value,
                    name="Product",
                    properties={"product_id": product[0]},
                )
            else:
                feed.add(
                    "page",
                    user,
                    at,
                    Touchpoint.WEB.value,
                    name="Product",
                    properties={"url": f"https://shop.example.com/p/{product[0]}", "title": product[1]},
                )
        if returning:  # last season (the report's previous period): an order, and a visit elsewhere
            at = _when(more, now - timedelta(days=170), now - timedelta(days=100))
            placed_on = more.choice([Touchpoint.WEB.value, Touchpoint.STORE.value])
            product = more.choice(PRODUCTS)
            extra = {"store_id": store} if placed_on == Touchpoint.STORE.value else {"fulfillment": "ship"}
            feed.order(user, at, placed_on, f"L{n:05d}", [product], **extra)
            # Browsed before buying at the till, or in the app before buying on the web.
            elsewhere = Touchpoint.WEB.value if placed_on == Touchpoint.STORE.value else Touchpoint.APP.value
            if more.random() < 0.5 and (app_user or elsewhere == Touchpoint.WEB.value):
                kind = "page" if elsewhere == Touchpoint.WEB.value else "screen"
                feed.add(kind, user, at - timedelta(days=2), elsewhere, name="Product", properties={})
        # Past orders, online and at the till.
        if rng.random() < 0.3:
            at = _when(rng, now - timedelta(days=19), now - timedelta(days=5))
            product = rng.choice(PRODUCTS)
            feed.add(
                "track",
                user,
                at - timedelta(minutes=20),
                Touchpoint.WEB.value,
                event="Product Added",
                properties={"product_id": product[0], "name": product[1], "price": product[2], "quantity": 1},
            )
            feed.order(user, at, Touchpoint.WEB.value, f"W{n:05d}-1", [product], fulfillment="ship")
        if rng.random() < 0.25:
            at = _when(rng, now - timedelta(days=19), now - timedelta(days=5))
            feed.order(
                user, at, Touchpoint.STORE.value, f"S{n:05d}-1", rng.sample(PRODUCTS, 2), store_id=store
            )
        shopper = Shopper(n, user, first, email, store)
        roll = rng.random()
        if roll < 0.45 or 0.45 <= roll < 0.48:
            # An open cart online or in the app: idle 2-40 hours (abandoned), or added in the last hour.
            start, end = (
                (now - timedelta(hours=40), now - timedelta(hours=2))
                if roll < 0.45
                else (now - timedelta(minutes=50), now - timedelta(minutes=5))
            )
            at = _when(rng, start, end)
            channel = Touchpoint.APP.value if app_user and rng.random() < 0.5 else Touchpoint.WEB.value
            for i, product in enumerate(rng.sample(PRODUCTS, rng.randint(1, 3))):
                feed.add(
                    "track",
                    user,
                    at - timedelta(minutes=3 * i),
                    channel,
                    event="Product Added",
                    properties={
                        "product_id": product[0],
                        "name": product[1],
                        "price": product[2],
                        "quantity": rng.choice([1, 1, 2]),
                    },
                )
            feed.add("track", user, at + timedelta(minutes=1), channel, event="Cart Viewed", properties={})
            shopper.cart_at = at
        elif roll < 0.54:
            # Ordered online for pickup; the store marked it ready a few hours ago.
            order_id = f"P{n:05d}"
            placed = _when(rng, now - timedelta(days=2), now - timedelta(hours=20))
            feed.order(
                user,
                placed,
                Touchpoint.WEB.value,
                order_id,
                [rng.choice(PRODUCTS)],
                fulfillment="pickup",
                store_id=store,
            )
            ready = _when(rng, now - timedelta(hours=6), now - timedelta(minutes=30))
            feed.add(
                "track",
                user,
                ready,
                Touchpoint.STORE.value,
                event="Order Updated",
                properties={"order_id": order_id, "status": "ready_for_pickup", "store_id": store},
            )
            shopper.pickup_order = order_id
        world.shoppers.append(shopper)
        if more.random() < TICKET_SHARE:
            lookups.extend(_service_ticket(feed, more, user, n, now=now))
    ingest_payloads(engine, feed.payloads, source="demo", now=now - timedelta(minutes=1))
    world.payloads = len(feed.payloads) + len(lookups)
    _record_lookups(engine, lookups)
    return world


def _service_ticket(
    feed: _Feed, rng: random.Random, user: str, n: int, *, now: datetime
) -> list[tuple[str, datetime]]:
    """A ticket of shopper ``n``: its contacts (call centre or chat) and its resolution, all before
    ``now``; returns the desk's lookups of the shopper (user id, when) during the first contact."""
    channel = rng.choice(SERVICE_CHANNELS)
    other = SERVICE_CHANNELS[1 - SERVICE_CHANNELS.index(channel)]
    first = _when(rng, now - timedelta(days=30), now - timedelta(days=3))
    ticket = f"T{n:05d}"
    topic = rng.choice(TOPICS)
    if rng.random() < EARLIER_CONTACT:  # asked on the other channel a few days before (its own ticket)
        earlier = first - timedelta(hours=rng.randint(6, 96))
        feed.add("track", user, earlier, other, event=SUPPORT_CONTACT, properties={TICKET_ID: f"{ticket}-0"})
        feed.add(
            "track",
            user,
            earlier + timedelta(minutes=20),
            other,
            event=SUPPORT_RESOLVED,
            properties={TICKET_ID: f"{ticket}-0"},
        )
    feed.add(
        "track", user, first, channel, event=SUPPORT_CONTACT, properties={TICKET_ID: ticket, "topic": topic}
    )
    last = first
    if rng.random() < SECOND_CONTACT:
        last = first + timedelta(hours=rng.randint(2, 40))
        feed.add(
            "track", user, last, other, event=SUPPORT_CONTACT, properties={TICKET_ID: ticket, "topic": topic}
        )
    resolved = last + timedelta(minutes=rng.randint(5, 600))
    feed.add("track", user, resolved, channel, event=SUPPORT_RESOLVED, properties={TICKET_ID: ticket})
    return [(user, first + timedelta(minutes=2))] if rng.random() < LOOKED_UP else []


def _record_lookups(engine: Engine, lookups: list[tuple[str, datetime]]) -> None:
    """The desk's lookups, recorded as the profile API records them (``Profile Viewed``)."""
    from profiles.lookup import record_view

    ids = _customer_ids(engine, [user for user, _ in lookups])
    with session_scope(engine) as session:
        for user, at in lookups:
            record_view(session, ids[user], source="service-desk", via="api", now=at)


@dataclass
class Happening:
    at: datetime
    customer_id: int | None
    shopper: Shopper
    what: str  # bought_online, bought_in_store, picked_up


def simulate_between(
    engine: Engine,
    world: World,
    *,
    start: datetime,
    end: datetime,
    rng: random.Random,
    share: float,
    held_out_share: float | None = None,
) -> list[Happening]:
    """Between two ticks: open carts convert online or at the till (with probability ``share``, or
    ``held_out_share`` for shoppers the abandoned-cart journey held out), pickups are collected."""
    feed = _Feed()
    feed.payloads = []
    happened: list[tuple[datetime, Shopper, str]] = []
    held_out = _held_out_users(engine) if held_out_share is not None else set()
    for shopper in world.shoppers:
        at = _when(rng, start + timedelta(hours=1), end - timedelta(hours=2))
        chance = held_out_share if shopper.user_id in held_out else share
        if shopper.cart_at is not None and rng.random() < chance:
            in_store = rng.random() < 0.55
            product = rng.choice(PRODUCTS)
            if in_store:
                order_id = f"S{shopper.number:05d}-{int(at.timestamp())}"
                feed.order(
                    shopper.user_id, at, Touchpoint.STORE.value, order_id, [product], store_id=shopper.store
                )
                happened.append((at, shopper, "bought_in_store"))
            else:
                order_id = f"W{shopper.number:05d}-{int(at.timestamp())}"
                feed.order(shopper.user_id, at, Touchpoint.WEB.value, order_id, [product], fulfillment="ship")
                happened.append((at, shopper, "bought_online"))
            shopper.cart_at = None
        elif shopper.pickup_order and rng.random() < 0.4:
            feed.add(
                "track",
                shopper.user_id,
                at,
                Touchpoint.STORE.value,
                event="Order Updated",
                properties={
                    "order_id": shopper.pickup_order,
                    "status": "picked_up",
                    "store_id": shopper.store,
                },
            )
            happened.append((at, shopper, "picked_up"))
            shopper.pickup_order = None
    # Message ids must not collide with earlier feeds.
    for payload in feed.payloads:
        payload["messageId"] = f"demo-{start:%Y%m%d}-{payload['messageId']}"
    ingest_payloads(engine, feed.payloads, source="demo", now=end - timedelta(minutes=30))
    ids = _customer_ids(engine, [s.user_id for _, s, _ in happened])
    return [
        Happening(at, ids.get(s.user_id), s, what) for at, s, what in sorted(happened, key=lambda h: h[0])
    ]


def _held_out_users(engine: Engine) -> set[str]:
    """User ids of the shoppers the abandoned-cart journey held out."""
    from profiles.models import Identity

    identities, enrollments = Identity.__table__, Enrollment.__table__
    with session_scope(engine) as session:
        return set(
            session.execute(
                select(identities.c.value)
                .join(enrollments, enrollments.c.customer_id == identities.c.customer_id)
                .where(
                    identities.c.kind == IdentityKind.USER_ID.value,
                    enrollments.c.sequence == "abandoned_cart",
                    enrollments.c.status == EnrollmentStatus.HOLDOUT.value,
                )
            ).scalars()
        )


def _customer_ids(engine: Engine, user_ids: list[str]) -> dict[str, int]:
    from profiles.models import Identity

    identities = Identity.__table__
    if not user_ids:
        return {}
    with session_scope(engine) as session:
        return dict(
            session.execute(
                select(identities.c.value, identities.c.customer_id).where(
                    identities.c.kind == IdentityKind.USER_ID.value, identities.c.value.in_(user_ids)
                )
            ).all()
        )


# --- what each tick did --------------------------------------------------------------------------------


def _first_line(row: Any) -> str:
    if row.channel in AUDIENCE_CHANNELS:
        action = (row.payload or {}).get("action") or "add"
        return f"{'added to' if action == 'add' else 'removed from'} ad audience {row.recipient}"
    text = row.subject or row.body or ""
    return text.strip().splitlines()[0] if text.strip() else ""


def _outbox_since(engine: Engine, after_id: int) -> list[Any]:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).where(table.c.id > after_id).order_by(table.c.id)).all()


def _exits_at(engine: Engine, at: datetime) -> list[dict[str, Any]]:
    """Enrollments that exited at ``at``, with what made them exit (the purchase's channel and store)."""
    enrollments = Enrollment.__table__
    customers = Customer.__table__
    events = Event.__table__
    out: list[dict[str, Any]] = []
    with session_scope(engine) as session:
        rows = session.execute(
            select(
                enrollments.c.sequence,
                enrollments.c.customer_id,
                enrollments.c.enrolled_at,
                enrollments.c.exit_reason,
                customers.c.first_name,
                customers.c.email,
            )
            .join(customers, customers.c.id == enrollments.c.customer_id)
            .where(enrollments.c.status == EnrollmentStatus.EXITED.value, enrollments.c.exited_at == at)
            .order_by(enrollments.c.sequence, enrollments.c.customer_id)
        ).all()
        for row in rows:
            cause = "other"
            detail = row.exit_reason or ""
            if row.exit_reason and row.exit_reason.startswith("event: Order Completed"):
                found = session.execute(
                    select(events.c.channel, events.c.properties, events.c.occurred_at)
                    .where(
                        events.c.customer_id == row.customer_id,
                        events.c.name == "Order Completed",
                        events.c.occurred_at > row.enrolled_at,
                        events.c.occurred_at <= at,
                    )
                    .order_by(events.c.occurred_at)
                    .limit(1)
                ).first()
                if found is not None:
                    props = found.properties or {}
                    if found.channel == Touchpoint.STORE:
                        cause = "bought_in_store"
                        store = STORE_NAMES.get(props.get("store_id"), props.get("store_id") or "a store")
                        detail = f"bought at the till in {store}"
                    else:
                        cause = "bought_online"
                        detail = f"bought online ({found.channel})"
                    detail += f", order {props.get('order_id')}"
            elif row.exit_reason and row.exit_reason.startswith("left audience pickup_ready"):
                cause = "picked_up"
                detail = "picked up the order in store"
            out.append(
                {
                    "sequence": row.sequence,
                    "customer_id": row.customer_id,
                    "name": row.first_name,
                    "email": row.email,
                    "reason": row.exit_reason,
                    "cause": cause,
                    "detail": detail,
                }
            )
    return out


def _max_outbox_id(engine: Engine) -> int:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        return session.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one()


TickFunction = Callable[[datetime], dict[str, Any]]


def engine_tick(engine: Engine, settings: Settings, names: tuple[str, ...] = SEQUENCES) -> TickFunction:
    """A tick through the sequence engine directly (no Prefect)."""
    from sequences.tick import run_tick

    def tick(at: datetime) -> dict[str, Any]:
        return run_tick(engine, now=at, settings=settings, names=list(names)).as_dict()

    return tick


def run_demo(
    engine: Engine,
    *,
    customers: int = DEFAULT_CUSTOMERS,
    seed: int = DEFAULT_SEED,
    start: datetime = T0,
    tick: TickFunction,
    on_tick: Callable[[dict[str, Any]], None] | None = None,
    examples: int = 3,
) -> dict[str, Any]:
    """Seed, then tick at T, T + 1 day and T + 3 days with shoppers buying in between.

    ``tick(at)`` runs one tick and returns ``TickReport.as_dict()`` (:func:`engine_tick`, or the
    ``run_sequences`` flow); ``on_tick`` receives each tick's result as soon as it is known. Returns one
    JSON-ready document.
    """
    rng = random.Random(seed + 1)
    world = seed_retailer(engine, customers=customers, now=start, seed=seed)
    ticks: list[dict[str, Any]] = []
    previous: datetime | None = None
    chances = iter(((0.0, 0.0), *zip(BUY_IF_MESSAGED, BUY_IF_HELD_OUT, strict=True)))
    for label, offset in TICK_OFFSETS:
        at = start + offset
        share, held_out_share = next(chances)
        happened: list[Happening] = []
        if previous is not None:
            happened = simulate_between(
                engine, world, start=previous, end=at, rng=rng, share=share, held_out_share=held_out_share
            )
        last_id = _max_outbox_id(engine)
        report = tick(at)
        messages = _outbox_since(engine, last_id)
        channels = Counter(m.channel for m in messages)
        shown: list[dict[str, Any]] = []
        for channel in CHANNELS:
            for m in [m for m in messages if m.channel == channel][:examples]:
                shown.append(
                    {
                        "channel": channel,
                        "customer_id": m.customer_id,
                        "to": m.recipient,
                        "template": m.template,
                        "line": _first_line(m),
                    }
                )
        result = {
            "label": label,
            "at": at.isoformat(),
            "happened": [
                {
                    "at": h.at.isoformat(),
                    "customer_id": h.customer_id,
                    "name": h.shopper.first_name,
                    "what": h.what,
                    "store": STORE_NAMES[h.shopper.store],
                }
                for h in happened
            ],
            "channels": {c: channels.get(c, 0) for c in CHANNELS},
            "messages": len(messages),
            "examples": shown,
            "exits": _exits_at(engine, at),
            "report": _jsonable(report),
        }
        ticks.append(result)
        if on_tick:
            on_tick(result)
        previous = at
    document = {
        "seed": seed,
        "world": world.by_kind(),
        "ticks": ticks,
        "summary": summarize(engine, ticks),
    }
    return document


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def summarize(engine: Engine, ticks: list[dict[str, Any]]) -> dict[str, Any]:
    enrollments = Enrollment.__table__
    outbox = OutboxMessage.__table__
    with session_scope(engine) as session:
        by_status = {
            (sequence, status): count
            for sequence, status, count in session.execute(
                select(enrollments.c.sequence, enrollments.c.status, func.count()).group_by(
                    enrollments.c.sequence, enrollments.c.status
                )
            )
        }
        holdout_messaged = session.execute(
            select(func.count(func.distinct(outbox.c.customer_id))).where(
                outbox.c.customer_id.in_(
                    select(enrollments.c.customer_id).where(
                        and_(
                            enrollments.c.status == EnrollmentStatus.HOLDOUT.value,
                            enrollments.c.sequence == "abandoned_cart",
                        )
                    )
                ),
                outbox.c.template.in_(("email/abandoned_cart",)) | outbox.c.channel.in_(AUDIENCE_CHANNELS),
            )
        ).scalar_one()
        stores = session.execute(select(func.count()).select_from(Store.__table__)).scalar_one()
        deliveries = Delivery.__table__
        # Customers a journey reached (a message sent on any of its channels), not customers enrolled.
        reached = dict(
            session.execute(
                select(enrollments.c.sequence, func.count(func.distinct(deliveries.c.customer_id)))
                .join(enrollments, enrollments.c.id == deliveries.c.enrollment_id)
                .where(
                    deliveries.c.status == DeliveryStatus.SENT.value,
                    deliveries.c.channel.not_in(AUDIENCE_CHANNELS),
                )
                .group_by(enrollments.c.sequence)
            ).all()
        )
    channels: Counter = Counter()
    causes: Counter = Counter()
    for t in ticks:
        channels.update(t["channels"])
        causes.update(e["cause"] for e in t["exits"])
    return {
        "stores": stores,
        "enrolled": {
            sequence: sum(
                c for (s, st), c in by_status.items() if s == sequence and st != EnrollmentStatus.HOLDOUT
            )
            for sequence in SEQUENCES
        },
        "reached": {sequence: reached.get(sequence, 0) for sequence in SEQUENCES},
        "held_out": by_status.get(("abandoned_cart", EnrollmentStatus.HOLDOUT.value), 0),
        "holdout_messaged": holdout_messaged,
        "active": {s: by_status.get((s, EnrollmentStatus.ACTIVE.value), 0) for s in SEQUENCES},
        "completed": {s: by_status.get((s, EnrollmentStatus.COMPLETED.value), 0) for s in SEQUENCES},
        "messages": {c: channels.get(c, 0) for c in CHANNELS},
        "exits": dict(causes),
    }


def summary_paragraph(document: dict[str, Any], seconds: float | None = None) -> str:
    s = document["summary"]
    world = document["world"]
    m = s["messages"]
    exits = s["exits"]
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    return (
        f"Omni seeded {world['customers']} customers of {world['stores']} stores "
        f"({world['events']} events from web, app and tills) and walked three simulated days{took}. "
        f"{s['enrolled']['abandoned_cart']} cart abandoners entered the abandoned-cart journey and "
        f"{s['held_out']} were held out as a control group (messaged: {s['holdout_messaged']}); "
        f"{s['reached']['pickup_ready']} of the {s['enrolled']['pickup_ready']} customers whose pickup order "
        "was ready were told so. "
        f"The channels received {m['email']} emails, {m['ads']} ad-audience updates, {m['sms']} SMS and "
        f"{m['push']} push notifications. "
        f"{sum(exits.values())} customers left a journey because they bought at a store's till "
        f"({exits.get('bought_in_store', 0)}), online ({exits.get('bought_online', 0)}) or picked up their "
        f"order ({exits.get('picked_up', 0)}): each journey stopped on every channel at once (and they left "
        "the retargeting audience). "
        f"Nothing was sent twice, to anyone without consent, or during anyone's quiet hours."
    )


def closing_report(engine: Engine, settings: Settings, *, now: datetime, directory: Any) -> dict[str, Any]:
    """The report at the end of the demo (:func:`reports.build_report` at ``now``), written as HTML into
    ``directory``: ``{"html": path, "sentences": [...], "journeys": [...]}``, each journey's lift in one
    sentence with its interval."""
    from reports import build_report
    from reports.html import report_file, write_html
    from reports.text import lift_sentence

    report = build_report(engine, settings=settings, now=now)
    path = report_file(directory, now).resolve()
    write_html(report, path)
    return {
        "html": str(path),
        "sentences": [lift_sentence(j, report.window_days) for j in report.journeys],
        "journeys": [j.to_dict() for j in report.journeys],
    }
