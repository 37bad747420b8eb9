"""Flow: build the report (deployment ``build-report``, daily at 06:00 UTC).

One task builds the whole report in the store (:func:`reports.build_report`: set-based SQL, one
transaction) and one writes it as a self-contained HTML file in ``report_dir``
(``report-YYYYMMDD-HHMM.html``; ``omni serve`` shows the newest at ``/reports/latest``). Artifacts a
marketer reads in the Prefect UI without opening raw data:

- ``report-summary`` (markdown): each journey's lift in one sentence with its 95 % interval, the global
  control group, whether omnichannel customers are worth more (retention, AOV), first-contact
  resolution, and where the HTML report is;
- ``report-journeys`` (table): per journey, messaged against held out, the lift, its interval and verdict;
- ``report-channels`` (table): conversion by touchpoint and by message channel;
- ``report-html`` (link): the HTML report as ``omni serve`` serves it.

Keys take ``artifact_prefix`` (default ``OMNI_ARTIFACT_PREFIX``) like every flow's.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, check_omni_home, fmt_time, ready_store
from flows.run_sequences import transient_database_error
from omni.core.clock import utcnow
from omni.core.settings import Settings, get_settings
from reports import build_report as build_report_now
from reports.html import report_dir as configured_report_dir
from reports.html import report_file, write_html
from reports.model import Report
from reports.text import interval, lift_sentence, money, pct, points

REPORT_PATH = "/reports/latest"


@task(
    name="build-report",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient_database_error,
)
def build(
    database_url: str,
    now: datetime,
    since: datetime | None,
    until: datetime | None,
    window_days: float | None,
) -> Report:
    settings = get_settings()
    engine = ready_store(database_url)
    window = timedelta(days=window_days) if window_days is not None else None
    return build_report_now(engine, settings=settings, now=now, since=since, until=until, window=window)


@task(name="write-html-report", cache_policy=NO_CACHE)
def write(report: Report, path: str) -> str:
    write_html(report, path)
    return path


def served_url(settings: Settings) -> str:
    """Where ``omni serve`` shows the newest report: ``public_url`` (or ``http://host:port``) + path."""
    base = settings.public_url or f"http://{settings.server_host}:{settings.server_port}"
    return base.rstrip("/") + REPORT_PATH


def summary_markdown(report: Report, *, html_path: str, url: str) -> str:
    """The report in sentences: what a marketer asks first, answered first."""
    period = f"{fmt_time(report.since)} to {fmt_time(report.until)}"
    lines = [
        "# Omni report",
        "",
        f"Period {period}; an order counts within {report.window_days:g} days (the attribution window). "
        "Intervals are 95 %.",
        "",
        "## Did the journeys pay?",
        "",
    ]
    lines += [f"- {lift_sentence(j, report.window_days)}" for j in report.journeys] or [
        "- No journey had anyone enrolled in the period."
    ]
    g = report.global_control
    if g.enabled:
        lines.append(
            f"- All marketing against the global control group ({g.held_out.customers:,} customers held out "
            f"of every journey and campaign): {pct(g.messaged.rate)} of everyone else bought against "
            f"{pct(g.held_out.rate)}, {points(g.lift.absolute)} (95 % interval "
            f"{interval(g.lift.low, g.lift.high)}), {g.lift.verdict}."
        )
    lines += ["", "## Are omnichannel customers worth more?", ""]
    r = report.retention
    for band in r.bands:
        lines.append(
            f"- Retention, {band.label} channel{'s' if band.label != '1' else ''}: {pct(band.rate)} of "
            f"{band.customers:,} bought again (95 % interval {interval(band.low, band.high, pct)})."
        )
    if r.difference is not None:
        lines.append(
            f"- Multichannel minus single-channel retention: {points(r.difference)} "
            f"(95 % interval {interval(r.low, r.high)})."
        )
    for band in report.aov.bands:
        lines.append(f"- Average order value, {band.label}: {money(band.aov)} over {band.orders:,} orders.")
    for gap in report.aov.gaps:
        lines.append(
            f"- AOV, {gap.group} channels minus {gap.baseline}: {money(gap.difference)} "
            f"(95 % interval {interval(gap.low, gap.high, money)})."
        )
    f = report.fcr
    lines += ["", "## Service", ""]
    if f.overall.customers:
        lines.append(
            f"- First-contact resolution: {pct(f.overall.rate)} of {f.overall.customers:,} resolved tickets "
            f"(with the profile looked up {pct(f.with_context.rate)}, without {pct(f.without_context.rate)})."
        )
    else:
        lines.append("- No service ticket was resolved in the period.")
    lines += ["", f"The full report with charts: [{url}]({url}) (file `{html_path}`)."]
    for note in report.notes:
        lines.append(f"\n> {note}")
    return "\n".join(lines)


def journey_rows(report: Report) -> list[dict[str, Any]]:
    rows = []
    for j in report.journeys:
        rows.append(
            {
                "Journey": j.sequence,
                "Messaged": j.messaged.customers,
                "Bought (messaged)": pct(j.messaged.rate),
                "Held out": j.held_out.customers,
                "Bought (held out)": pct(j.held_out.rate),
                "Lift": points(j.lift.absolute),
                "95 % interval": interval(j.lift.low, j.lift.high),
                "Verdict": j.lift.verdict,
                "Extra revenue": money(j.lift.incremental_revenue),
            }
        )
    return rows


def channel_rows(report: Report) -> list[dict[str, Any]]:
    rows = [
        {
            "Channel": row.label,
            "Kind": "touchpoint",
            "Customers": row.customers,
            "Bought": row.converted,
            "Rate": pct(row.rate),
            "95 % interval": interval(row.low, row.high, pct),
        }
        for row in report.channels.touchpoints
    ]
    rows += [
        {
            "Channel": row.channel,
            "Kind": "message",
            "Customers": row.messaged,
            "Bought": row.converted,
            "Rate": pct(row.rate),
            "95 % interval": interval(row.low, row.high, pct),
        }
        for row in report.channels.messages
    ]
    return rows


@flow(name="build-report")
def build_report(
    database_url: str | None = None,
    now: datetime | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    window_days: float | None = None,
    report_dir: str | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, Any]:
    """Build the report at ``now`` (default: the flow's start) for [``since``, ``until``) (default: the
    last ``report_period_days``), write the HTML report into ``report_dir`` (default ``OMNI_REPORT_DIR``,
    else ``omni-reports``) and publish the artifacts. Returns the report's JSON document with ``html``,
    the file written, and ``sentences``, each journey's lift in words."""
    check_omni_home()
    log = get_run_logger()
    settings = get_settings()
    at = now or utcnow()
    report = build(database_url or settings.database_url, at, since, until, window_days)
    directory = Path(report_dir) if report_dir else configured_report_dir(settings)
    path = str(report_file(directory, at).resolve())
    write(report, path)
    url = served_url(settings)
    for journey in report.journeys:
        log.info("%s", lift_sentence(journey, report.window_days))
    create_markdown_artifact(
        key=artifact_key("report-summary", artifact_prefix),
        markdown=summary_markdown(report, html_path=path, url=url),
        description=f"The report at {fmt_time(at)} in sentences: journey lift, omnichannel value, service.",
    )
    create_table_artifact(
        key=artifact_key("report-journeys", artifact_prefix),
        table=journey_rows(report),
        description="Per journey: customers messaged and held out, the share who bought within the window, "
        "the lift with its 95 % interval, and whether it can be told apart from nothing.",
    )
    create_table_artifact(
        key=artifact_key("report-channels", artifact_prefix),
        table=channel_rows(report),
        description="Conversion by touchpoint (active there in the period) and by message channel "
        "(sent a message), with 95 % intervals.",
    )
    create_link_artifact(
        key=artifact_key("report-html", artifact_prefix),
        link=url,
        link_text="The HTML report (omni serve, read key)",
        description=f"The report with charts, served by omni serve; the file is {path}.",
    )
    document = report.to_dict()
    document["html"] = path
    document["sentences"] = [lift_sentence(j, report.window_days) for j in report.journeys]
    return document
