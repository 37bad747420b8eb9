"""Identity resolution, merges, and carts / orders derived independently of arrival order.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from profiles.db import session_scope
from profiles.ingest import IngestOptions, ingest_payloads
from profiles.lookup import resolve_customer_key
from profiles.models import Cart, Consent, Customer, Event, Identity, Order

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def ingest(engine, *payloads, batch_size=None):
    options = IngestOptions() if batch_size is None else IngestOptions(batch_size=batch_size)
    return ingest_payloads(engine, list(payloads), options=options, now=NOW)


def all_rows(engine, model, *where):
    with session_scope(engine) as s:
        return s.execute(select(model).where(*where)).scalars().all()


def live_customers(engine):
    return all_rows(engine, Customer, Customer.merged_into.is_(None))


def ts(hour: int, minute: int = 0, day: int = 2) -> str:
    return f"2026-06-{day:02d}T{hour:02d}:{minute:02d}:00Z"


def add(mid, who, product, price, qty=1, at=ts(9), **props):
    return {
        "type": "track",
        **who,
        "event": "Product Added",
        "messageId": mid,
        "timestamp": at,
        "properties": {
            "product_id": product,
            "name": product.title(),
            "price": price,
            "quantity": qty,
            **props,
        },
    }


def remove(mid, who, product, qty=1, at=ts(9)):
    return {
        "type": "track",
        **who,
        "event": "Product Removed",
        "messageId": mid,
        "timestamp": at,
        "properties": {"product_id": product, "quantity": qty},
    }


def completed(mid, who, order_id, total, at=ts(10), channel=None, **props):
    payload = {
        "type": "track",
        **who,
        "event": "Order Completed",
        "messageId": mid,
        "timestamp": at,
        "properties": {"order_id": order_id, "total": total, **props},
    }
    if channel:
        payload["context"] = {"channel": channel}
    return payload


def updated(mid, who, order_id, status, at):
    return {
        "type": "track",
        **who,
        "event": "Order Updated",
        "messageId": mid,
        "timestamp": at,
        "properties": {"order_id": order_id, "status": status},
    }


ANON = {"anonymousId": "anon-1"}
USER = {"userId": "u1"}


def test_identify_attaches_anonymous_history_to_the_known_customer(engine):
    ingest(engine, {"type": "page", **ANON, "name": "Home", "messageId": "p1"})
    ingest(engine, {"type": "identify", **USER, **ANON, "messageId": "i1", "traits": {"email": "a@x.org"}})
    [customer] = live_customers(engine)
    assert {e.customer_id for e in all_rows(engine, Event)} == {customer.id}
    kinds = {(i.kind, i.value) for i in all_rows(engine, Identity)}
    assert kinds == {("anonymous_id", "anon-1"), ("user_id", "u1"), ("email", "a@x.org")}


def test_event_for_anonymous_id_arriving_after_the_identify_lands_on_the_customer(engine):
    ingest(engine, {"type": "identify", **USER, **ANON, "messageId": "i1", "timestamp": ts(10)})
    ingest(
        engine, {"type": "track", **ANON, "event": "Product Viewed", "messageId": "v1", "timestamp": ts(9)}
    )
    [customer] = live_customers(engine)
    assert {e.customer_id for e in all_rows(engine, Event)} == {customer.id}


def test_alias_links_previous_id_to_user_id(engine):
    ingest(engine, {"type": "page", **ANON, "messageId": "p1"})
    ingest(engine, {"type": "track", **USER, "event": "Signed In", "messageId": "t1"})
    assert len(live_customers(engine)) == 2
    ingest(engine, {"type": "alias", "userId": "u1", "previousId": "anon-1", "messageId": "a1"})
    assert len(live_customers(engine)) == 1
    assert len({e.customer_id for e in all_rows(engine, Event)}) == 1


def test_email_and_phone_are_normalised_identities_that_link_channels(engine):
    ingest(
        engine,
        {
            "type": "identify",
            "userId": "web-1",
            "messageId": "i1",
            "traits": {"email": " Ana@Example.org", "phone": "+1 415-555-0100"},
        },
    )
    # The store's POS knows the customer by loyalty id and phone only.
    ingest(
        engine,
        {
            "type": "identify",
            "userId": "pos-77",
            "messageId": "i2",
            "context": {"channel": "store"},
            "traits": {"phone": "+14155550100", "loyalty_id": "L-9"},
        },
    )
    [customer] = live_customers(engine)
    with session_scope(engine) as s:
        for key in (
            "ana@example.org",
            "ANA@example.org",
            "+14155550100",
            "(415) 555-0100",
            "L-9",
            "pos-77",
            str(customer.id),
            # every key the profile API takes, too (profiles.lookup.parse_key)
            "user_id:pos-77",
            "email:ANA@example.org",
            "phone:+14155550100",
            "loyalty_id:L-9",
            f"customer_id:{customer.id}",
        ):
            assert resolve_customer_key(s, key) == customer.id, key
        assert resolve_customer_key(s, "nobody@example.org") is None
        assert resolve_customer_key(s, "user_id:nobody") is None
        assert resolve_customer_key(s, "anonymous_id:pos-77") is None  # the kind is part of the key


def test_payload_linking_two_existing_customers_merges_everything_into_the_known_one(engine):
    # Customer A: anonymous browsing with a cart and an email opt-out (newest consent).
    ingest(
        engine,
        add("a1", ANON, "tee", 20.0, qty=2, at=ts(8)),
        {
            "type": "track",
            **ANON,
            "event": "Unsubscribed",
            "messageId": "un",
            "timestamp": ts(8, 30),
            "properties": {"channel": "email"},
        },
    )
    # Customer B: known user with an older email opt-in, a store order and an identify.
    ingest(
        engine,
        {
            "type": "identify",
            **USER,
            "messageId": "i0",
            "timestamp": ts(7),
            "traits": {"email": "b@x.org", "first_name": "Bea"},
        },
        {
            "type": "track",
            **USER,
            "event": "Subscribed",
            "messageId": "sub",
            "timestamp": ts(7, 30),
            "properties": {"channel": "email"},
        },
        completed("o0", USER, "o-0", 50.0, at=ts(6), channel="store"),
    )
    assert len(live_customers(engine)) == 2
    anon_customer = all_rows(engine, Identity, Identity.value == "anon-1")[0].customer_id
    known_customer = all_rows(engine, Identity, Identity.value == "u1")[0].customer_id

    ingest(engine, {"type": "identify", **USER, **ANON, "messageId": "link", "timestamp": ts(11)})

    [survivor] = live_customers(engine)
    assert survivor.id == known_customer
    loser = all_rows(engine, Customer, Customer.id == anon_customer)[0]
    assert loser.merged_into == survivor.id
    assert {e.customer_id for e in all_rows(engine, Event)} == {survivor.id}
    assert {i.customer_id for i in all_rows(engine, Identity)} == {survivor.id}
    [consent] = all_rows(engine, Consent)
    assert (consent.customer_id, consent.status) == (survivor.id, "opted_out")  # newest decision kept
    [cart] = all_rows(engine, Cart)
    assert (cart.customer_id, cart.status, cart.value) == (survivor.id, "open", 40.0)
    [order] = all_rows(engine, Order)
    assert order.customer_id == survivor.id
    assert survivor.first_name == "Bea" and survivor.email == "b@x.org"
    with session_scope(engine) as s:
        assert resolve_customer_key(s, str(anon_customer)) == survivor.id


def test_merge_chain_is_flattened(engine):
    ingest(engine, {"type": "page", "anonymousId": "a", "messageId": "1"})
    ingest(engine, {"type": "page", "anonymousId": "b", "messageId": "2"})
    ingest(engine, {"type": "page", "anonymousId": "c", "messageId": "3"})
    ingest(engine, {"type": "alias", "userId": "u", "previousId": "a", "messageId": "4"})
    ingest(engine, {"type": "identify", "userId": "u", "anonymousId": "b", "messageId": "5"})
    ingest(engine, {"type": "identify", "userId": "u", "anonymousId": "c", "messageId": "6"})
    [survivor] = live_customers(engine)
    merged = all_rows(engine, Customer, Customer.merged_into.is_not(None))
    assert {c.merged_into for c in merged} == {survivor.id}


def test_several_merges_in_one_batch_each_go_to_their_own_survivor_and_chains_follow(engine):
    ingest(engine, *({"type": "page", "anonymousId": f"a{n}", "messageId": f"p{n}"} for n in range(1, 5)))
    ingest(engine, {"type": "track", "userId": "u5", "event": "Viewed", "messageId": "p5"})
    ids = {i.value: i.customer_id for i in all_rows(engine, Identity)}
    # a2 merges into a1 (the older; neither is known) through a shared email: a chain to follow later.
    ingest(
        engine,
        {"type": "identify", "anonymousId": "a1", "traits": {"email": "e@x.org"}, "messageId": "i1"},
        {"type": "identify", "anonymousId": "a2", "traits": {"email": "e@x.org"}, "messageId": "i2"},
    )
    assert all_rows(engine, Customer, Customer.id == ids["a2"])[0].merged_into == ids["a1"]
    # One batch, two merges: a1 (with a2) into the known u5; a4 into a3 through the new user id u6.
    ingest(
        engine,
        {"type": "identify", "userId": "u5", "anonymousId": "a1", "messageId": "i3"},
        {"type": "identify", "userId": "u6", "anonymousId": "a3", "messageId": "i4"},
        {"type": "identify", "userId": "u6", "anonymousId": "a4", "messageId": "i5"},
    )
    assert sorted(c.id for c in live_customers(engine)) == sorted([ids["u5"], ids["a3"]])
    merged = {c.id: c.merged_into for c in all_rows(engine, Customer, Customer.merged_into.is_not(None))}
    assert merged == {ids["a1"]: ids["u5"], ids["a2"]: ids["u5"], ids["a4"]: ids["a3"]}
    owners = {e.message_id: e.customer_id for e in all_rows(engine, Event)}
    assert {owners[m] for m in ("p1", "p2", "p5", "i1", "i2", "i3")} == {ids["u5"]}
    assert {owners[m] for m in ("p3", "p4", "i4", "i5")} == {ids["a3"]}
    assert {i.value: i.customer_id for i in all_rows(engine, Identity)}["e@x.org"] == ids["u5"]


def test_open_cart_is_net_of_adds_and_removes_with_value_and_last_activity(engine):
    ingest(
        engine,
        add("1", USER, "tee", 19.5, qty=2, at=ts(9), cart_id="c-1"),
        add("2", USER, "cap", 10.0, at=ts(9, 5)),
        remove("3", USER, "cap", at=ts(9, 10)),
        add("4", USER, "sock", 4.25, qty=3, at=ts(9, 7)),
    )
    [cart] = all_rows(engine, Cart)
    assert cart.status == "open"
    assert cart.value == 19.5 * 2 + 4.25 * 3
    assert cart.item_count == 5
    assert {i["product_id"]: i["quantity"] for i in cart.items} == {"tee": 2, "sock": 3}
    assert cart.updated_at == datetime(2026, 6, 2, 9, 10, tzinfo=UTC)
    assert cart.cart_id == "c-1"


def test_store_purchase_without_cart_id_converts_the_online_cart(engine):
    ingest(engine, add("1", USER, "tee", 20.0, at=ts(9), cart_id="web-cart"))
    ingest(engine, completed("2", USER, "pos-1", 20.0, at=ts(15), channel="store"))  # no cart_id
    [cart] = all_rows(engine, Cart)
    assert (cart.status, cart.order_id) == ("converted", "pos-1")
    [order] = all_rows(engine, Order)
    assert (order.channel, order.fulfillment, order.status) == ("store", "in_store", "placed")


def test_activity_after_the_last_order_is_a_new_open_cart(engine):
    ingest(
        engine,
        add("1", USER, "tee", 20.0, at=ts(9)),
        completed("2", USER, "o-1", 20.0, at=ts(10)),
        add("3", USER, "cap", 12.0, at=ts(11)),
    )
    carts = sorted(all_rows(engine, Cart), key=lambda c: c.started_at)
    assert [(c.status, c.value) for c in carts] == [("converted", 20.0), ("open", 12.0)]


def test_rebuild_rewrites_only_the_carts_and_orders_that_changed(engine):
    ingest(engine, add("1", USER, "tee", 20.0, at=ts(9)), completed("2", USER, "o-1", 20.0, at=ts(10)))
    [converted] = all_rows(engine, Cart)
    # A later product event opens a new cart; the converted cart and the order are left as they are.
    ingest(engine, add("3", USER, "cap", 12.0, at=ts(11)))
    carts = {c.status: c for c in all_rows(engine, Cart)}
    assert carts["converted"].id == converted.id
    assert (carts["open"].value, len(all_rows(engine, Order))) == (12.0, 1)
    # A late event before the order changes the converted cart: it is rewritten, the open one is not.
    ingest(engine, add("4", USER, "sock", 5.0, at=ts(9, 30)))
    after = {c.status: c for c in all_rows(engine, Cart)}
    assert after["converted"].id != converted.id
    assert (after["converted"].value, after["converted"].item_count) == (25.0, 2)
    assert after["open"].id == carts["open"].id
    # The order's status moves: the order row is replaced, and still only one.
    ingest(engine, updated("5", USER, "o-1", "ready_for_pickup", at=ts(12)))
    [order] = all_rows(engine, Order)
    assert (order.status, order.fulfillment) == ("ready_for_pickup", "pickup")


def test_pickup_order_moves_with_order_updated(engine):
    ingest(
        engine,
        completed("1", USER, "o-9", 30.0, at=ts(9), fulfillment="pickup", store_id="s-1"),
        updated("2", USER, "o-9", "ready_for_pickup", ts(12)),
    )
    [order] = all_rows(engine, Order)
    assert (order.fulfillment, order.status, order.store_id) == ("pickup", "ready_for_pickup", "s-1")
    assert order.ready_at == datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
    ingest(engine, updated("3", USER, "o-9", "picked_up", ts(16)))
    [order] = all_rows(engine, Order)
    assert order.status == "picked_up"
    assert order.picked_up_at == datetime(2026, 6, 2, 16, 0, tzinfo=UTC)


def snapshot(engine):
    carts = sorted(
        (
            c.status,
            round(c.value, 2),
            c.item_count,
            c.updated_at,
            c.order_id,
            tuple(sorted((i["product_id"], i["quantity"]) for i in c.items)),
        )
        for c in all_rows(engine, Cart)
    )
    orders = sorted(
        (o.order_id, o.channel, o.total, o.fulfillment, o.status, o.placed_at)
        for o in all_rows(engine, Order)
    )
    customers = len(live_customers(engine))
    return carts, orders, customers


def history():
    """Two days of a customer: anonymous browsing, login, carts, an online order, a store purchase, pickup."""
    return [
        add("h1", ANON, "tee", 20.0, qty=2, at=ts(9, day=1)),
        {
            "type": "identify",
            **USER,
            **ANON,
            "messageId": "h2",
            "timestamp": ts(9, 30, day=1),
            "traits": {"email": "ana@x.org"},
        },
        remove("h3", USER, "tee", at=ts(9, 40, day=1)),
        add("h4", ANON, "cap", 15.0, at=ts(9, 50, day=1)),
        completed("h5", USER, "o-web", 35.0, at=ts(10, day=1), fulfillment="pickup", store_id="s-1"),
        updated("h6", USER, "o-web", "ready_for_pickup", ts(14, day=1)),
        updated("h7", USER, "o-web", "picked_up", ts(18, day=1)),
        add("h8", USER, "sock", 5.0, qty=4, at=ts(9, day=2)),
        completed("h9", {"userId": "u1"}, "pos-2", 20.0, at=ts(12, day=2), channel="store"),
        add("h10", ANON, "hat", 30.0, at=ts(13, day=2)),
        remove("h11", USER, "hat", at=ts(13, 5, day=2)),
        add("h12", USER, "hat", 28.0, at=ts(13, 10, day=2)),
    ]


def test_carts_and_orders_do_not_depend_on_arrival_order(database_url):
    from profiles.db import create_store_engine

    expected_engine = create_store_engine(database_url)
    ingest(expected_engine, *history())
    expected = snapshot(expected_engine)
    assert expected[0][-1][0] == "open" or any(c[0] == "open" for c in expected[0])
    assert expected[2] == 1
    rng = random.Random(7)
    for attempt in range(4):
        _empty_store(expected_engine)
        shuffled = history()
        rng.shuffle(shuffled)
        # Arrive in several batches and separate runs, in shuffled order.
        for start in range(0, len(shuffled), 3):
            ingest(expected_engine, *shuffled[start : start + 3], batch_size=2)
        assert snapshot(expected_engine) == expected, f"shuffle {attempt}"
    expected_engine.dispose()


def _empty_store(engine):
    from profiles.models import metadata

    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(table.delete())


# --- Open carts carried forward by new product events (profiles.commerce.plan_commerce) ---


def cart_rows(engine):
    """Every cart's whole content, items in their order: what a rebuild must reproduce exactly."""
    return sorted(
        (
            (
                c.customer_id,
                c.status,
                c.cart_id,
                c.items,
                c.item_count,
                c.value,
                c.currency,
                c.started_at,
                c.updated_at,
                c.converted_at,
                c.order_id,
                c.lines,
            )
            for c in all_rows(engine, Cart)
        ),
        key=repr,
    )


