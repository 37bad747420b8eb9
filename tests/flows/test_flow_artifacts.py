"""Artifacts an operator reads at a glance: campaign columns for campaigns, human headers, times to the
minute (never microseconds), and a prefix that keeps trial runs (the demo) off the production keys."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

sys.path.insert(0, str(Path(__file__).parent.parent / "sequences"))
from journey_kit import T0, cart_campaign, customer, seed_stores  # noqa: E402

from flows.common import artifact_key, fmt_time  # noqa: E402
from flows.run_sequences import run_sequences  # noqa: E402
from flows.send_campaign import send_campaign  # noqa: E402

MICROSECONDS = re.compile(r"\d{2}:\d{2}:\d{2}\.\d+|\+00:00")


async def _artifacts(flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts}


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_times_and_keys():
    assert fmt_time(datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)) == "2026-06-01 12:00 UTC"
    assert fmt_time(datetime(2026, 6, 1, 12, 0, 7, 5, tzinfo=UTC)) == "2026-06-01 12:00:07 UTC"
    assert artifact_key("campaign-store_event", "") == "campaign-store-event"
    assert artifact_key("sequences-tick", "demo") == "demo-sequences-tick"
    with pytest.raises(ValueError, match="lowercase"):
        artifact_key("sequences-tick", "My Demo")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_campaign_artifacts_have_campaign_columns(
    prefect_harness, engine, database_url, tmp_path, monkeypatch
):
    from omni.core.settings import get_settings

    cart_campaign(tmp_path, monkeypatch, "cart_push")
    seed_stores(engine)
    customer(engine, 1)
    now = T0.replace(microsecond=250000)
    state = send_campaign(name="cart_push", now=now, database_url=database_url, return_state=True)
    assert state.is_completed()
    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    assert set(artifacts) == {"campaign-cart-push", "campaign-cart-push-summary"}
    [row] = _table(artifacts["campaign-cart-push"])
    assert list(row)[:5] == ["Campaign", "Audience", "Channel", "Template", "New deliveries"]
    assert (
        row["Campaign"] == "cart_push" and row["Audience"] == "cart_abandoners" and row["Channel"] == "email"
    )
    assert row["Sent"] == 1 and row["New deliveries"] == 1
    assert not {"Sequence", "Step", "Enrolled", "Held out"} & set(row)  # no sequence columns
    assert "Failed" not in row  # only the counts something happened in: the row fits 1,400 pixels
    for artifact in artifacts.values():
        text = f"{artifact.description or ''} {artifact.data if artifact.type == 'markdown' else ''}"
        assert not MICROSECONDS.search(text), text
    assert fmt_time(now) in artifacts["campaign-cart-push"].description
    assert "**1 sent**" in artifacts["campaign-cart-push-summary"].data
    get_settings.cache_clear()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_prefix_keeps_a_trial_run_off_the_production_keys(prefect_harness, engine, database_url):
    seed_stores(engine)
    customer(engine, 1)
    now = T0.replace(microsecond=999)
    state = run_sequences(
        now=now,
        names=["abandoned_cart"],
        database_url=database_url,
        artifact_prefix="demo",
        return_state=True,
    )
    assert state.is_completed()
    artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    assert set(artifacts) == {
        "demo-sequences-tick",
        "demo-sequences-tick-journeys",
        "demo-sequences-tick-summary",
    }
    rows = _table(artifacts["demo-sequences-tick"])
    assert rows and all(isinstance(column, str) and "_" not in column for column in rows[0])  # human headers
    for artifact in artifacts.values():
        text = f"{artifact.description or ''} {artifact.data if artifact.type == 'markdown' else ''}"
        assert not MICROSECONDS.search(text), text


def test_the_setting_is_the_default_prefix(monkeypatch):
    from omni.core.settings import get_settings

    monkeypatch.setenv("OMNI_ARTIFACT_PREFIX", "staging")
    get_settings.cache_clear()
    try:
        assert artifact_key("audience-builds") == "staging-audience-builds"
        assert artifact_key("audience-builds", "") == "audience-builds"  # an explicit "" wins
    finally:
        get_settings.cache_clear()
