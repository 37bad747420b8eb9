"""The report in words and terminal tables (``omni report``, the demo's closing sentences)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from reports.model import NO_DATA, SIGNIFICANT, TOO_FEW, JourneyLift, RateRow, Report


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def points(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:+.1f} pts"


def money(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


def interval(low: float | None, high: float | None, fmt: Any = points) -> str:
    if low is None or high is None:
        return "–"
    return f"{fmt(low)} to {fmt(high)}"


def _days(window_days: float | None) -> str:
    if window_days is None:
        return "within the window"
    shown = f"{window_days:g}"
    return f"within {shown} day{'s' if shown != '1' else ''}"


def lift_sentence(journey: JourneyLift, window_days: float | None = None) -> str:
    """One sentence: the journey's lift with its 95 % interval and what it means."""
    m, h, lift = journey.messaged, journey.held_out, journey.lift
    if lift.verdict == NO_DATA:
        return f"{journey.sequence}: nobody entered it in the period."
    head = (
        f"{journey.sequence}: {pct(m.rate)} of {m.customers:,} messaged customers "
        f"bought {_days(window_days)}, "
        f"against {pct(h.rate)} of {h.customers:,} held out"
    )
    if lift.absolute is None:
        return f"{head}: too few to tell (no held-out group)."
    body = f"{head}: {points(lift.absolute)} (95% interval {interval(lift.low, lift.high)})"
    if lift.verdict == TOO_FEW:
        return f"{body}: too few to tell yet."
    if lift.verdict == SIGNIFICANT:
        extra = ""
        if lift.incremental_orders is not None and lift.incremental_revenue is not None:
            extra = (
                f", about {lift.incremental_orders:,.0f} extra orders and {money(lift.incremental_revenue)} "
                "extra revenue"
            )
        direction = "it pays" if (lift.absolute or 0) > 0 else "it costs sales"
        return f"{body}: significant, {direction}{extra}."
    return f"{body}: not significant (the interval contains 0)."


def _rate_cells(row: RateRow) -> list[str]:
    return [f"{row.customers:,}", f"{row.converted:,}", pct(row.rate), interval(row.low, row.high, pct)]


