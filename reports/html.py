"""The report as one self-contained HTML file: charts and tables, nothing fetched from anywhere.

Charts are drawn by matplotlib (the ``Agg``-free object API, :class:`matplotlib.figure.Figure`, so it is
safe in threads and touches no global state) as SVG and inlined in the page: vector, sharp when zoomed
or printed, its text real text, and a few tens of kilobytes per chart. The page itself is a Jinja2
template with autoescaping on; the only markup not escaped is matplotlib's own SVG. No ``<script>``, no
font or stylesheet link: the file opens the same offline, attached to an email or served by
``omni serve`` at ``/reports/latest``.

Charts: the lift of each journey (and of the global control group) with its 95 % interval; each
journey's funnel; conversion by touchpoint and by message channel; retention and average order value
by the number of channels a customer used; first-contact resolution by channel and by context. Every
chart has the table with the same numbers beneath it.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment
from markupsafe import Markup

from omni.core.settings import Settings
from reports.model import NO_DATA, RateRow, Report
from reports.text import interval, lift_sentence, money, pct, points

# Colours: messaged / the treatment and held out / the baseline, readable for the colour-blind.
BLUE, ORANGE, GREY, GREEN = "#1f6fb4", "#e08a1e", "#8a8f98", "#2e8b57"
FUNNEL_STAGES = ("reached", "sent", "delivered", "opened", "clicked", "converted")


# --- charts ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure


def _svg(figure: Any, name: str) -> Markup:
    """The figure as an inline ``<svg>`` element: no XML prologue, no doctype, no metadata."""
    import matplotlib

    buffer = io.StringIO()
    # svg.fonttype none: text stays text (searchable, small); hashsalt: stable ids, distinct per chart
    # so the clip paths of two charts in one page never share an id.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"omni-{name}"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None})
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = text.replace("<svg ", f'<svg role="img" aria-label="{name}" class="chart" ', 1)
    return Markup(text)  # noqa: S704 - matplotlib's SVG, its text escaped by matplotlib


def _style(axes: Any) -> None:
    axes.spines[["top", "right"]].set_visible(False)
    axes.grid(axis="x", color="#e4e6ea", linewidth=0.8)
    axes.set_axisbelow(True)


def _percent_axis(axes: Any, axis: str = "x") -> None:
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _pos: f"{value * 100:g}%")
    (axes.xaxis if axis == "x" else axes.yaxis).set_major_formatter(formatter)


def lift_chart(report: Report) -> Markup | None:
    """Each journey's absolute lift (points) with its 95 % interval; the global control group's too."""
    rows = [
        (j.sequence, j.lift.absolute, j.lift.low, j.lift.high, j.lift.verdict)
        for j in report.journeys
        if j.lift.absolute is not None
    ]
    g = report.global_control
    if g.enabled and g.lift.absolute is not None:
        rows.append(
            ("all marketing (global control)", g.lift.absolute, g.lift.low, g.lift.high, g.lift.verdict)
        )
    if not rows:
        return None
    figure = _figure(8, 0.7 * len(rows) + 1.2)
    axes = figure.add_subplot()
    for y, (_label, value, low, high, verdict) in enumerate(reversed(rows)):
        colour = BLUE if verdict == "significant" else GREY
        if low is not None and high is not None:
            axes.errorbar(
                value, y, xerr=[[value - low], [high - value]], fmt="o", color=colour, capsize=5, markersize=7
            )
        else:
            axes.plot(value, y, "o", color=colour)
        axes.annotate(
            points(value), (value, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9
        )
    axes.axvline(0, color="#444", linewidth=1)
    axes.set_yticks(range(len(rows)), [label for label, *_ in reversed(rows)])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    _percent_axis(axes)
    axes.set_xlabel("bought: messaged minus held out (points), 95 % interval")
    _style(axes)
    return _svg(figure, "lift")


def funnel_chart(funnel: Any) -> Markup | None:
    """Customers at each stage of each step (bars grouped by step and channel)."""
    if not funnel.steps:
        return None
    stages = [s for s in FUNNEL_STAGES if any(getattr(step, s) is not None for step in funnel.steps)]
    figure = _figure(8, 3.2)
    axes = figure.add_subplot()
    width = 0.8 / len(stages)
    colours = ["#c6dbef", "#6baed6", "#3182bd", "#08519c", "#08306b", GREEN]
    for i, stage in enumerate(stages):
        counted = [getattr(step, stage) for step in funnel.steps]  # None: no feedback for the channel
        positions = [x + (i - (len(stages) - 1) / 2) * width for x in range(len(funnel.steps))]
        colour = GREEN if stage == "converted" else colours[FUNNEL_STAGES.index(stage)]
        bars = axes.bar(positions, [value or 0 for value in counted], width, label=stage, color=colour)
        labels = ["" if value is None else f"{value:,}" for value in counted]
        axes.bar_label(bars, labels=labels, fontsize=7, padding=1)
    axes.set_xticks(range(len(funnel.steps)), [f"{s.step}\n({s.channel})" for s in funnel.steps])
    axes.set_ylabel("customers")
    axes.legend(ncols=len(stages), fontsize=8, loc="upper right", frameon=False)
    axes.margins(y=0.2)
    axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, f"funnel-{funnel.sequence}")


def _rate_bars(axes: Any, rows: Sequence[RateRow], title: str, colour: str = BLUE) -> None:
    """Horizontal bars of rates with their Wilson intervals."""
    shown = [r for r in rows if r.rate is not None]
    labels = [r.label for r in shown]
    values = [r.rate for r in shown]
    errors = [
        [max(0.0, r.rate - (r.low if r.low is not None else r.rate)) for r in shown],
        [max(0.0, (r.high if r.high is not None else r.rate) - r.rate) for r in shown],
    ]
    y = list(range(len(shown)))
    axes.barh(y, values, xerr=errors, color=colour, ecolor="#333", capsize=3, height=0.6)
    for position, row in zip(y, shown, strict=True):
        axes.annotate(
            f"{pct(row.rate)}  (n={row.customers:,})",
            (0, position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
            color="white" if (row.rate or 0) > 0.15 else "#222",
        )
    axes.set_yticks(y, labels)
    axes.invert_yaxis()
    axes.set_title(title, fontsize=10, loc="left")
    _percent_axis(axes)
    _style(axes)


def channel_chart(report: Report) -> Markup | None:
    touchpoints = [r for r in report.channels.touchpoints if r.rate is not None]
    messages = [
        RateRow(m.channel, m.messaged, m.converted, m.rate, m.low, m.high)
        for m in report.channels.messages
        if m.rate is not None
    ]
    panels = [(rows, title) for rows, title in (
        (touchpoints, "Touchpoints: active there, then bought"),
        (messages, "Messages: sent one, then bought"),
    ) if rows]  # fmt: skip
    if not panels:
        return None
    figure = _figure(8, 0.45 * max(len(rows) for rows, _ in panels) + 1.4)
    for i, (rows, title) in enumerate(panels):
        _rate_bars(figure.add_subplot(1, len(panels), i + 1), rows, title, BLUE if i == 0 else ORANGE)
    return _svg(figure, "channels")


def retention_aov_chart(report: Report) -> Markup | None:
    bands = [b for b in report.retention.bands if b.rate is not None]
    aov = [b for b in report.aov.bands if b.aov is not None]
    if not bands and not aov:
        return None
    figure = _figure(8, 3)
    if bands:
        _rate_bars(figure.add_subplot(1, 2, 1), bands, "Retention by channels used (bought again)", GREEN)
    if aov:
        axes = figure.add_subplot(1, 2, 2)
        errors = [
            1.96 * b.sd / math.sqrt(b.orders) if b.sd is not None and b.orders > 1 else 0.0 for b in aov
        ]
        bars = axes.bar([b.label for b in aov], [b.aov for b in aov], yerr=errors, color=BLUE, capsize=4)
        axes.bar_label(bars, labels=[money(b.aov) for b in aov], fontsize=8, padding=2)
        axes.set_title("Average order value by channels used", fontsize=10, loc="left")
        axes.set_xlabel("distinct touchpoint channels")
        axes.margins(y=0.15)
        axes.spines[["top", "right"]].set_visible(False)
    return _svg(figure, "retention-aov")


def fcr_chart(report: Report) -> Markup | None:
    f = report.fcr
    if not f.overall.customers:
        return None
    by_channel = [r for r in f.by_channel if r.rate is not None]
    splits = [r for r in (f.after_other_channel, f.no_recent_contact, f.with_context, f.without_context)]
    splits = [r for r in splits if r.rate is not None]
    figure = _figure(8, 0.45 * max(len(by_channel), len(splits), 1) + 1.4)
    panels = [(rows, title) for rows, title in (
        (by_channel, "FCR by first contact's channel"),
        (splits, "FCR by what the agent knew"),
    ) if rows]  # fmt: skip
    for i, (rows, title) in enumerate(panels):
        _rate_bars(figure.add_subplot(1, len(panels), i + 1), rows, title, GREEN if i == 0 else ORANGE)
    return _svg(figure, "fcr")


# --- the page ----------------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="Omni">
<title>Omni report {{ r.since.strftime('%Y-%m-%d') }} to {{ r.until.strftime('%Y-%m-%d') }}</title>
<style>
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 960px; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.4rem; border-bottom: 1px solid #dde1e7; }
.meta, .note { color: #5b6372; } .sentence { margin: .3rem 0; }
table { border-collapse: collapse; margin: .6rem 0 1.2rem; font-size: .85rem; width: 100%; }
.wide { overflow-x: auto; }
th, td { padding: .25rem .5rem; border-bottom: 1px solid #eceef2; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f6f8; }
.significant { color: #1f6fb4; font-weight: 600; } .chart { max-width: 100%; height: auto; }
</style>
</head>
<body>
<h1>Omni report</h1>
<p class="meta">Period {{ time(r.since) }} to {{ time(r.until) }}; an order counts when it comes within
{{ "%g"|format(r.window_days) }} days (the attribution window); intervals are 95 %.
Generated {{ time(r.generated_at) }}.</p>

<h2 id="lift">Did the journeys pay?</h2>
{% for j in r.journeys %}<p class="sentence">{{ sentence(j) }}</p>
{% else %}<p class="note">No journey had anyone enrolled in the period.</p>{% endfor %}
{% if g.enabled %}<p class="sentence">All marketing against the global control group
({{ "{:,}".format(g.held_out.customers) }} customers held out of every journey and campaign):
{{ pct(g.messaged.rate) }} of everyone else bought against {{ pct(g.held_out.rate) }},
{{ points(g.lift.absolute) }}
(95 % interval {{ interval(g.lift.low, g.lift.high) }}), {{ g.lift.verdict }}.</p>
{% endif %}
{{ charts.lift or "" }}
<table>
<thead><tr><th>Journey</th><th>Group</th><th>Customers</th><th>Bought</th><th>Rate</th><th>95 % interval</th>
<th>Orders</th><th>Revenue</th><th>Per customer</th></tr></thead>
<tbody>
{% for label, lift, groups in lifts %}{% for arm, grp in groups %}
<tr><td>{{ label if loop.first else "" }}</td><td>{{ arm }}</td><td>{{ count(grp.customers) }}</td>
<td>{{ count(grp.converted) }}</td><td>{{ pct(grp.rate) }}</td>
<td>{{ interval(grp.rate_low, grp.rate_high, pct) }}</td><td>{{ count(grp.orders) }}</td>
<td>{{ money(grp.revenue) }}</td><td>{{ money(grp.revenue_per_customer) }}</td></tr>
{% endfor %}{% endfor %}
</tbody></table>
<table>
<thead><tr><th>Journey</th><th>Lift</th><th>95 % interval</th><th>Relative</th><th>p</th><th>Verdict</th>
<th>Extra orders</th><th>Extra revenue</th></tr></thead>
<tbody>
{% for label, lift, groups in lifts %}
<tr><td>{{ label }}</td><td class="{{ 'significant' if lift.verdict == 'significant' else '' }}">
{{ points(lift.absolute) }}</td><td>{{ interval(lift.low, lift.high) }}</td>
<td>{{ signed(lift.relative) }}</td>
<td>{{ pvalue(lift.p_value) }}</td><td>{{ lift.verdict }}</td><td>{{ number(lift.incremental_orders) }}</td>
<td>{{ money(lift.incremental_revenue) }}</td></tr>
{% endfor %}
</tbody></table>

<h2 id="funnels">Journey funnels</h2>
{% for f in r.funnels %}
<h3>{{ f.sequence }} <span class="meta">({{ "{:,}".format(f.enrolled) }} entered in the period)</span></h3>
{{ charts.funnels[loop.index0] or "" }}
<table><thead><tr><th>Step</th><th>Channel</th><th>Reached</th><th>Sent</th><th>Delivered</th><th>Opened</th>
<th>Clicked</th><th>Bought</th><th>Orders</th><th>Revenue</th></tr></thead><tbody>
{% for s in f.steps %}<tr><td>{{ s.step }}</td><td>{{ s.channel }}</td><td>{{ count(s.reached) }}</td>
<td>{{ count(s.sent) }}</td><td>{{ count(s.delivered) }}</td><td>{{ count(s.opened) }}</td>
<td>{{ count(s.clicked) }}</td><td>{{ count(s.converted) }}</td><td>{{ count(s.orders) }}</td>
<td>{{ money(s.revenue) }}</td></tr>
{% endfor %}{% for e in f.exits %}<tr><td>exit: {{ e.reason }}</td><td></td><td>{{ count(e.customers) }}</td>
<td colspan="7"></td></tr>{% endfor %}
</tbody></table>
{% if not f.feedback %}<p class="note">No provider feedback in the store: delivered, opened and clicked
are not counted.</p>{% endif %}
{% else %}<p class="note">No journey had anyone enrolled in the period.</p>{% endfor %}

<h2 id="channels">Conversion by channel</h2>
{{ charts.channels or "" }}
{{ rate_table("Touchpoint", "Active customers", "Bought", c.touchpoints) }}
<table><thead><tr><th>Placed on</th><th>Customers</th><th>Orders</th><th>Revenue</th><th>AOV</th></tr></thead>
<tbody>{% for o in c.placed %}<tr><td>{{ o.label }}</td><td>{{ count(o.customers) }}</td>
<td>{{ count(o.orders) }}</td>
<td>{{ money(o.revenue) }}</td><td>{{ money(o.aov) }}</td></tr>{% endfor %}</tbody></table>
<table><thead><tr><th>Message channel</th><th>Messaged</th><th>Bought</th><th>Rate</th><th>95 % interval</th>
<th>Last-touch orders</th><th>Revenue</th><th>Any-touch orders</th><th>Revenue</th></tr></thead><tbody>
{% for m in c.messages %}<tr><td>{{ m.channel }}</td><td>{{ count(m.messaged) }}</td>
<td>{{ count(m.converted) }}</td>
<td>{{ pct(m.rate) }}</td><td>{{ interval(m.low, m.high, pct) }}</td><td>{{ count(m.last_touch_orders) }}</td>
<td>{{ money(m.last_touch_revenue) }}</td><td>{{ count(m.any_touch_orders) }}</td>
<td>{{ money(m.any_touch_revenue) }}</td></tr>{% endfor %}</tbody></table>
<table><thead><tr><th>Path to the order</th><th>Customers</th><th>Orders</th><th>Revenue</th><th>AOV</th></tr>
</thead><tbody>{% for o in c.paths %}<tr><td>{{ o.label }}</td><td>{{ count(o.customers) }}</td>
<td>{{ count(o.orders) }}</td><td>{{ money(o.revenue) }}</td><td>{{ money(o.aov) }}</td></tr>{% endfor %}
</tbody></table>

<h2 id="omnichannel">Are omnichannel customers worth more?</h2>
{{ charts.retention_aov or "" }}
{{ rate_table("Channels used", "Bought last period", "Bought again", r.retention.bands) }}
<p class="sentence">Retention, multichannel (2+) minus single-channel: {{ points(r.retention.difference) }}
(95 % interval {{ interval(r.retention.low, r.retention.high) }}).</p>
<table><thead><tr><th>Channels used</th><th>Customers</th><th>Orders</th><th>Revenue</th><th>AOV</th>
</tr></thead>
<tbody>{% for b in r.aov.bands %}<tr><td>{{ b.label }}</td><td>{{ count(b.customers) }}</td>
<td>{{ count(b.orders) }}</td><td>{{ money(b.revenue) }}</td><td>{{ money(b.aov) }}</td></tr>{% endfor %}
</tbody></table>
{% for gap in r.aov.gaps %}<p class="sentence">AOV, {{ gap.group }} channels minus {{ gap.baseline }}:
{{ money(gap.difference) }} (95 % interval {{ interval(gap.low, gap.high, money) }}).</p>{% endfor %}

<h2 id="fcr">First-contact resolution</h2>
{{ charts.fcr or "" }}
{{ rate_table("Tickets", "Resolved", "At first contact", fcr_rows) }}

{% if r.notes %}<h2 id="notes">Notes</h2><ul>{% for n in r.notes %}<li>{{ n }}
</li>{% endfor %}</ul>{% endif %}
</body>
</html>
"""

