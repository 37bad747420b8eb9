"""Every condition kind and operator, on SQLite and PostgreSQL (the ``engine`` fixture), with the
window edges exactly at the boundary. Histories go through the real Segment ingestion."""

from __future__ import annotations

from audience_testkit import NOW, SECOND, History, check, days, hours, matching
from sqlalchemy import select

from profiles.models import Customer


def test_trait_operators(engine):
    (
        History()
        .identify(
            "ann",
            email="ann@x.com",
            first_name="Ann",
            tier="gold",
            ltv=250,
            vip=True,
            tags=["vip", "shoes"],
            address={"city": "Berlin"},
            signup="2024-01-05",
        )
        .identify(
            "bob",
            email="bob@x.com",
            tier="silver",
            ltv=90.5,
            vip=False,
            tags=["kids"],
            address={"city": "Bern"},
        )
        .identify("cid", tier="Gold", ltv="300", note="likes Gold and silver", vip=None)
        .track("dan", "Page Viewed", days(1))
        .ingest(engine)
    )
    check(
        engine,
        [
            ({"trait": "tier", "eq": "gold"}, {"ann"}),  # case-sensitive
            ({"trait": "tier", "ne": "gold"}, {"bob", "cid", "dan"}),  # missing counts as "not equal"
            ({"trait": "tier", "in": ["gold", "silver"]}, {"ann", "bob"}),
            ({"trait": "ltv", "gt": 90.5}, {"ann"}),  # "300" is a string: numbers compare with numbers only
            ({"trait": "ltv", "gte": 90.5}, {"ann", "bob"}),
            ({"trait": "ltv", "lt": 250}, {"bob"}),
            ({"trait": "ltv", "lte": 250}, {"ann", "bob"}),
            ({"trait": "ltv", "eq": 300}, set()),
            ({"trait": "ltv", "eq": "300"}, {"cid"}),
            ({"trait": "ltv", "in": [250, "300"]}, {"ann", "cid"}),
            ({"trait": "ltv", "gte": 90, "lt": 100}, {"bob"}),  # several operators are ANDed
            ({"trait": "vip", "eq": True}, {"ann"}),
            ({"trait": "vip", "eq": False}, {"bob"}),
            ({"trait": "vip", "exists": True}, {"ann", "bob"}),  # JSON null does not exist
            ({"trait": "vip", "exists": False}, {"cid", "dan"}),
            ({"trait": "tags", "contains": "vip"}, {"ann"}),  # an element of an array
            ({"trait": "note", "contains": "Gold"}, {"cid"}),  # a substring
            ({"trait": "note", "contains": "gold"}, set()),  # case-sensitive
            ({"trait": "address.city", "eq": "Berlin"}, {"ann"}),
            ({"trait": "traits.address.city", "in": ["Berlin", "Bern"]}, {"ann", "bob"}),
            ({"trait": "signup", "gte": "2024-01-01"}, {"ann"}),
            # Text orders by code point on both databases: lowercase after uppercase.
            ({"trait": "tier", "gt": "Zebra"}, {"ann", "bob"}),
            ({"trait": "tier", "lte": "Gold"}, {"cid"}),
            # Profile fields are columns of the customer.
            ({"trait": "email", "exists": True}, {"ann", "bob"}),
            ({"trait": "email", "exists": False}, {"cid", "dan"}),
            ({"trait": "email", "contains": "@x.com"}, {"ann", "bob"}),
            ({"trait": "email", "ne": "ann@x.com"}, {"bob", "cid", "dan"}),
            ({"trait": "email", "in": ["bob@x.com", "zed@x.com"]}, {"bob"}),
            ({"trait": "email", "gt": "b"}, {"bob"}),
            ({"trait": "first_name", "eq": "Ann"}, {"ann"}),
        ],
    )