def random_commerce(rng, customers=3, steps=60):
    """Time-ordered product events with removals below zero, re-adds, price, currency and cart id
    changes, and an occasional order, for a few customers."""
    payloads = []
    for step in range(steps):
        who = {"userId": f"r{rng.randrange(customers)}"}
        at = f"2026-06-02T{8 + step // 60:02d}:{step % 60:02d}:00Z"
        product = rng.choice(["tee", "cap", "sock", "hat"])
        roll = rng.random()
        if roll < 0.55:
            extra = {}
            if rng.random() < 0.3:
                extra["currency"] = rng.choice(["EUR", "USD", "GBPX"])
            if rng.random() < 0.3:
                extra["cart_id"] = f"c-{step}"
            payloads.append(
                add(f"r{step}", who, product, rng.choice([5.0, 7.5, 12.25]), rng.randint(1, 3), at, **extra)
            )
        elif roll < 0.9:
            payloads.append(remove(f"r{step}", who, product, rng.randint(1, 3), at))
        else:
            # Order ids repeat within a customer: the later order replaces the earlier one.
            order_id = f"o-{who['userId']}-{rng.randrange(3)}"
            payloads.append(completed(f"r{step}", who, order_id, rng.choice([10.0, 20.0]), at))
    return payloads


def test_carts_carried_forward_event_by_event_equal_a_rebuild_from_the_whole_history(engine):
    from profiles.commerce import rebuild_commerce

    rng = random.Random(5)
    payloads = random_commerce(rng)
    open_ids = {}
    for payload in payloads:
        # One event a run: each product event is later than everything stored, so the open cart is
        # carried forward from its row, in place.
        ingest(engine, payload)
        carts = {c.customer_id: c.id for c in all_rows(engine, Cart, Cart.status == "open")}
        customer = customer_of(engine, payload["userId"])
        if payload["event"] != "Order Completed" and customer in open_ids and customer in carts:
            assert carts[customer] == open_ids[customer], "the open cart is updated in place"
        open_ids = carts
    carried = cart_rows(engine), order_rows(engine)
    assert {row[1] for row in carried[0]} == {"open", "converted"}
    assert any(line["quantity"] <= 0 for row in carried[0] if row[1] == "open" for _, line in row[-1]), (
        "the history has a line removed down to zero that the items leave out"
    )
    with session_scope(engine) as session:
        rebuild_commerce(session, [c.id for c in all_rows(engine, Customer)])
    assert (cart_rows(engine), order_rows(engine)) == carried


