"""The run-sequences and send-campaign flows under a temporary Prefect API, and scheduling a campaign."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent.parent / "sequences"))
from journey_kit import T0, cart_campaign, customer, outbox, seed_stores  # noqa: E402

from flows.run_sequences import run_sequences  # noqa: E402
from flows.send_campaign import send_campaign  # noqa: E402
from omni.cli import app  # noqa: E402


async def _artifacts(flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


async def _task_run_names(flow_run_id, until):
    """The flow run's task run names once ``until(names)`` holds (or the last ones read).

    The server records task runs from events, a little after the flow returns: poll, bounded."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        for _ in range(120):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            names = [run.name for run in runs]
            if until(names):
                return names
            await asyncio.sleep(0.25)
        return names


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_run_sequences_flow_ticks_and_publishes_what_a_marketer_reads(prefect_harness, engine, database_url):
    seed_stores(engine)
    customer(engine, 1)
    state = run_sequences(now=T0, names=["abandoned_cart"], database_url=database_url, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["sequences"]["abandoned_cart"]["steps"]["cart_email"]["sent"] == 1
    assert [m.customer_id for m in outbox(engine, "email")] == [1]

    flow_run_id = state.state_details.flow_run_id
    artifacts = {a.key: a for a in asyncio.run(_artifacts(flow_run_id))}
    table = artifacts["sequences-tick"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    # Per send step, in the sequence's order; only the counts something happened in (fits 1,400 px).
    assert rows == [
        {"Sequence": "abandoned_cart", "Step": "cart_email", "Sent": 1},
        {"Sequence": "abandoned_cart", "Step": "retarget", "Sent": 0},
        {"Sequence": "abandoned_cart", "Step": "pickup_reminder", "Sent": 0},
    ]
    journeys = artifacts["sequences-tick-journeys"].data
    journeys = json.loads(journeys) if isinstance(journeys, str) else journeys
    assert journeys == [
        {
            "Sequence": "abandoned_cart",
            "Enrolled": 1,
            "Held out": 0,
            "Exited": 0,
            "Completed": 0,
            "Exit reasons": "",
        }
    ]
    summary = artifacts["sequences-tick-summary"].data
    assert "abandoned_cart" in summary and "1 messages sent" in summary
    assert "0 postponed" in summary and "0 skipped for consent" in summary
    # A task per stage (each works through batches of customers), never a task per customer.
    names = asyncio.run(
        _task_run_names(
            flow_run_id, until=lambda names: any(n.startswith("dispatch-deliveries") for n in names)
        )
    )
    assert any(n.startswith("dispatch-deliveries") for n in names)
    assert len(names) < 20


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_send_campaign_flow(prefect_harness, engine, database_url, tmp_path, monkeypatch):
    from omni.core.settings import get_settings

    cart_campaign(tmp_path, monkeypatch, "cart_push")
    seed_stores(engine)
    customer(engine, 1)
    result = send_campaign(name="cart_push", now=T0, database_url=database_url)
    assert result["created"] == 1
    assert result["campaigns"]["cart_push"]["sent"] == 1
    again = send_campaign(name="cart_push", now=T0 + timedelta(minutes=5), database_url=database_url)
    assert again["created"] == 0 and again["campaigns"]["cart_push"]["sent"] == 0
    get_settings.cache_clear()


def test_campaigns_schedule_creates_a_scheduled_flow_run(prefect_harness):
    deployment = send_campaign.to_deployment(name="send-campaign")
    deployment.apply()
    result = CliRunner().invoke(
        app, ["campaigns", "schedule", "store_event", "--at", "2030-01-15T09:00:00Z", "--json"]
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["state"] == "Scheduled"
    assert body["scheduled_time"].startswith("2030-01-15T09:00:00")

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(body["flow_run_id"])

    flow_run = asyncio.run(read())
    assert flow_run.parameters == {"name": "store_event"}
    assert flow_run.state.state_details.scheduled_time.isoformat().startswith("2030-01-15T09:00:00")
    missing = CliRunner().invoke(app, ["campaigns", "schedule", "nope"])
    assert missing.exit_code == 2