def test_event_conditions_and_window_edges(engine):
    (
        History()
        .track("ann", "Product Viewed", days(1), category="shoes", price=60, product={"brand": "nike"})
        .track("ann", "Product Viewed", days(10), channel="app", category="shoes", price=40)
        .track("bob", "Product Viewed", days(1), channel="app", category="kids")
        .track("bob", "Product Viewed", days(2), channel="app", category="kids")
        .track("bob", "Product Viewed", days(3), channel="app", category="kids")
        .track("cid", "Signed Up", days(30))
        .track("eve", "Product Viewed", days(7))  # exactly 7 days before now
        .track("fay", "Product Viewed", days(7) + SECOND)  # one second older
        .track("gus", "Product Viewed", -hours(1))  # after now: not seen yet
        .ingest(engine)
    )
    everyone = {"ann", "bob", "cid", "eve", "fay", "gus"}
    check(
        engine,
        [
            ({"event": "Product Viewed"}, {"ann", "bob", "eve", "fay"}),
            # within: now - 7d <= occurred_at <= now, both ends inclusive
            ({"event": "Product Viewed", "within": "7d"}, {"ann", "bob", "eve"}),
            ({"event": "Product Viewed", "within": "168h"}, {"ann", "bob", "eve"}),
            # between [30d, 7d]: now - 30d <= occurred_at <= now - 7d, both ends inclusive
            ({"event": "Product Viewed", "between": ["30d", "7d"]}, {"ann", "eve", "fay"}),
            ({"event": "Product Viewed", "between": ["7d", "30d"]}, {"ann", "eve", "fay"}),
            ({"event": "Product Viewed", "within": "7d", "count": {"gte": 3}}, {"bob"}),
            ({"event": "Product Viewed", "within": "7d", "count": {"eq": 1}}, {"ann", "eve"}),
            ({"event": "Product Viewed", "within": "7d", "count": {"gt": 1, "lte": 3}}, {"bob"}),
            # "did not": customers with no such event at all match too
            (
                {"event": "Product Viewed", "within": "7d", "count": {"eq": 0}},
                everyone - {"ann", "bob", "eve"},
            ),
            ({"event": "Product Viewed", "within": "7d", "count": {"lt": 2}}, everyone - {"bob"}),
            ({"event": "Product Viewed", "within": "7d", "count": {"ne": 3}}, everyone - {"bob"}),
            ({"event": "Product Viewed", "where": {"category": "shoes"}}, {"ann"}),
            ({"event": "Product Viewed", "where": {"price": {"gte": 50}}}, {"ann"}),
            ({"event": "Product Viewed", "where": {"price": {"gte": 50}}, "between": ["30d", "2d"]}, set()),
            ({"event": "Product Viewed", "where": {"product.brand": "nike"}}, {"ann"}),
            ({"event": "Product Viewed", "where": {"category": ["kids", "toys"]}}, {"bob"}),
            ({"event": "Product Viewed", "where": {"category": {"exists": False}}}, {"eve", "fay"}),
            ({"event": "Product Viewed", "channel": "app"}, {"ann", "bob"}),
            ({"event": "Product Viewed", "channel": "app", "within": "7d"}, {"bob"}),
            ({"event": {"name": "Product Viewed", "within": "7d", "channel": ["web"]}}, {"ann", "eve"}),
            ({"event": ["Signed Up", "Product Viewed"], "between": ["10d", "30d"]}, {"ann", "cid"}),
        ],
    )
    # Later, gus's event is in the window.
    assert "gus" in matching(engine, {"event": "Product Viewed", "within": "7d"}, now=NOW + hours(2))


def test_cart_conditions(engine):
    (
        History()
        .identify("ann", email="ann@x.com")
        .add_to_cart("ann", hours(2))
        .add_to_cart("bob", hours(1))  # idle exactly 1 hour
        .add_to_cart("cid", hours(1) - SECOND)
        .add_to_cart("dan", hours(3))
        .order("dan", hours(2), "o-dan")
        .add_to_cart("eve", hours(3))
        .track("eve", "Product Removed", hours(2.5), product_id="p1", quantity=1)  # empty cart
        .add_to_cart("fay", hours(5))
        .order("fay", hours(4), "pos-1", channel="store")  # a store purchase, no cart id
        .add_to_cart("fay", hours(0.5), product="p2")
        .ingest(engine)
    )
    check(
        engine,
        [
            ({"cart": {"status": "open"}}, {"ann", "bob", "cid", "eve", "fay"}),
            ({"cart": {"status": "converted"}}, {"dan", "fay"}),
            (
                {"cart": {"status": ["open", "converted"], "value": {"gt": 0}}},
                {"ann", "bob", "cid", "dan", "fay"},
            ),
            ({"cart": {"status": "open", "value_gte": 1}}, {"ann", "bob", "cid", "fay"}),
            ({"cart": {"value": 0}}, {"eve"}),
            ({"cart": {"value": {"lt": 20}}}, {"eve"}),
            ({"cart": {"status": "open", "item_count": {"gte": 1}}}, {"ann", "bob", "cid", "fay"}),
            # idle_for: last activity <= now - 1h (exactly an hour idle counts)
            ({"cart": {"status": "open", "idle_for": "1h"}}, {"ann", "bob", "eve"}),
            # active_within: now - 1h <= last activity <= now
            ({"cart": {"active_within": "1h"}}, {"bob", "cid", "fay"}),
            ({"cart": {"no_order_after_activity": True}}, {"ann", "bob", "cid", "eve", "fay"}),
            ({"cart": {"status": "converted", "no_order_after_activity": True}}, set()),
            ({"not": {"cart": {}}}, set()),
        ],
    )
    # As of two hours and a half ago, dan's order had not happened: his cart had no order after it.
    assert "dan" in matching(engine, {"cart": {"no_order_after_activity": True}}, now=NOW - hours(2.5))