def order_rows(engine):
    return sorted(
        (
            (o.order_id, o.customer_id, o.channel, o.total, o.fulfillment, o.status, o.items, o.placed_at)
            for o in all_rows(engine, Order)
        ),
        key=repr,
    )


def customer_of(engine, user_id):
    with session_scope(engine) as s:
        return resolve_customer_key(s, user_id)


def test_late_tied_and_merged_product_events_are_re_derived_not_carried(engine):
    from profiles.commerce import CommerceEvent, plan_commerce

    ingest(engine, add("1", USER, "tee", 20.0, at=ts(9)), add("2", {"userId": "u2"}, "cap", 5.0, at=ts(9)))
    ana, bob = customer_of(engine, "u1"), customer_of(engine, "u2")
    at = datetime(2026, 6, 2, 9, 0, tzinfo=UTC)

    def event(hour):
        return CommerceEvent("Product Added", "web", f"m{hour}", {"product_id": "x"}, at.replace(hour=hour))

    with session_scope(engine) as session:
        plan = plan_commerce(session, {ana: [event(10)], bob: [event(9)], 999: [event(8)]}, set())
        assert set(plan.carry) == {ana, 999}  # later than the stored history; no history at all
        assert plan.rebuild == {bob}  # the same instant as a stored event: a rebuild orders them
        plan = plan_commerce(session, {ana: [event(10)]}, {ana})
        assert (plan.carry, plan.rebuild) == ({}, {ana})  # merged (or an Order Updated in the batch)
    # A stored Order Updated may be waiting for an order id: a new order means a rebuild, a new
    # product event does not.
    ingest(engine, updated("3", USER, "o-late", "ready_for_pickup", at=ts(9, 30)))
    order = CommerceEvent("Order Completed", "web", "m-o", {"order_id": "o-late"}, at.replace(hour=11))
    with session_scope(engine) as session:
        assert plan_commerce(session, {ana: [order]}, set()).rebuild == {ana}
        assert set(plan_commerce(session, {ana: [event(11)]}, set()).carry) == {ana}
    ingest(engine, completed("4", USER, "o-late", 20.0, at=ts(11)))
    [late] = all_rows(engine, Order, Order.order_id == "o-late")
    assert (late.status, late.fulfillment) == ("ready_for_pickup", "pickup")


def test_open_cart_written_before_lines_were_kept_is_re_derived(engine):
    ingest(engine, add("1", USER, "tee", 20.0, at=ts(9)), remove("2", USER, "tee", at=ts(9, 5)))
    with engine.begin() as conn:
        conn.execute(Cart.__table__.update().values(lines=None))
    ingest(engine, add("3", USER, "tee", 20.0, at=ts(9, 10)))
    [cart] = all_rows(engine, Cart)
    # Removed down to zero, then added again: one tee, and the lines kept from now on.
    assert (cart.item_count, cart.value) == (1, 20.0)
    assert [key for key, _ in cart.lines] == ["tee"]


def test_open_carts_are_looked_up_by_customer_not_by_scanning_the_open_carts(engine):
    """On SQLite without statistics, the status index looked cheaper than the customer index: every
    batch then read every open cart in the store."""
    from profiles.commerce import open_carts_sql

    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL plans from its statistics")
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + open_carts_sql("sqlite"), ("[1, 2]",)).fetchall()
    steps = " / ".join(row[-1] for row in plan)
    assert "carts USING INDEX ix_carts_customer_id" in steps, steps
