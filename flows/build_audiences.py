"""Flow: rebuild audiences (members and the entered / exited history).

One task per audience, run one after another in dependency order (an audience that refers to another
is built after it, in the same flow run, at the same ``now``). Each task is one transaction of
set-based SQL inside the database (see ``audiences.build``). A table artifact shows members, entered,
exited and duration per audience.

``now`` in the future is a preview: the next build at the real time replaces its history (see
``audiences.build``), so a preview never blocks the scheduled builds.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from audiences import build_audience, build_order, load_audiences
from flows.common import artifact_key, check_omni_home, fmt_time, ready_store
from omni.core.clock import utcnow
from omni.core.settings import get_settings
from profiles.db import get_engine


def _definitions(audiences_dir: str | None) -> dict:
    """The audiences in ``audiences_dir``, default ``OMNI_AUDIENCES_DIR``, else the built-in ones."""
    return load_audiences(Path(audiences_dir) if audiences_dir else get_settings().audiences_dir)


@task(cache_policy=NO_CACHE, task_run_name="build-{name}")
def build_one(name: str, database_url: str, now: datetime, audiences_dir: str | None) -> dict:
    definitions = _definitions(audiences_dir)
    engine = get_engine(database_url)
    result = build_audience(engine, name, now=now, definitions=definitions)
    return {
        "audience": name,
        "size": result.size,
        "entered": result.entered,
        "exited": result.exited,
        "duration_ms": result.duration_ms,
    }


@flow(name="build-audiences")
def build_audiences(
    names: list[str] | None = None,
    database_url: str | None = None,
    now: datetime | None = None,
    audiences_dir: str | None = None,
    artifact_prefix: str | None = None,
) -> dict[str, dict[str, int]]:
    """Build ``names`` (default: every audience) and what they refer to, at ``now`` (default: the
    flow's start, the same instant for every audience). Returns size, entered, exited per audience.
    ``artifact_prefix`` (default ``OMNI_ARTIFACT_PREFIX``) prefixes the artifact's key."""
    check_omni_home()
    log = get_run_logger()
    at = now or utcnow()
    definitions = _definitions(audiences_dir)  # fail fast on bad YAML
    key = artifact_key("audience-builds", artifact_prefix)
    database_url = database_url or get_settings().database_url
    ready_store(database_url)
    rows = []
    for name in build_order(definitions, names):
        row = build_one(name, database_url, at, audiences_dir)
        rows.append(row)
        log.info("%s: %s members, %s entered, %s exited", name, row["size"], row["entered"], row["exited"])
    create_table_artifact(
        key=key,
        table=[
            {
                "Audience": row["audience"],
                "Members": row["size"],
                "Entered": row["entered"],
                "Exited": row["exited"],
                "Build time (ms)": row["duration_ms"],
            }
            for row in rows
        ],
        description=f"Audiences built at {fmt_time(at)}: members, who entered and who exited since the "
        "previous build, and how long each build took.",
    )
    return {row["audience"]: {k: row[k] for k in ("size", "entered", "exited")} for row in rows}
