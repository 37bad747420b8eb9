"""Flow: send one campaign (deployment ``send-campaign``; ``omni campaigns schedule NAME --at TIME``
creates a scheduled run of it). The same consent, quiet-hours, frequency-cap and exactly-once guarantees
as sequences; a table artifact shows what went out."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.run_sequences import publish_report, transient_database_error
from profiles.db import get_engine, require_schema, utcnow
from sequences.campaigns import send_campaign as send_campaign_now


@task(
    name="send-campaign-deliveries",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=transient_database_error,
)
def send_deliveries(name: str, now: datetime, database_url: str | None) -> Any:
    engine = get_engine(database_url)
    require_schema(engine)
    return send_campaign_now(engine, name, now=now)


@flow(name="send-campaign", timeout_seconds=3600)
def send_campaign(name: str, now: datetime | None = None, database_url: str | None = None) -> dict[str, Any]:
    """Send campaign ``name`` (``campaigns/<name>.yaml``) at ``now`` (default: the current time)."""
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
    publish_report(report, key=f"campaign-{name.replace('_', '-')}", title=f"Campaign {name}")
    return {"created": created, **report.as_dict()}