def test_order_conditions(engine):
    (
        History()
        .order("ann", days(100), "o1")
        .order("ann", days(90), "o2", channel="store")  # exactly 90 days old
        .order("bob", days(10), "o3", channel="app", fulfillment="pickup", store_id="s1")
        .track("bob", "Order Updated", days(5), order_id="o3", status="ready_for_pickup")
        .order("cid", days(20), "o4", fulfillment="pickup")
        .track("cid", "Order Updated", days(18), order_id="o4", status="picked_up")
        .track("cid", "Order Updated", days(19), order_id="o4", status="ready_for_pickup")
        .track("dan", "Page Viewed", days(1))
        .track("eve", "Order Completed", days(90) + SECOND, order_id="o5", total=500)
        .ingest(engine)
    )
    check(
        engine,
        [
            ({"order": {}}, {"ann", "bob", "cid", "eve"}),
            ({"order": {"channel": "store"}}, {"ann"}),
            ({"order": {"channel": ["app", "store"]}}, {"ann", "bob"}),
            ({"order": {"fulfillment": "pickup"}}, {"bob", "cid"}),
            ({"order": {"fulfillment": "in_store"}}, {"ann"}),
            ({"order": {"status": "ready_for_pickup"}}, {"bob"}),
            ({"order": {"status": "picked_up"}}, {"cid"}),
            ({"order": {"status": "placed"}}, {"ann", "eve"}),
            # within: placed_at >= now - 90d (exactly 90 days old is within)
            ({"order": {"within": "90d"}}, {"ann", "bob", "cid"}),
            # older_than: placed_at <= now - 90d (exactly 90 days old is older than 90 days too)
            ({"order": {"older_than": "90d"}}, {"ann", "eve"}),
            ({"order": {"within": "90d", "count": {"eq": 0}}}, {"dan", "eve"}),
            ({"order": {"count": {"gte": 2}}}, {"ann"}),
            ({"order": {"count": {"lt": 2}}}, {"bob", "cid", "dan", "eve"}),
            ({"order": {"total": {"gte": 100}}}, {"eve"}),
            ({"order": {"ready_for": "5d"}}, {"bob", "cid"}),
            ({"order": {"ready_for": "5d", "status": "ready_for_pickup"}}, {"bob"}),
            ({"sql": "SELECT customer_id FROM orders WHERE total > 100", "reviewed_by": "ops"}, {"eve"}),
            (
                {
                    "sql": "SELECT o.customer_id AS id FROM orders o WHERE o.placed_at >= :now",
                    "reviewed_by": "ops",
                },
                set(),
            ),
        ],
    )
    assert matching(engine, {"order": {"within": "90d"}}, now=NOW + SECOND) == {"bob", "cid"}


