"""Flow: send one campaign (deployment ``send-campaign``; ``omni campaigns schedule NAME --at TIME``
creates a scheduled run of it). The same consent, quiet-hours, frequency-cap and exactly-once guarantees
as sequences. A table artifact (key ``campaign-<name>``) shows the campaign's audience, channel and what
went out; a markdown one (``campaign-<name>-summary``) says it in a sentence."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, check_omni_home, fmt_time, load_settings, ready_store
from flows.run_sequences import transient_database_error
from omni.core.clock import utcnow
from omni.core.settings import get_settings
from sequences.campaigns import send_campaign as send_campaign_now
from sequences.definitions import load_campaigns
from sequences.reports import STEP_COLUMNS, without_empty_columns


@task(
    name="send-campaign-deliveries",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient_database_error,
)
def send_deliveries(name: str, now: datetime, database_url: str | None) -> Any:
    settings = load_settings()
    engine = ready_store(database_url or settings.database_url)
    return send_campaign_now(engine, name, now=now, settings=settings)


def campaign_row(name: str, created: int, counts: Any, campaign: Any = None) -> dict[str, Any]:
    """One row a marketer reads: the campaign, whom and how it targets, and what happened."""
    values = counts.as_dict()
    return {
        "Campaign": name,
        "Audience": getattr(campaign, "audience", ""),
        "Channel": getattr(campaign, "channel", ""),
        "Template": getattr(campaign, "template", ""),
        "New deliveries": created,
        **{label: values.get(field, 0) for field, label in STEP_COLUMNS.items()},
    }


def publish_campaign(name: str, created: int, report: Any, *, key: str, campaign: Any = None) -> None:
    counts = report.campaigns[name]
    at = fmt_time(report.now)
    audience = getattr(campaign, "audience", None)
    create_table_artifact(
        key=key,
        # Only the counts something happened in, so the row fits a 1,400-pixel screen.
        table=without_empty_columns(
            [campaign_row(name, created, counts, campaign)],
            keep=("Campaign", "Audience", "Channel", "Template", "New deliveries", "Sent"),
        ),
        description=f"Campaign {name} at {at}: new deliveries for the audience's current members, and "
        "messages sent, postponed (quiet hours, frequency cap: they go out with a later tick), skipped "
        "for consent and failed.",
    )
    lines = [
        f"## Campaign {name} at {at}",
        "",
        f"To **{audience}** by {getattr(campaign, 'channel', '?')}: " if audience else "",
        f"{created} new deliveries; **{counts.sent} sent**, {counts.postponed} postponed, "
        f"{counts.skipped_consent} skipped for consent, {counts.failed} failed.",
    ]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(line for line in lines if line))


@flow(name="send-campaign", timeout_seconds=3600)
def send_campaign(
    name: str,
    now: datetime | None = None,
    database_url: str | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, Any]:
    """Send campaign ``name`` (``campaigns/<name>.yaml``) at ``now`` (default: the current time).
    ``artifact_prefix`` (default ``OMNI_ARTIFACT_PREFIX``) prefixes the artifacts' keys."""
    check_omni_home()
    key = artifact_key(f"campaign-{name}", artifact_prefix)
    created, report = send_deliveries(name, now or utcnow(), database_url)
    counts = report.campaigns[name]
    get_run_logger().info(
        "campaign %s: %d deliveries created, %d sent, %d postponed, %d skipped for consent",
        name,
        created,
        counts.sent,
        counts.postponed,
        counts.skipped_consent,
    )
    campaign = load_campaigns(get_settings().campaigns_dir).get(name)  # for the artifact: no credentials
    publish_campaign(name, created, report, key=key, campaign=campaign)
    return {"created": created, **report.as_dict()}
