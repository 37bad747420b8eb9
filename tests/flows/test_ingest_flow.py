"""The ingest-events flow under a temporary Prefect API: counts per file and a readable artifact."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from prefect.client.orchestration import get_client

from flows.ingest_events import ingest_events


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
    assert table == [{"file": str(path), "accepted": 1, "duplicates": 1, "rejected": 1}]
