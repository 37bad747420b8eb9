"""A report built by hand (no store): what the HTML page and the flow's artifacts draw and print."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reports.model import (
    Aov,
    AovBand,
    AovGap,
    ChannelConversion,
    ExitCount,
    Fcr,
    Funnel,
    FunnelStep,
    GlobalControlLift,
    Group,
    JourneyLift,
    Lift,
    MessageChannelRow,
    OrdersRow,
    RateRow,
    Report,
    Retention,
)

NOW = datetime(2026, 6, 30, 6, 0, tzinfo=UTC)


def sample_report() -> Report:
    """Abandoned cart: 12.4 % of 1,000 messaged against 9.1 % of 110 held out, +3.3 points (+1.2 to
    +5.4), significant; a pickup journey with no holdout; the global control group; every table."""
    cart = JourneyLift(
        "abandoned_cart",
        messaged=Group(1000, 124, 130, 6500.0, 0.124, 0.105, 0.146, 6.5),
        held_out=Group(110, 10, 10, 480.0, 0.0909, 0.050, 0.159, 4.3636),
        lift=Lift(0.033, 0.012, 0.054, 0.363, 0.13, 0.59, 0.021, "significant", 33.0, 35.0, 2136.4),
    )
    pickup = JourneyLift(
        "pickup_ready", messaged=Group(40, 12, 12, 600.0, 0.3), lift=Lift(verdict="too few to tell")
    )
    steps = [
        FunnelStep("cart_email", "email", 1000, 980, 950, 400, 120, 100, 104, 5200.0),
        FunnelStep("retarget", "ads", 700, 700, None, None, None, 40, 41, 2050.0),
        FunnelStep("pickup_reminder", "sms", 500, 480, 470, None, None, 30, 30, 1500.0),
    ]
    return Report(
        generated_at=NOW,
        since=NOW - timedelta(days=90),
        until=NOW,
        window_days=7.0,
        min_control=100,
        journeys=[cart, pickup],
        global_control=GlobalControlLift(
            enabled=True,
            share=0.05,
            salt="2026-h1",
            messaged=Group(9500, 1900, 2100, 105000.0, 0.2, 0.192, 0.208, 11.05),
            held_out=Group(500, 85, 90, 4300.0, 0.17, 0.139, 0.206, 8.6),
            lift=Lift(
                0.03, -0.004, 0.066, 0.176, -0.02, 0.39, 0.09, "not significant", 285.0, 300.0, 23275.0
            ),
        ),
        funnels=[
            Funnel(
                "abandoned_cart",
                1110,
                steps,
                [ExitCount("bought at the till", 61), ExitCount("bought online", 70)],
                True,
            )
        ],
        channels=ChannelConversion(
            touchpoints=[
                RateRow("web", 5000, 900, 0.18, 0.17, 0.191),
                RateRow("call_center", 300, 51, 0.17, 0.132, 0.216),
            ],
            placed=[OrdersRow("store", 800, 950, 61750.0, 65.0), OrdersRow("web", 1100, 1240, 68200.0, 55.0)],
            messages=[MessageChannelRow("email", 1000, 124, 0.124, 0.105, 0.146, 90, 4500.0, 120, 6000.0)],
            paths=[
                OrdersRow("single", 1200, 1300, 70000.0, 53.85),
                OrdersRow("cross", 700, 890, 59950.0, 67.36),
            ],
        ),
        retention=Retention(
            previous_since=NOW - timedelta(days=180),
            previous_until=NOW - timedelta(days=90),
            bands=[
                RateRow("1", 600, 150, 0.25, 0.217, 0.286),
                RateRow("2", 300, 120, 0.4, 0.346, 0.456),
                RateRow("3+", 100, 55, 0.55, 0.452, 0.644),
            ],
            difference=0.1875,
            low=0.128,
            high=0.246,
        ),
        aov=Aov(
            bands=[
                AovBand("1", 1200, 1300, 70000.0, 53.85, 20.0),
                AovBand("2", 500, 600, 39000.0, 65.0, 25.0),
                AovBand("3+", 200, 290, 20950.0, 72.24, 30.0),
            ],
            gaps=[AovGap("2+", "1", 14.2, 11.1, 17.3)],
        ),
        fcr=Fcr(
            overall=RateRow("all", 400, 280, 0.7, 0.653, 0.743),
            by_channel=[
                RateRow("call_center", 250, 170, 0.68, 0.62, 0.734),
                RateRow("chat", 150, 110, 0.7333, 0.657, 0.798),
            ],
            after_other_channel=RateRow("after another channel", 80, 60, 0.75, 0.645, 0.832),
            no_recent_contact=RateRow("no recent contact", 320, 220, 0.6875, 0.635, 0.736),
            with_context=RateRow("with context", 100, 85, 0.85, 0.767, 0.907),
            without_context=RateRow("without context", 300, 195, 0.65, 0.594, 0.702),
        ),
        notes=["A note with <markup> & an ampersand."],
    )
