"""Journey lift (definition 1), the funnel and exits (definition 3) and the global control group
(definition 2) on a hand-built history, on SQLite and PostgreSQL. Every expected number is worked out
by hand in the comments beside the history."""

from __future__ import annotations

from datetime import timedelta

import pytest
from report_kit import (
    NOW,
    SINCE,
    UNTIL,
    WINDOW,
    customer_id,
    day,
    deliver,
    enroll,
    identify,
    ingest,
    order,
    settings,
    track,
)
from sqlalchemy import insert

from profiles.db import session_scope
from profiles.models import GlobalControlMember
from reports import build_report, stats
from reports.model import NOT_SIGNIFICANT, TOO_FEW

E = day(10, 0)  # every "cart" enrollment of the period is at May 10 00:00


def _history(engine) -> dict[str, str]:
    # Customers: known users u1..u10, and an anonymous visitor who turns out to be u7.
    ingest(engine, *(identify(f"u{n}", day(1, 0, month=4)) for n in range(1, 11)))
    ingest(engine, track("anon-7", "Page Viewed", day(9)))
    ingest(
        engine,
        order("u1", "o1", 100.0, E + timedelta(days=1)),  # messaged, bought a day later: converted
        order("u2", "o2", 50.0, E + WINDOW, fulfillment="pickup"),  # exactly at the window's end: counts
        order("u3", "o3", 70.0, E + WINDOW + timedelta(microseconds=1)),  # a microsecond later: does not
        order("u4", "o4", 35.0, E),  # at the enrollment itself: not after it, does not count
        order("u5", "o5", 30.0, E + timedelta(days=2), channel="store"),  # held out, the till, no cart id
        order("u7", "o7", 40.0, E + timedelta(days=3)),  # the merged customer's purchase
        order("u8", "o8", 20.0, day(12)),  # held out of cart, messaged by browse: converts in both
        order("u10", "o10", 25.0, E + timedelta(days=4), channel="store"),  # messaged, at the till
        order("u9", "o9", 99.0, E + timedelta(days=1)),  # global control member: not in the lift
    )
    keys: dict[str, str] = {}
    cart = {}
    for user in ("u1", "u2", "u3", "u4", "u10"):
        cart[user] = enroll(engine, user, "cart", E)
    cart["anon-7"] = enroll(engine, "anon-7", "cart", E)  # enrolled before we knew who they were
    for user in ("u5", "u6", "u8"):
        enroll(engine, user, "cart", E, status="holdout")
    enroll(engine, "u9", "cart", E, status="holdout", exit_reason="global_control")
    enroll(engine, "u8", "browse", day(11, 0))
    enroll(engine, "u6", "cart", day(20, 0, month=4), status="completed")  # April: not counted
    # Exits: u1 bought online, u2 bought online for pickup, u10 at the till, u3 left the audience.
    with session_scope(engine) as session:
        from sqlalchemy import update

        from profiles.models import Enrollment

        for user, at, reason in (
            ("u1", E + timedelta(days=1), "event: Order Completed"),
            ("u2", E + WINDOW, "event: Order Completed"),
            ("u10", E + timedelta(days=4), "event: Order Completed"),
            ("u3", E + timedelta(days=2), "left audience cart_abandoners"),
        ):
            session.execute(
                update(Enrollment)
                .where(Enrollment.id == cart[user])
                .values(status="exited", exited_at=at, exit_reason=reason)
            )
    # Deliveries of the cart email (an hour after entry): sent to u1, u2, u4, anon-7; failed for u3.
    sent = E + timedelta(hours=1)
    keys["u1"] = deliver(
        engine, "u1", "email", step="cart_email", created=sent, enrollment=cart["u1"], delivered_at=sent
    )
    deliver(engine, "u2", "email", step="cart_email", created=sent, enrollment=cart["u2"])
    deliver(engine, "u3", "email", step="cart_email", created=sent, enrollment=cart["u3"], status="failed")
    deliver(engine, "u4", "email", step="cart_email", created=sent, enrollment=cart["u4"])
    deliver(engine, "anon-7", "email", step="cart_email", created=sent, enrollment=cart["anon-7"])
    # An SMS to u1 two days in, after they had bought.
    deliver(engine, "u1", "sms", step="pickup_reminder", created=E + timedelta(days=2), enrollment=cart["u1"])
    ingest(
        engine,
        track("u1", "Email Opened", sent + timedelta(minutes=5), "email", delivery_id=keys["u1"]),
        track("u1", "Email Link Clicked", sent + timedelta(minutes=6), "email", delivery_id=keys["u1"]),
        track("u2", "Email Opened", sent + timedelta(minutes=7), "email"),  # no delivery id: not counted
    )
    # u7, known, is enrolled on May 12 (from another device) and mailed; then logs in on the anonymous
    # device: anon-7 merges into u7 (its orders, events and deliveries move; its open enrollment stays
    # with the old id, u7 having its own, and exits at the next tick). Two enrollments, one person.
    again = enroll(engine, "u7", "cart", day(12, 0))
    deliver(engine, "u7", "email", step="cart_email", created=day(12, 1), enrollment=again)
    ingest(engine, identify("u7", day(12, 2), anonymousId="anon-7"))
    return keys


