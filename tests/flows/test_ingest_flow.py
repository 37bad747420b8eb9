"""The ingest-events flow under a temporary Prefect API: counts per file and a readable artifact."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.ingest_events import ingest_events

ROOT = Path(__file__).resolve().parents[2]


async def _artifact(key: str, flow_run_id):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
        return artifacts[0] if artifacts else None


def test_ingest_events_flow_counts_and_publishes_a_table(prefect_harness, database_url, tmp_path):
    path = tmp_path / "feed.jsonl"
    path.write_text(
        json.dumps({"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "f1"})
        + "\n{oops\n"
        + json.dumps({"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "f1"})
        + "\n"
    )
    state = ingest_events(
        paths=[str(path)], database_url=database_url, now=datetime(2026, 6, 2, tzinfo=UTC), return_state=True
    )
    assert state.is_completed()
    assert state.result() == {str(path): {"accepted": 1, "duplicates": 1, "rejected": 1}}

    import asyncio

    artifact = asyncio.run(_artifact("ingest-summary", state.state_details.flow_run_id))
    assert artifact is not None and artifact.type == "table"
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert table == [{"File": str(path), "Accepted": 1, "Duplicates": 1, "Rejected": 1}]


def test_ingest_events_fails_clearly_on_a_missing_path_and_takes_folders(
    prefect_harness, database_url, tmp_path
):
    missing = tmp_path / "nope.jsonl"
    state = ingest_events(paths=[str(missing)], database_url=database_url, return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*nope.jsonl"):
        state.result()

    folder = tmp_path / "incoming"
    folder.mkdir()
    assert ingest_events(paths=[str(folder)], database_url=database_url) == {}  # empty: nothing to do
    (folder / "a.jsonl").write_text(
        json.dumps({"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "a1"}) + "\n"
    )
    (folder / "notes.txt").write_text("not an export")
    result = ingest_events(
        paths=[str(folder)], database_url=database_url, now=datetime(2026, 6, 2, tzinfo=UTC)
    )
    assert result == {str(folder / "a.jsonl"): {"accepted": 1, "duplicates": 0, "rejected": 0}}


def test_ingest_events_has_no_default_paths():
    """The deployment asks for paths at each run: no default that may not exist on the worker."""
    import inspect

    import yaml

    assert inspect.signature(ingest_events.fn).parameters["paths"].default is inspect.Parameter.empty
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert "paths" not in deployments["ingest-events"]["parameters"]
