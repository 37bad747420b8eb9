"""Flow: ingest Segment-spec files into the profile store.

One task per file: the file is streamed and committed in batches inside the task (a task per batch
would cost Prefect more than the work). A table artifact shows a marketer what arrived and what was
rejected, and why.

``paths`` has no default (the ``ingest-events`` deployment asks for it at each run): files or folders,
relative to ``OMNI_HOME`` in a deployment run. A folder means every ``*.jsonl`` and ``*.json`` file in it
(none is fine: nothing to ingest). A path that does not exist fails the run before anything is ingested,
naming every missing path.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import artifact_key, check_omni_home, ready_store
from omni.core.settings import get_settings
from profiles.db import get_engine
from profiles.ingest import IngestOptions, IngestResult, ingest_files

INPUT_SUFFIXES = (".jsonl", ".json", ".ndjson")


class MissingInput(FileNotFoundError):
    """Paths given to ingest-events that do not exist."""


def input_files(paths: list[str]) -> list[str]:
    """Every file to ingest, in order: each path that is a file, and the JSON files of each folder."""
    missing = [path for path in paths if not Path(path).exists()]
    if missing:
        raise MissingInput(
            f"no such file or folder: {', '.join(missing)} (relative paths start in {Path.cwd()}, "
            "OMNI_HOME in a deployment run)"
        )
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.iterdir()) if p.suffix in INPUT_SUFFIXES and p.is_file())
        else:
            files.append(str(path))
    return files


@task(cache_policy=NO_CACHE)
def ingest_file(path: str, database_url: str, now: datetime | None) -> IngestResult:
    options = IngestOptions.of(get_settings())
    return ingest_files(get_engine(database_url), [path], options=options, now=now)


@flow(name="ingest-events")
def ingest_events(
    paths: list[str],
    database_url: str | None = None,
    now: datetime | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, dict[str, int]]:
    """Ingest each path (a file of JSON lines or a JSON document, or a folder of them); returns counts
    per file."""
    check_omni_home()
    log = get_run_logger()
    if not paths:
        raise ValueError("paths is empty: give the files or folders to ingest")
    files = input_files(paths)
    key = artifact_key("ingest-summary", artifact_prefix)
    database_url = database_url or get_settings().database_url
    ready_store(database_url)
    if not files:
        log.info("nothing to ingest in %s", ", ".join(paths))
    results: dict[str, dict[str, int]] = {}
    rows = []
    for path in files:
        result = ingest_file(path, database_url, now)
        counts = result.as_dict()
        results[path] = counts
        rows.append(
            {
                "File": path,
                "Accepted": counts["accepted"],
                "Duplicates": counts["duplicates"],
                "Rejected": counts["rejected"],
            }
        )
        log.info("%s: %s", path, counts)
        for source, reason in result.samples[:5]:
            log.warning("rejected %s: %s", source, reason)
    create_table_artifact(
        key=key,
        table=rows or [{"File": "(no files)", "Accepted": 0, "Duplicates": 0, "Rejected": 0}],
        description="Payloads accepted, duplicates (a messageId seen before) and rejected per file. "
        "Rejected payloads are kept with their reason: `omni rejected list`.",
    )
    return results
