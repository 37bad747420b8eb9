"""Conversion by channel (definition 4), retention (5), AOV (6) and first-contact resolution (7) on
hand-built histories, on SQLite and PostgreSQL; the expected numbers are worked out in the comments."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
from report_kit import (
    NOW,
    SINCE,
    UNTIL,
    WINDOW,
    customer_id,
    day,
    deliver,
    identify,
    ingest,
    order,
    settings,
    track,
)
from sqlalchemy import func, select

from omni.core.channels import OMNI_CHANNEL
from omni.core.statuses import ConsentStatus
from profiles.consent import ConsentDecision
from profiles.db import session_scope
from profiles.lookup import record_view
from profiles.models import Event
from profiles.suppression import record_consents
from reports import build_report

Z = NormalDist().inv_cdf(0.975)


def _report(engine):
    return build_report(engine, settings=settings(), now=NOW, since=SINCE, until=UNTIL, window=WINDOW)


def test_conversion_by_touchpoint_placed_channel_message_channel_and_path(engine):
    ingest(engine, *(identify(f"c{n}", day(1, 0, month=4)) for n in range(1, 5)))
    ingest(
        engine,
        # c1: web visit May 5, web order May 6 (100); the app on May 20, nothing after.
        track("c1", "Page Viewed", day(5)),
        order("c1", "k1", 100.0, day(6)),
        track("c1", "Application Opened", day(20), "app"),
        # c2: app May 10, then buys at the till May 12 (60; no cart id).
        track("c2", "Product Viewed", day(10), "app"),
        order("c2", "k2", 60.0, day(12), channel="store"),
        # c3: web visit May 10, web order May 20 (40): 10 days later, outside the window. Omni's own
        # "Email Sent" on May 9 is not a touchpoint of theirs.
        track("c3", "Page Viewed", day(10)),
        track("c3", "Email Sent", day(9), "email"),
        order("c3", "k3", 40.0, day(20)),
        # c4: opened an email May 3, never bought.
        track("c4", "Email Opened", day(3), "email"),
    )
    # Messages: c1 an email (May 5 12:00) then an SMS (18:00) before their order; c3 an email May 9
    # (11 days before their order); c2 a push on May 1 (11 days before theirs).
    deliver(engine, "c1", "email", step="s", created=day(5), campaign="promo")
    deliver(engine, "c1", "sms", step="s2", created=day(5, 18), campaign="promo")
    deliver(engine, "c3", "email", step="s", created=day(9), campaign="promo")
    deliver(engine, "c2", "push", step="s", created=day(1), campaign="promo")
    deliver(engine, "c4", "email", step="s", created=day(2), campaign="promo", status="failed")
    channels = _report(engine).channels
    by = {r.label: (r.customers, r.converted) for r in channels.touchpoints}
    # web: c1 (bought within 7 days after), c3 (did not); app: c2 (bought), c1 (not); store: c2's
    # purchase itself (nothing after it); email: c4's open.
    assert by == {"web": (2, 1), "app": (2, 1), "store": (1, 0), "email": (1, 0)}
    assert [r.label for r in channels.touchpoints] == ["web", "app", "store", "email"]
    web = channels.touchpoints[0]
    assert web.rate == 0.5 and web.low < 0.5 < web.high
    placed = {r.label: (r.customers, r.orders, r.revenue, r.aov) for r in channels.placed}
    assert placed == {"web": (2, 2, 140.0, 70.0), "store": (1, 1, 60.0, 60.0)}
    messages = {r.channel: r for r in channels.messages}
    email, sms, push = messages["email"], messages["sms"], messages["push"]
    # email: c1 and c3 messaged, c1 bought (any touch: 1 order, 100); the SMS came later: last touch.
    assert (email.messaged, email.converted, email.any_touch_orders, email.any_touch_revenue) == (
        2,
        1,
        1,
        100.0,
    )
    assert (email.last_touch_orders, email.last_touch_revenue) == (0, 0.0)
    assert (sms.messaged, sms.converted, sms.last_touch_orders, sms.last_touch_revenue) == (1, 1, 1, 100.0)
    assert (sms.any_touch_orders, push.messaged, push.converted, push.any_touch_orders) == (1, 1, 0, 0)
    # Paths: k1 web only (single); k2 app then the till (cross); k3 web only (the May 10 visit is out of
    # its window, Omni's email is not the customer's touchpoint).
    paths = {r.label: (r.customers, r.orders, r.revenue) for r in channels.paths}
    assert paths == {"single": (2, 2, 140.0), "cross": (1, 1, 60.0)}


def test_retention_and_aov_by_distinct_channels(engine):
    ingest(engine, *(identify(f"r{n}", day(1, 0, month=3)) for n in range(1, 6)))
    ingest(
        engine,
        # Previous period [Mar 31, May 1):
        track("r1", "Page Viewed", day(10, month=4)),
        order("r1", "a1", 50.0, day(10, 13, month=4)),  # r1: web only -> 1 channel
        track("r2", "Application Opened", day(5, month=4), "app"),
        order("r2", "a2", 80.0, day(12, month=4), channel="store"),  # r2: app + store -> 2
        track("r3", "Page Viewed", day(1, month=4)),
        track("r3", "Application Opened", day(2, month=4), "app"),
        track("r3", "Chat Started", day(3, month=4), "chat"),
        order("r3", "a3", 20.0, day(4, month=4)),  # r3: web, app, chat -> 3+
        order("r4", "a4", 10.0, day(20, month=4)),  # r4: web -> 1
        track("r1", "Page Viewed", day(29, month=3)),  # before the previous period: not counted
        # This period (May):
        order("r1", "b1", 30.0, day(5)),  # r1 again, web only -> AOV band 1
        track("r3", "Chat Started", day(9), "chat"),
        order("r3", "b3", 90.0, day(10), channel="app"),  # r3 again: app + chat -> band 2
        order("r4", "b4", 60.0, day(15), channel="store"),  # r4 again: store -> band 1
        track("r5", "Page Viewed", day(2)),
        track("r5", "Application Opened", day(3), "app"),
        order("r5", "b5", 100.0, day(4), channel="store"),
        order("r5", "b6", 40.0, day(20)),  # r5 (new): web, app, store -> band 3+
    )
    report = _report(engine)
    retention = report.retention
    assert retention.previous_since.isoformat() == "2026-03-31T00:00:00+00:00"
    bands = {b.label: (b.customers, b.converted) for b in retention.bands}
    # 1 channel: r1 and r4, both back; 2: r2, not back; 3+: r3, back.
    assert bands == {"1": (2, 2), "2": (1, 0), "3+": (1, 1)}
    assert retention.bands[0].rate == 1.0 and retention.bands[0].high == 1.0
    assert retention.difference == pytest.approx(1 / 2 - 2 / 2)
    aov = {b.label: b for b in report.aov.bands}
    # Band 1: b1 30 and b4 60 (mean 45, sd sqrt(450)); band 2: b3 90; band 3+: b5 100 and b6 40 (mean 70).
    assert (aov["1"].customers, aov["1"].orders, aov["1"].revenue, aov["1"].aov) == (2, 2, 90.0, 45.0)
    assert aov["1"].sd == pytest.approx(math.sqrt(450))
    assert (aov["2"].orders, aov["2"].aov, aov["2"].sd) == (1, 90.0, None)
    assert (aov["3+"].customers, aov["3+"].orders, aov["3+"].aov) == (1, 2, 70.0)
    gaps = {g.group: g for g in report.aov.gaps}
    # 2+ (90, 100, 40: mean 230/3, sample variance 3100/3) against 1 (mean 45, variance 450), Welch with z.
    se = math.sqrt((3100 / 3) / 3 + 450 / 2)
    assert gaps["2+"].difference == pytest.approx(230 / 3 - 45)
    assert gaps["2+"].low == pytest.approx(230 / 3 - 45 - Z * se)
    assert gaps["2+"].high == pytest.approx(230 / 3 - 45 + Z * se)
    assert gaps["2"].difference is None  # one order: no variance
    assert gaps["3+"].difference == pytest.approx(25.0)
    assert gaps["3+"].high - gaps["3+"].low == pytest.approx(2 * Z * math.sqrt(1800 / 2 + 450 / 2))


def contact(user, ticket, at, channel):
    return track(user, "Support Contact", at, channel, ticket_id=ticket)


def resolved(user, ticket, at, channel="call_center"):
    return track(user, "Support Ticket Resolved", at, channel, ticket_id=ticket)


def viewed(user, at):
    return track(user, "Profile Viewed", at, "call_center", source="helpdesk")


def test_first_contact_resolution_by_channel_recent_contact_and_context(engine):
    ingest(engine, *(identify(f"f{n}", day(1, 0, month=4)) for n in range(1, 7)))
    ingest(
        engine,
        # T1: one call, resolved; the desk looked f1 up during it -> FCR, with context.
        contact("f1", "T1", day(5, 10), "call_center"),
        viewed("f1", day(5, 10, 5)),
        resolved("f1", "T1", day(5, 11)),
        # T2: chat, then a call on the same ticket -> two contacts, not FCR; no lookup.
        contact("f2", "T2", day(6, 10), "chat"),
        contact("f2", "T2", day(7, 10), "call_center"),
        resolved("f2", "T2", day(8, 10)),
        # T3: f3 chatted on May 8 (ticket T0, never resolved); calls on May 10 (T3) -> follows a contact on
        # another channel; one contact, FCR; looked up before the call, not during it -> without context.
        contact("f3", "T0", day(8, 10), "chat"),
        viewed("f3", day(9, 10)),
        contact("f3", "T3", day(10, 10), "call_center"),
        resolved("f3", "T3", day(10, 11)),
        # T4: resolved after now -> not in the period.
        contact("f4", "T4", day(20, 10), "chat"),
        # T5: chat in April, resolved May 2 -> counted (resolved in the period); looked up between -> context.
        contact("f5", "T5", day(25, 10, month=4), "chat"),
        viewed("f5", day(1, 9)),
        resolved("f5", "T5", day(2, 10), "chat"),
        # T6: a resolution with no contact recorded -> not counted.
        resolved("f6", "T6", day(3, 10)),
        # T7: f1 again, in the store May 12, a week after their call (May 5 10:00) -> follows another
        # channel (within 7 days); one contact, FCR; their lookup was for T1 -> without context.
        contact("f1", "T7", day(12, 9), "store"),
        resolved("f1", "T7", day(13, 10)),
    )
    fcr = _report(engine).fcr
    assert (fcr.overall.customers, fcr.overall.converted) == (5, 4)
    by = {r.label: (r.customers, r.converted) for r in fcr.by_channel}
    assert by == {"store": (1, 1), "call_center": (2, 2), "chat": (2, 1)}
    assert (fcr.after_other_channel.customers, fcr.after_other_channel.converted) == (2, 2)
    assert (fcr.no_recent_contact.customers, fcr.no_recent_contact.converted) == (3, 2)
    assert (fcr.with_context.customers, fcr.with_context.converted) == (2, 2)
    assert (fcr.without_context.customers, fcr.without_context.converted) == (3, 2)
    assert fcr.overall.rate == pytest.approx(0.8)


def test_support_event_names_come_from_the_settings(engine):
    ingest(engine, identify("h1", day(1, 0, month=4)))
    ingest(
        engine,
        track("h1", "Ticket Opened", day(5, 10), "chat", case="C1"),
        track("h1", "Ticket Closed", day(5, 11), "chat", case="C1"),
    )
    report = build_report(
        engine,
        settings=settings(
            support_contact_event="Ticket Opened",
            support_resolved_event="Ticket Closed",
            support_ticket_property="case",
        ),
        now=NOW,
        since=SINCE,
        until=UNTIL,
    )
    assert (report.fcr.overall.customers, report.fcr.overall.converted) == (1, 1)
    assert [r.label for r in report.fcr.by_channel] == ["chat"]


def _touchpoint_figures(report) -> dict:
    """Every figure that counts the customer's touchpoints (definitions 4 to 7), as plain data."""
    figures = report.to_dict()
    fcr = figures["fcr"]
    return {
        "touchpoints": figures["channels"]["touchpoints"],
        "paths": figures["channels"]["paths"],
        "placed": figures["channels"]["placed"],
        "retention": figures["retention"],
        "aov": figures["aov"],
        # FCR's split by a recent contact on another channel (with/without context is the desk's lookup:
        # a Profile Viewed during the contact counts there, by definition 7, and none is placed in one).
        "fcr": {k: v for k, v in fcr.items() if k not in ("with_context", "without_context")},
    }


