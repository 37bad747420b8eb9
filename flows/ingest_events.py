"""Flow: ingest Segment-spec files into the profile store.

One task per file: the file is streamed and committed in batches inside the task (a task per batch
would cost Prefect more than the work). A table artifact shows a marketer what arrived and what was
rejected, and why.
"""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from profiles.db import get_engine, require_schema
from profiles.ingest import IngestResult, ingest_files


@task(cache_policy=NO_CACHE)
def ingest_file(path: str, database_url: str | None, now: datetime | None) -> IngestResult:
    engine = get_engine(database_url)
    require_schema(engine)
    return ingest_files(engine, [path], now=now)


@flow(name="ingest-events")
def ingest_events(
    paths: list[str], database_url: str | None = None, now: datetime | None = None
) -> dict[str, dict[str, int]]:
    """Ingest each path (JSON lines or a JSON document); returns counts per path."""
    log = get_run_logger()
    results: dict[str, dict[str, int]] = {}
    rows = []
    for path in paths:
        result = ingest_file(path, database_url, now)
        results[path] = result.as_dict()
        rows.append({"file": path, **result.as_dict()})
        log.info("%s: %s", path, result.as_dict())
        for source, reason in result.samples[:5]:
            log.warning("rejected %s: %s", source, reason)
    create_table_artifact(
        key="ingest-summary",
        table=rows,
        description="Payloads accepted, duplicates (repeated messageId) and rejected per file. "
        "Rejected payloads are kept with their reason: `omni rejected list`.",
    )
    return results