def render(report: Report, console: Console) -> None:
    """Every table of the report, each readable at 80 columns."""
    console.print(
        f"[bold]Omni report[/] {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC, "
        f"attribution window {report.window_days:g} days",
        highlight=False,
    )
    table = Table(title="Journey lift (messaged vs held out)", title_justify="left")
    for name in ("Journey", "Messaged", "Bought", "Held out", "Bought", "Lift", "95% interval", "Verdict"):
        table.add_column(name, justify="left" if name in ("Journey", "Verdict") else "right")
    for j in report.journeys:
        table.add_row(
            j.sequence,
            f"{j.messaged.customers:,}",
            pct(j.messaged.rate),
            f"{j.held_out.customers:,}",
            pct(j.held_out.rate),
            points(j.lift.absolute),
            interval(j.lift.low, j.lift.high),
            j.lift.verdict,
        )
    console.print(table)
    for j in report.journeys:
        console.print(lift_sentence(j, report.window_days), highlight=False)
    g = report.global_control
    if g.enabled:
        console.print(
            f"Global control ({g.held_out.customers:,} customers held out of all marketing): "
            f"{pct(g.messaged.rate)} bought against {pct(g.held_out.rate)}, {points(g.lift.absolute)} "
            f"(95% interval {interval(g.lift.low, g.lift.high)}), {g.lift.verdict}.",
            highlight=False,
        )
    for funnel in report.funnels:
        table = Table(title=f"Funnel: {funnel.sequence} ({funnel.enrolled:,} entered)", title_justify="left")
        for name in (
            "Step",
            "Channel",
            "Reached",
            "Sent",
            "Delivered",
            "Opened",
            "Clicked",
            "Bought",
            "Revenue",
        ):
            table.add_column(name, justify="left" if name in ("Step", "Channel") else "right")
        for s in funnel.steps:
            table.add_row(
                s.step,
                s.channel,
                f"{s.reached:,}",
                f"{s.sent:,}",
                *("–" if v is None else f"{v:,}" for v in (s.delivered, s.opened, s.clicked)),
                f"{s.converted:,}",
                money(s.revenue),
            )
        for e in funnel.exits:
            table.add_row(f"exit: {e.reason}", "", f"{e.customers:,}", *("" for _ in range(6)))
        console.print(table)
    channels = report.channels
    table = Table(
        title="Conversion by touchpoint (active in the period, bought within the window)",
        title_justify="left",
    )
    for name in ("Touchpoint", "Customers", "Bought", "Rate", "95% interval"):
        table.add_column(name, justify="left" if name == "Touchpoint" else "right")
    for row in channels.touchpoints:
        table.add_row(row.label, *_rate_cells(row))
    console.print(table)
    table = Table(title="Orders by the channel they were placed on", title_justify="left")
    for name in ("Channel", "Customers", "Orders", "Revenue", "AOV"):
        table.add_column(name, justify="left" if name == "Channel" else "right")
    for row in channels.placed:
        table.add_row(row.label, f"{row.customers:,}", f"{row.orders:,}", money(row.revenue), money(row.aov))
    console.print(table)
    table = Table(title="Message channels (orders within the window after a message)", title_justify="left")
    for name in (
        "Channel",
        "Messaged",
        "Bought",
        "Rate",
        "Last-touch orders",
        "Revenue",
        "Any-touch orders",
        "Revenue",
    ):
        table.add_column(name, justify="left" if name == "Channel" else "right")
    for row in channels.messages:
        table.add_row(
            row.channel,
            f"{row.messaged:,}",
            f"{row.converted:,}",
            pct(row.rate),
            f"{row.last_touch_orders:,}",
            money(row.last_touch_revenue),
            f"{row.any_touch_orders:,}",
            money(row.any_touch_revenue),
        )
    console.print(table)
    table = Table(title="Paths to an order: one channel or several", title_justify="left")
    for name in ("Path", "Customers", "Orders", "Revenue", "AOV"):
        table.add_column(name, justify="left" if name == "Path" else "right")
    for row in channels.paths:
        table.add_row(row.label, f"{row.customers:,}", f"{row.orders:,}", money(row.revenue), money(row.aov))
    console.print(table)
    r = report.retention
    table = Table(title="Retention: bought last period, bought again, by channels used", title_justify="left")
    for name in ("Channels", "Customers", "Bought again", "Rate", "95% interval"):
        table.add_column(name, justify="left" if name == "Channels" else "right")
    for row in r.bands:
        table.add_row(row.label, *_rate_cells(row))
    console.print(table)
    console.print(
        f"Multichannel (2+) minus single-channel retention: {points(r.difference)} "
        f"(95% interval {interval(r.low, r.high)}).",
        highlight=False,
    )
    table = Table(title="Average order value by channels used", title_justify="left")
    for name in ("Channels", "Customers", "Orders", "Revenue", "AOV"):
        table.add_column(name, justify="left" if name == "Channels" else "right")
    for band in report.aov.bands:
        table.add_row(
            band.label, f"{band.customers:,}", f"{band.orders:,}", money(band.revenue), money(band.aov)
        )
    console.print(table)
    for gap in report.aov.gaps:
        console.print(
            f"AOV {gap.group} channels minus 1 channel: {money(gap.difference)} "
            f"(95% interval {interval(gap.low, gap.high, money)}).",
            highlight=False,
        )
    f = report.fcr
    table = Table(title="First-contact resolution (tickets resolved in the period)", title_justify="left")
    for name in ("Tickets", "Resolved", "First contact", "FCR", "95% interval"):
        table.add_column(name, justify="left" if name == "Tickets" else "right")
    for row in [
        f.overall,
        *f.by_channel,
        f.after_other_channel,
        f.no_recent_contact,
        f.with_context,
        f.without_context,
    ]:
        label = (
            row.label
            if row
            in (f.overall, f.after_other_channel, f.no_recent_contact, f.with_context, f.without_context)
            else f"first contact: {row.label}"
        )
        table.add_row(label, *_rate_cells(row))
    console.print(table)
    for note in report.notes:
        console.print(f"Note: {note}", highlight=False)