RATE_TABLE = """{% macro rate_table(first, customers, converted, rows) -%}
<table><thead><tr><th>{{ first }}</th><th>{{ customers }}</th><th>{{ converted }}</th><th>Rate</th>
<th>95 % interval</th></tr></thead><tbody>
{% for row in rows %}<tr><td>{{ row.label }}</td><td>{{ count(row.customers) }}</td>
<td>{{ count(row.converted) }}</td>
<td>{{ pct(row.rate) }}</td><td>{{ interval(row.low, row.high, pct) }}</td></tr>{% endfor %}
</tbody></table>
{%- endmacro %}"""


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _pvalue(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


def _environment() -> Environment:
    environment = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)  # noqa: S701 - on
    helpers: dict[str, Callable[..., Any]] = {
        "pct": pct,
        "points": points,
        "money": money,
        "interval": interval,
        "count": _count,
        "pvalue": _pvalue,
        "signed": lambda value: "–" if value is None else f"{value * 100:+.1f}%",
        "number": lambda value: "–" if value is None else f"{value:+,.1f}",
        "time": _time,
    }
    environment.globals.update(helpers)
    return environment


def render_html(report: Report) -> str:
    """The whole report as one HTML document (str)."""
    environment = _environment()
    macros = environment.from_string(RATE_TABLE).module
    charts = {
        "lift": lift_chart(report),
        "funnels": [funnel_chart(f) for f in report.funnels],
        "channels": channel_chart(report),
        "retention_aov": retention_aov_chart(report),
        "fcr": fcr_chart(report),
    }
    lifts = [
        (j.sequence, j.lift, [("messaged", j.messaged), ("held out", j.held_out)])
        for j in report.journeys
        if j.lift.verdict != NO_DATA
    ]
    g = report.global_control
    if g.enabled:
        lifts.append(
            ("all marketing", g.lift, [("everyone else", g.messaged), ("global control", g.held_out)])
        )
    f = report.fcr
    fcr_rows = [
        f.overall,
        *[RateRow(f"first contact: {row.label}", row.customers, row.converted, row.rate, row.low, row.high)
          for row in f.by_channel],
        f.after_other_channel,
        f.no_recent_contact,
        f.with_context,
        f.without_context,
    ]  # fmt: skip
    page = environment.from_string(PAGE)
    return page.render(
        r=report,
        g=g,
        c=report.channels,
        charts=charts,
        lifts=lifts,
        fcr_rows=fcr_rows,
        rate_table=macros.rate_table,
        sentence=lambda journey: lift_sentence(journey, report.window_days),
    )