def test_omni_own_events_are_no_touchpoint_of_the_customer(engine):
    """A staff lookup (Profile Viewed, channel ``omni``) and an operator's unsubscribe (Unsubscribed on
    ``omni``) sit on the timeline beside the customer's own events, each just before an order or a
    contact: conversion by touchpoint, paths, retention and AOV bands and FCR stay as they were."""
    ingest(engine, *(identify(u, day(1, 0, month=3), email=f"{u}@example.com") for u in ("p1", "p2", "p3")))
    ingest(
        engine,
        # p1: ordered in April on the web only (retention band 1), back in May: web visit May 5, web order
        # May 6 (single-channel path, AOV band 1; web converts).
        order("p1", "q1", 50.0, day(10, month=4)),
        track("p1", "Page Viewed", day(5)),
        order("p1", "q2", 100.0, day(6)),
        # p2: app on May 10, buys at the till May 12 (a cross-channel path: app + store; AOV band 2).
        track("p2", "Product Viewed", day(10), "app"),
        order("p2", "q3", 60.0, day(12), channel="store"),
        # p3: one chat contact on May 20, resolved the same day (FCR, no recent contact on another channel).
        contact("p3", "P1", day(20, 10), "chat"),
        resolved("p3", "P1", day(20, 11), "chat"),
    )
    before = _report(engine)
    figures = _touchpoint_figures(before)
    assert {r["label"]: (r["customers"], r["converted"]) for r in figures["touchpoints"]} == {
        "web": (1, 1),
        "app": (1, 1),
        "store": (1, 0),
        "chat": (1, 0),
    }
    assert {r["label"]: r["orders"] for r in figures["paths"]} == {"single": 1, "cross": 1}
    assert {b["label"]: b["customers"] for b in figures["retention"]["bands"]} == {"1": 1, "2": 0, "3+": 0}
    assert {b["label"]: b["orders"] for b in figures["aov"]["bands"]} == {"1": 1, "2": 1, "3+": 0}
    assert (before.fcr.overall.customers, before.fcr.after_other_channel.customers) == (1, 0)

    p1, p2, p3 = (customer_id(engine, u) for u in ("p1", "p2", "p3"))
    with session_scope(engine) as session:
        # Before p1's April order (previous period), before their May order (period, window, path), before
        # p2's till purchase, and an hour before p3's chat (a "contact on another channel" if it counted).
        for person, at in ((p1, day(9, month=4)), (p1, day(5, 18)), (p2, day(11)), (p3, day(20, 9))):
            record_view(session, person, source="helpdesk", via="api", now=at)
            record_consents(
                session,
                [ConsentDecision(person, "email", ConsentStatus.OPTED_OUT, "cli:operator", at)],
                now=at,
                touchpoint=OMNI_CHANNEL,
                operator=True,
            )
            record_consents(
                session,
                [ConsentDecision(person, "email", ConsentStatus.OPTED_IN, "cli:operator", at)],
                now=at,
                touchpoint=OMNI_CHANNEL,
                operator=True,
            )
    with session_scope(engine) as session:
        written = session.execute(
            select(Event.name, func.count()).where(Event.channel == OMNI_CHANNEL).group_by(Event.name)
        ).all()
    assert sorted(written) == [("Profile Viewed", 4), ("Subscribed", 4), ("Unsubscribed", 4)]
    after = _report(engine)
    assert _touchpoint_figures(after) == figures
    assert OMNI_CHANNEL not in {r.label for r in after.channels.touchpoints}