def test_reachable_and_consent(engine):
    (
        History()
        .identify("ann", email="ann@x.com")
        .identify("bob", email="bob@x.com", email_opt_out=True)
        .identify("cid", phone="+14155550100", sms_opt_in=True)
        .identify("dan", phone="+12025550143", ads_opt_out=True)
        .identify("eve", push_opt_in=True)
        .track("eve", "Application Opened", days(1), channel="app", context={"device": {"token": "tok-eve"}})
        .track("fay", "Application Opened", days(1), channel="app", context={"device": {"token": "tok-fay"}})
        .track("gus", "Unsubscribed", days(1), channel="email", properties={"channel": "sms"})
        .identify("gus", ago=days(2), phone="+442079460958", sms_opt_in=True)
        .ingest(engine)
    )
    everyone = {"ann", "bob", "cid", "dan", "eve", "fay", "gus"}
    check(
        engine,
        [
            ({"reachable": "email"}, {"ann"}),  # an address, and not opted out
            ({"reachable": "sms"}, {"cid"}),  # a phone and an opt-in (gus opted out after opting in)
            ({"reachable": "push"}, {"eve"}),  # a device token and an opt-in
            ({"reachable": "ads"}, {"ann", "bob", "cid", "gus"}),  # an email or phone, not opted out
            ({"consent": "email"}, everyone - {"bob"}),
            ({"consent": "sms"}, {"cid"}),
            ({"consent": "push"}, {"eve"}),
            ({"consent": "ads"}, everyone - {"dan"}),
        ],
    )


def test_channels_used_edges(engine):
    (
        History()
        .track("ann", "Page Viewed", days(1))
        .track("ann", "Application Opened", days(2), channel="app")
        .track("ann", "Order Completed", days(90), channel="store", order_id="a1")  # exactly 90 days
        .track("bob", "Page Viewed", days(1))
        .track("bob", "Application Opened", days(2), channel="app")
        .track("bob", "Order Completed", days(90) + SECOND, channel="store", order_id="b1")
        .track("cid", "Page Viewed", days(1))
        .track("cid", "Page Viewed", days(2))
        .track("cid", "Page Viewed", days(3))
        .track("dan", "Email Opened", days(10), channel="email")
        .track("dan", "Link Clicked", days(10), channel="sms")
        .track("dan", "Push Opened", days(10), channel="push")
        .track("dan", "Chat Started", days(10), channel="chat")
        .track("eve", "Page Viewed", days(100))
        .ingest(engine)
    )
    check(
        engine,
        [
            ({"channels_used": {"gte": 3, "within": "90d"}}, {"ann", "dan"}),
            ({"channels_used": {"gte": 3}}, {"ann", "bob", "dan"}),
            ({"channels_used": {"eq": 0, "within": "90d"}}, {"eve"}),
            ({"channels_used": {"lt": 2, "within": "90d"}}, {"cid", "eve"}),
            ({"channels_used": {"gte": 2, "within": "90d", "channels": ["web", "app"]}}, {"ann", "bob"}),
            ({"channels_used": {"eq": 4, "within": "30d"}}, {"dan"}),
        ],
    )


def test_combinators_and_merged_customers(engine):
    (
        History()
        .identify("ann", email="ann@x.com", tier="gold")
        .identify("bob", email="bob@x.com", tier="silver")
        .track("cid", "Page Viewed", days(1))
        .anonymous("anon-1", "Product Viewed", days(3))  # a visitor who later signs in as bob
        .alias("bob", "anon-1", days(2))
        .ingest(engine, batch_size=1)  # one payload a batch: two customers exist before the alias
    )
    with engine.connect() as conn:
        merged = conn.execute(
            select(Customer.__table__.c.id).where(Customer.__table__.c.merged_into.is_not(None))
        ).all()
    assert len(merged) == 1  # the anonymous visitor's profile was merged into bob's
    check(
        engine,
        [
            ({"all": [{"trait": "email", "exists": True}, {"trait": "tier", "eq": "gold"}]}, {"ann"}),
            ({"any": [{"trait": "tier", "eq": "gold"}, {"event": "Page Viewed"}]}, {"ann", "cid"}),
            # the merged-away visitor has no email, but never appears
            ({"not": {"trait": "email", "exists": True}}, {"cid"}),
            ({"not": {"any": [{"trait": "tier", "eq": "gold"}, {"event": "Page Viewed"}]}}, {"bob"}),
            # the visitor's events moved to bob
            ({"event": "Product Viewed"}, {"bob"}),
            ({"not": {"not": {"event": "Product Viewed"}}}, {"bob"}),
            (
                {"all": [{"not": {"event": "Product Viewed"}}, {"any": [{"trait": "tier", "exists": True}]}]},
                {"ann"},
            ),
        ],
    )
