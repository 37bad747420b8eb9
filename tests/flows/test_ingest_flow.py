"""The ingest-events flow under a temporary Prefect API: counts per file and a readable artifact."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from prefect.client.orchestration import get_client

from flows.ingest_events import ingest_events


async def _artifact(key: str):
    async with get_client() as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
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

    artifact = asyncio.run(_artifact("ingest-summary"))
    assert artifact is not None and artifact.type == "table"
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert table[-1]["file"] == str(path) or table[0]["file"] == str(path)
