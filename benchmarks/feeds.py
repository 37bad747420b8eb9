"""Segment feeds for the ingest benchmark, written as JSON lines from a fixed random seed.

- :func:`write_realistic`: what a retailer's feed looks like (see its docstring): many customers with
  a few events each, anonymous browsing identified later, cross-device and phone-only and in-store
  customers, carts and orders, a small share of hostile lines, shuffled arrival.
- :func:`write_synthetic`: the earlier feed: a fixed number of events per customer, every customer
  known from their second event, few merges, interleaved round by round.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from omni.core.channels import Touchpoint

PRODUCTS = [(f"sku-{i}", f"Product {i}", round(5 + (i * 7.3) % 95, 2)) for i in range(200)]
STORES = ["nyc-soho", "nyc-uws", "bos-back-bay", "sfo-union", "lis-chiado"]
PAGES = ["Home", "Category", "Product", "Search", "Cart"]
FIRST_NAMES = ["Ann", "Ben", "Chloe", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lena"]
LAST_NAMES = ["Silva", "Smith", "Nguyen", "Okafor", "Garcia", "Kim", "Rossi", "Cohen", "Patel", "Berg"]

# The realistic feed's customers, by the share of all customers (they add up to 1). What each kind
# sends is in the RealisticFeed method of the same name.
KINDS = {
    "bounce": 0.15,  # one anonymous page view, never identified
    "returning": 0.40,  # known from an earlier visit, browse anonymously on a new device, sign in days later
    "new_signup": 0.10,  # browse anonymously, then sign up
    "cross_device": 0.06,  # email on one device, userId on another, then both on one identify
    "logged_in": 0.08,  # every event carries the userId (the app keeps them signed in)
    "phone_only": 0.12,  # SMS sign-up: identify with a phone number, no email, no userId
    "pos": 0.09,  # the store's till: loyalty enrolment and purchases, some shop online too
}
# The share of lines that are hostile: each is one rejection.
HOSTILE_SHARE = 0.005
# The events happen in the 30 days before this instant (the benchmark ingests at FEED_END + 1 day).
FEED_END = datetime(2026, 11, 30, tzinfo=UTC)
FEED_DAYS = 30
# How late events arrive after they happen: (share, mean delay in seconds). Most within a minute; app
# events queued offline and a store's end-of-day upload hours later; replays after an outage days later.
LATENESS = ((0.75, 20.0), (0.17, 6 * 3600.0), (0.08, 3 * 86400.0))


def iso(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RealisticFeed:
    """One customer's events at a time, each a payload (without ``messageId``) and its event time.

    Identifiers look like the real ones (UUID anonymous ids, opaque user ids), since their length is
    part of what the indexes hold.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.orders = 0

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def person(self, c: int) -> dict[str, Any]:
        first, last = self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)
        return {
            "user_id": f"usr_{c:08d}{self.rng.getrandbits(24):06x}",
            "email": f"{first.lower()}.{last.lower()}{c}@example.com",
            "first_name": first,
            "last_name": last,
            "phone": f"+1{self.rng.choice(['415', '212', '617', '646'])}{2_000_000 + c % 8_000_000:07d}",
            "loyalty_id": f"LOY{c:09d}",
        }

    def device(self) -> tuple[str, dict[str, Any]]:
        """A device: its anonymous id and the context its library sends."""
        if self.rng.random() < 0.6:
            return self.uuid(), {"channel": "browser", "userAgent": "Mozilla/5.0 (Macintosh) Safari/605.1.15"}
        return self.uuid(), {
            "channel": "mobile",
            "app": {"name": "Omni Shop", "version": "4.12.0"},
            "device": {"type": "ios" if self.rng.random() < 0.55 else "android"},
            "timezone": "America/New_York",
        }

    def browse(self, who: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        """A page view, a product view or (one time in four) an add to cart."""
        roll = self.rng.random()
        sku, name, price = self.rng.choice(PRODUCTS)
        if roll < 0.45:
            page = self.rng.choice(PAGES)
            kind = "page" if context["channel"] == "browser" else "screen"
            return {
                "type": kind,
                **who,
                "name": page,
                "properties": {"path": f"/{page.lower()}"},
                "context": context,
            }
        if roll < 0.75:
            return {
                "type": "track",
                **who,
                "event": "Product Viewed",
                "properties": {"product_id": sku, "name": name, "price": price},
                "context": context,
            }
        return self.product("Product Added", who, context)

    def product(self, event: str, who: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
        sku, name, price = self.rng.choice(PRODUCTS)
        properties = {
            "product_id": sku,
            "name": name,
            "price": price,
            "quantity": 1 + (self.rng.random() < 0.2),
        }
        if event == "Product Removed":
            properties = {"product_id": sku, "quantity": 1}
        return {"type": "track", **who, "event": event, "properties": properties, "context": context}

    def order(self, who: dict[str, Any], context: dict[str, Any], store: str | None = None) -> dict[str, Any]:
        self.orders += 1
        lines = [self.rng.choice(PRODUCTS) for _ in range(1 + (self.rng.random() < 0.4))]
        products = [
            {"product_id": sku, "name": name, "price": price, "quantity": 1} for sku, name, price in lines
        ]
        properties: dict[str, Any] = {
            "order_id": f"ord_{self.orders:09d}",
            "total": round(sum(price for _, _, price in lines), 2),
            "currency": "USD",
            "products": products,
        }
        if store:
            properties.update(store_id=store, fulfillment="in_store")
        return {
            "type": "track",
            **who,
            "event": "Order Completed",
            "properties": properties,
            "context": context,
        }

    def cart(self, who: dict[str, Any], context: dict[str, Any]) -> list[dict[str, Any]]:
        """A signed-in shopping session: adds, sometimes a removal, then checkout and (mostly) an order."""
        events = [self.product("Product Added", who, context)]
        roll = self.rng.random()
        if roll < 0.15:
            events.append(self.product("Product Removed", who, context))
        elif roll < 0.55:
            events.append(
                {
                    "type": "track",
                    **who,
                    "event": "Checkout Started",
                    "properties": {"value": 42.0},
                    "context": context,
                }
            )
            if self.rng.random() < 0.7:
                events.append(self.order(who, context))
        return events

    def identify(
        self, who: dict[str, Any], traits: dict[str, Any], context: dict[str, Any]
    ) -> dict[str, Any]:
        return {"type": "identify", **who, "traits": traits, "context": context}

    def sign_in(self, p: dict[str, Any], anon: str, context: dict[str, Any]) -> dict[str, Any]:
        """identify with userId + anonymousId + email: the anonymous profile joins the known one."""
        traits = {"email": p["email"], "first_name": p["first_name"], "last_name": p["last_name"]}
        if self.rng.random() < 0.5:
            traits["email_opt_out"] = self.rng.random() < 0.1
        return self.identify({"userId": p["user_id"], "anonymousId": anon}, traits, context)

    # One method per kind of customer: their sessions (days apart), each a list of events in the order
    # they happen (seconds apart).

    def bounce(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        anon, context = self.device()
        return [[self.browse({"anonymousId": anon}, context)]]

    def returning(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Known from an earlier visit (signed in, or an order), so the sign-in merges two profiles."""
        _, earlier = self.device()
        known = {"userId": p["user_id"]}
        before = self.browse(known, earlier) if self.rng.random() < 0.7 else self.order(known, earlier)
        anon, context = self.device()
        browsing = self.browse({"anonymousId": anon}, context)
        after = self.cart(known, context) if self.rng.random() < 0.1 else []
        return [[before], [browsing], [self.sign_in(p, anon, context), *after]]

    def new_signup(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        anon, context = self.device()
        browsing = [self.browse({"anonymousId": anon}, context) for _ in range(1 + (self.rng.random() < 0.1))]
        after = self.cart({"userId": p["user_id"]}, context) if self.rng.random() < 0.2 else []
        return [browsing, [self.sign_in(p, anon, context), *after]]

    def cross_device(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        web, web_context = self.device()
        newsletter = self.identify({"anonymousId": web}, {"email": p["email"]}, web_context)
        app, app_context = self.device()
        login = self.identify({"userId": p["user_id"], "anonymousId": app}, {}, app_context)
        profile = self.identify(
            {"userId": p["user_id"]}, {"email": p["email"], "first_name": p["first_name"]}, app_context
        )
        return [[newsletter], [login], [profile]]

    def logged_in(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        _, context = self.device()
        who = {"userId": p["user_id"]}
        events = [self.browse(who, context)]
        if self.rng.random() < 0.4:
            events += self.cart(who, context)
        return [events]

    def phone_only(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        sms = {"channel": "sms"}
        subscriber = {"anonymousId": f"sms_{self.uuid()}"}
        sessions = [[self.identify(subscriber, {"phone": p["phone"], "sms_opt_in": True}, sms)]]
        if self.rng.random() < 0.1:
            sessions.append([{"type": "track", **subscriber, "event": "SMS Link Clicked", "context": sms}])
        if self.rng.random() < 0.15:  # signs up on the web later with the same phone number
            anon, context = self.device()
            link = self.sign_in(p, anon, context)
            link["traits"]["phone"] = p["phone"]
            sessions += [[self.browse({"anonymousId": anon}, context)], [link]]
        return sessions

    def pos(self, p: dict[str, Any]) -> list[list[dict[str, Any]]]:
        store = self.rng.choice(STORES)
        till = {"channel": "store", "traits": {"loyalty_id": p["loyalty_id"]}}
        traits = {"loyalty_id": p["loyalty_id"], "first_name": p["first_name"], "home_store_id": store}
        if self.rng.random() < 0.5:
            traits["email"] = p["email"]
        enrolment = self.identify({"anonymousId": f"till_{self.uuid()}"}, traits, {"channel": "store"})
        # Each receipt has an id of its own; the loyalty card scanned at the till says whose it is.
        sessions = [[enrolment, self.order({"anonymousId": f"rcpt_{self.uuid()}"}, till, store)]]
        if self.rng.random() < 0.2:
            sessions.append([self.order({"anonymousId": f"rcpt_{self.uuid()}"}, till, store)])
        if self.rng.random() < 0.15:  # also shops online, and links the loyalty card to the account
            anon, context = self.device()
            link = self.sign_in(p, anon, context)
            link["traits"]["loyalty_id"] = p["loyalty_id"]
            sessions += [[self.browse({"anonymousId": anon}, context)], [link]]
        return sessions


def hostile(rng: random.Random, n: int) -> bytes:
    """One line Omni must reject: invalid JSON, no ids, wrong types, over 32 KB, or not UTF-8."""
    kind = n % 5
    base = {
        "type": "track",
        "anonymousId": f"hostile-{n}",
        "event": "Product Viewed",
        "messageId": f"hostile-{n}",
    }
    if kind == 0:
        return json.dumps(base).encode()[: rng.randrange(10, 60)]  # cut short
    if kind == 1:
        return json.dumps({"type": "page", "name": "Home", "messageId": f"hostile-{n}"}).encode()
    if kind == 2:
        wrong = rng.choice([{"userId": {"id": 7}}, {"timestamp": 1_700_000_000}, {"event": ["Viewed"]}])
        return json.dumps({**base, **wrong}).encode()
    if kind == 3:
        return json.dumps({**base, "properties": {"blob": "x" * 40_000}}).encode()
    return (
        json.dumps({**base, "properties": {"name": "Caf\u00e9"}}).encode().replace(b"Caf\\u00e9", b"Caf\xe9")
    )


def write_realistic(path: Path, customers: int, seed: int = 7) -> Counter[str]:
    """Write the realistic feed of ``customers`` customers to ``path``; returns counts by kind of line.

    Each customer is one kind of :data:`KINDS` (drawn with their shares) and sends a few events in
    sessions: seconds apart within a session, sessions days apart, all within the :data:`FEED_DAYS`
    days before :data:`FEED_END`. Every event keeps the time it happened as its ``timestamp``, but
    arrives late by a delay drawn from :data:`LATENESS`, and lines are written in order of arrival: a
    quarter of the events arrive hours or days late, so the events of one customer are often out of
    order (a sign-in before the browsing it links, an order before its cart). About
    :data:`HOSTILE_SHARE` of the lines, put anywhere but first, are hostile. Every ``messageId`` is
    unique.
    """
    rng = random.Random(seed)
    feed = RealisticFeed(rng)
    kinds, shares = zip(*KINDS.items(), strict=True)
    lateness = [share for share, _ in LATENESS]
    arrivals: list[tuple[float, bytes]] = []
    counts: Counter[str] = Counter()
    for c in range(customers):
        kind = rng.choices(kinds, shares)[0]
        counts[kind] += 1
        timeline: list[tuple[dict[str, Any], float]] = []
        at = 0.0  # seconds after the customer's first event
        for session in getattr(feed, kind)(feed.person(c)):
            for payload in session:
                timeline.append((payload, at))
                at += 5 + rng.expovariate(1 / 40)
            at += rng.expovariate(1 / (3 * 86400))
        # The first event anywhere in the window that leaves room for the last one.
        first = FEED_END.timestamp() - rng.random() * max(0.0, FEED_DAYS * 86400 - at) - at
        for payload, offset in timeline:
            happened = first + offset
            payload["messageId"] = f"msg_{len(arrivals):09d}_{rng.getrandbits(32):08x}"
            payload["timestamp"] = iso(datetime.fromtimestamp(happened, UTC))
            mean = LATENESS[rng.choices(range(len(LATENESS)), lateness)[0]][1]
            line = json.dumps(payload, separators=(",", ":")).encode()
            arrivals.append((happened + rng.expovariate(1 / mean), line))
    counts["events"] = len(arrivals)
    arrivals.sort(key=lambda arrival: arrival[0])
    lines = [line for _, line in arrivals]
    del arrivals
    hostile_lines = round(len(lines) * HOSTILE_SHARE)
    for n in range(hostile_lines):
        # Never first: the first line tells the reader the input is JSON lines.
        lines.insert(rng.randrange(1, len(lines)), hostile(rng, n))
    counts["hostile"] = hostile_lines
    with path.open("wb") as out:
        for line in lines:
            out.write(line + b"\n")
    return counts


# The touchpoints of the synthetic events: where customers act on their own (no message channels).
OWN = (Touchpoint.WEB, Touchpoint.APP, Touchpoint.STORE, Touchpoint.CALL_CENTER, Touchpoint.CHAT)
CHANNELS = [touchpoint.value for touchpoint in OWN]


def write_synthetic(path: Path, events: int, customers: int, seed: int = 7) -> Counter[str]:
    """Write ``events`` JSON lines over ``customers`` customers, interleaved across customers the way a
    real feed is: round r emits the r-th event of every customer, in a shuffled customer order.

    Every customer has a phone number of their own. One customer in fifty also browses on a second
    device first (an anonymous id of its own, so a customer of its own), and a later identify from that
    device merges the two: identity resolution and merges are part of what is measured.
    """
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    per_customer = max(1, events // customers)
    written = 0
    order = list(range(customers))
    with path.open("w") as out:
        for step in range(per_customer):
            rng.shuffle(order)
            for c in order:
                if written >= events:
                    return Counter(events=written)
                at = (start + timedelta(days=step * 3 + rng.random() * 3)).isoformat().replace("+00:00", "Z")
                anon = f"anon-{c}"
                user = f"user-{c}"
                mid = f"bench-{c}-{step}"
                channel = CHANNELS[rng.randrange(len(CHANNELS))] if step > 2 else "web"
                second_device = c % 50 == 0
                if step == 0:
                    payload = {"type": "page", "anonymousId": anon, "name": "Home"}
                elif step == 2 and second_device:
                    payload = {"type": "page", "anonymousId": f"{anon}-tablet", "name": "Home"}
                elif step == 3 and second_device:
                    payload = {"type": "identify", "userId": user, "anonymousId": f"{anon}-tablet"}
                elif step == 1:
                    payload = {
                        "type": "identify",
                        "userId": user,
                        "anonymousId": anon,
                        "traits": {
                            "email": f"customer{c}@example.org",
                            "first_name": f"Name{c}",
                            "phone": f"+1415{2_000_000 + c:07d}",
                            "sms_opt_in": c % 3 == 0,
                        },
                    }
                else:
                    payload = _synthetic_event(rng, c, step, user, anon)
                payload.update(messageId=mid, timestamp=at, context={"channel": channel})
                out.write(json.dumps(payload, separators=(",", ":")) + "\n")
                written += 1
    return Counter(events=written)


def _synthetic_event(rng: random.Random, c: int, step: int, user: str, anon: str) -> dict[str, Any]:
    roll = rng.random()
    who = {"userId": user} if rng.random() < 0.7 else {"anonymousId": anon}
    if roll < 0.45:
        return {"type": "page", **who, "name": PAGES[rng.randrange(len(PAGES))]}
    if roll < 0.75:
        sku, name, price = PRODUCTS[rng.randrange(len(PRODUCTS))]
        return {
            "type": "track",
            **who,
            "event": "Product Added",
            "properties": {"product_id": sku, "name": name, "price": price, "quantity": 1},
        }
    if roll < 0.82:
        sku, _, _ = PRODUCTS[rng.randrange(len(PRODUCTS))]
        return {
            "type": "track",
            **who,
            "event": "Product Removed",
            "properties": {"product_id": sku, "quantity": 1},
        }
    if roll < 0.9:
        return {
            "type": "track",
            **who,
            "event": "Order Completed",
            "properties": {"order_id": f"o-{c}-{step}", "total": round(rng.random() * 200, 2)},
        }
    return {
        "type": "track",
        **who,
        "event": "Product Viewed",
        "properties": {"product_id": PRODUCTS[rng.randrange(len(PRODUCTS))][0]},
    }
