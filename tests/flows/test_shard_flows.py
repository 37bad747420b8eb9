"""The sharded run-sequences tick through Prefect (temporary API): shards as tasks of the tick's run, and as
flow runs of the run-sequences-shard deployment whose persisted reports the tick reads back."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client

sys.path.insert(0, str(Path(__file__).parent.parent / "sequences"))
from journey_kit import T0, outbox  # noqa: E402
from test_shards import _left_behind, _shoppers  # noqa: E402

import flows.run_sequences as run_sequences_module  # noqa: E402
from flows.run_sequences import SHARD_DEPLOYMENT, run_sequences, run_sequences_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 1200


async def _artifact_rows(flow_run_id, key):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        (artifact,) = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def _check_one_tick(engine, state) -> None:
    assert state.is_completed(), state
    result = state.result()["sequences"]["abandoned_cart"]
    emails = [m.delivery_id for m in outbox(engine, "email")]
    assert result["enrolled"] + result["held_out"] == CUSTOMERS
    assert result["steps"]["cart_email"]["sent"] == result["enrolled"] == len(emails)
    assert max(Counter(emails).values()) == 1
    assert _left_behind(engine, T0) == (0, 0)
    rows = asyncio.run(_artifact_rows(state.state_details.flow_run_id, "sequences-tick"))
    assert rows[0]["Step"] == "cart_email" and rows[0]["Sent"] == result["enrolled"]  # one tick, merged


@pytest.mark.postgresql
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_sharded_tick_runs_its_shards_as_tasks(prefect_harness, engine, database_url):
    _shoppers(engine, CUSTOMERS)
    state = run_sequences(
        now=T0, names=["abandoned_cart"], database_url=database_url, shards=4, return_state=True
    )
    _check_one_tick(engine, state)


@pytest.mark.postgresql
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_sharded_tick_fans_out_to_the_shard_deployment(prefect_harness, engine, database_url, monkeypatch):
    """``run_deployment`` replaced by running the shard flow here (no worker in a test): each shard's
    report comes back through its flow run's persisted result, as it does from a worker's."""
    import prefect.deployments

    started = []

    def run_deployment(name, *, parameters, flow_run_name, idempotency_key, timeout):
        assert name == SHARD_DEPLOYMENT and timeout == 0
        started.append(idempotency_key)
        state = run_sequences_shard(**parameters, return_state=True)
        with get_client(sync_client=True) as client:
            return client.read_flow_run(state.state_details.flow_run_id)

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(run_sequences_module, "SHARD_POLL_SECONDS", 0.1)
    _shoppers(engine, CUSTOMERS)
    state = run_sequences(
        now=T0,
        names=["abandoned_cart"],
        database_url=database_url,
        shards=3,
        shard_deployment=SHARD_DEPLOYMENT,
        return_state=True,
    )
    _check_one_tick(engine, state)
    assert len(set(started)) == 3


def test_prefect_yaml_deploys_the_shard_flow_next_to_the_tick():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    tick, shard = deployments["run-sequences"], deployments["run-sequences-shard"]
    assert tick["parameters"] == {"shards": 1, "shard_deployment": SHARD_DEPLOYMENT}
    assert SHARD_DEPLOYMENT == f"{run_sequences_shard.name}/{shard['name']}"
    assert shard["entrypoint"] == "flows/run_sequences.py:run_sequences_shard"
    assert "schedules" not in shard and "concurrency_limit" not in shard  # many shards run at once