def test_journey_lift_counts_each_person_once_with_the_windows_edges(engine):
    _history(engine)
    report = build_report(engine, settings=settings(), now=NOW, since=SINCE, until=UNTIL, window=WINDOW)
    journeys = {j.sequence: j for j in report.journeys}
    assert sorted(journeys) == ["browse", "cart"]
    cart = journeys["cart"]
    # Messaged: u1 (100), u2 (50, at the edge), u3 (a microsecond late), u4 (at entry), u10 (25, till),
    # u7 = anon-7 merged (first entry May 10, order May 13: 40; the May 12 re-entry is the same person).
    m = cart.messaged
    assert (m.customers, m.converted, m.orders, m.revenue) == (6, 4, 4, 215.0)
    # Held out: u5 (30, in store, no cart id), u6 (nothing), u8 (20). u9 is global control: left out.
    h = cart.held_out
    assert (h.customers, h.converted, h.orders, h.revenue) == (3, 2, 2, 50.0)
    assert m.rate == pytest.approx(4 / 6) and h.rate == pytest.approx(2 / 3)
    assert m.revenue_per_customer == pytest.approx(215 / 6)
    expected = stats.newcombe(4, 6, 2, 3)
    assert cart.lift.absolute == pytest.approx(0.0)
    assert (cart.lift.low, cart.lift.high) == (pytest.approx(expected.low), pytest.approx(expected.high))
    assert cart.lift.low < 0 < cart.lift.high and cart.lift.verdict == NOT_SIGNIFICANT
    assert cart.lift.incremental_orders == pytest.approx((4 / 6 - 2 / 3) * 6)
    assert cart.lift.incremental_revenue == pytest.approx((215 / 6 - 50 / 3) * 6)
    d = cart.to_dict()
    assert d["sequence"] == "cart" and d["messaged"]["customers"] == 6 and d["held_out"]["revenue"] == 50.0
    assert d["lift"]["low"] == cart.lift.low and d["lift"]["high"] == cart.lift.high
    # browse: u8 messaged and converted; nobody held out -> no interval, too few to tell.
    browse = journeys["browse"]
    assert (browse.messaged.customers, browse.messaged.converted, browse.held_out.customers) == (1, 1, 0)
    assert browse.lift.verdict == TOO_FEW and browse.lift.low is None
    assert "too few to tell" in browse.sentence()


def test_funnel_per_step_and_exits_by_how_they_bought(engine):
    _history(engine)
    report = build_report(engine, settings=settings(), now=NOW, since=SINCE, until=UNTIL, window=WINDOW)
    funnel = {f.sequence: f for f in report.funnels}["cart"]
    assert funnel.enrolled == 9
    email, sms = funnel.steps
    # Reached u1 u2 u3 u4 u7; sent to all but u3; delivered (provider feedback) u1 only; opened and
    # clicked by u1 (u2's open carries no delivery id).
    assert (email.step, email.channel) == ("cart_email", "email")
    assert (email.reached, email.sent, email.delivered, email.opened, email.clicked) == (5, 4, 1, 1, 1)
    # Bought within 7 days after the send (sent May 10 01:00): u1 (100), u2 (50, May 17 00:00), u7 (40,
    # after both of their emails: one order); u4 bought before the email.
    assert (email.converted, email.orders, email.revenue) == (3, 3, 190.0)
    assert (sms.step, sms.channel, sms.reached, sms.sent, sms.converted) == (
        "pickup_reminder",
        "sms",
        1,
        1,
        0,
    )
    assert sms.opened is None and sms.clicked is None and sms.delivered == 0
    exits = {e.reason: e.customers for e in funnel.exits}
    assert exits == {
        "bought online": 1,
        "bought online, picked up in store": 1,
        "bought at the till": 1,
        "left audience cart_abandoners": 1,
    }


def test_empty_store_and_empty_period(engine):
    report = build_report(engine, settings=settings(), now=NOW)
    assert report.journeys == [] and report.funnels == []
    assert report.fcr.overall.customers == 0 and report.fcr.overall.rate is None
    assert [b.customers for b in report.retention.bands] == [0, 0, 0]
    assert report.aov.gaps[0].difference is None
    assert report.to_dict()["version"] == 1
    with pytest.raises(ValueError, match="empty"):
        build_report(engine, settings=settings(), now=NOW, since=UNTIL, until=SINCE)


def test_global_control_against_everyone_else(engine):
    ingest(engine, *(identify(f"g{n}", day(1, 0, month=4)) for n in range(1, 6)))
    ingest(
        engine,
        order("g1", "p1", 10.0, day(5)),  # control, bought
        order("g3", "p3", 30.0, day(6)),  # not in control, bought
        order("g3", "p4", 20.0, day(7)),
        order("g2", "p2", 15.0, day(20, month=4)),  # control, bought only before the period
    )
    ids = {user: customer_id(engine, user) for user in ("g1", "g2", "g5")}
    with session_scope(engine) as session:
        for user, exited in (("g1", None), ("g2", None), ("g5", day(1, month=4))):
            session.execute(
                insert(GlobalControlMember.__table__).values(
                    customer_id=ids[user],
                    salt="s1",
                    share=0.4,
                    entered_at=day(1, 0, month=3),
                    exited_at=exited,
                )
            )
    report = build_report(
        engine, settings=settings(global_control_share=0.4), now=NOW, since=SINCE, until=UNTIL, window=WINDOW
    )
    g = report.global_control
    # Held out: g1 (bought 10), g2 (nothing in May). Everyone else: g3 (2 orders, 50), g4, g5 (left the
    # group in April, before the period).
    assert g.enabled
    assert (g.held_out.customers, g.held_out.converted, g.held_out.orders, g.held_out.revenue) == (
        2,
        1,
        1,
        10.0,
    )
    assert (g.messaged.customers, g.messaged.converted, g.messaged.orders, g.messaged.revenue) == (
        3,
        1,
        2,
        50.0,
    )
    assert g.lift.absolute == pytest.approx(1 / 3 - 1 / 2)