# Where the build-report flow keeps its reports when the settings name no folder (``report_dir``): not
# ./reports, which in a checkout (the usual OMNI_HOME) is this Python package.
DEFAULT_REPORT_DIR = Path("omni-reports")
REPORT_GLOB = "report-*.html"


def report_dir(settings: Settings) -> Path:
    """The folder of the HTML reports: ``report_dir`` (``OMNI_REPORT_DIR``), relative to the working
    directory, else ``omni-reports``."""
    return Path(settings.report_dir) if settings.report_dir else DEFAULT_REPORT_DIR


def report_file(directory: Path, now: Any) -> Path:
    """``report-YYYYMMDD-HHMM.html`` in ``directory``, named after the report's time."""
    return directory / f"report-{now:%Y%m%d-%H%M}.html"


def latest_report(directory: Path) -> Path | None:
    """The report written last in ``directory`` (by modification time, then name), or None."""
    if not directory.is_dir():
        return None
    files = [path for path in directory.glob(REPORT_GLOB) if path.is_file()]
    if not files:
        return None
    return max(files, key=lambda path: (path.stat().st_mtime_ns, path.name))


def write_html(report: Report, path: str | Path) -> None:
    """Write the report to ``path`` (its folder created), atomically: a reader (``omni serve``) never
    sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(render_html(report), encoding="utf-8")
    partial.replace(target)
