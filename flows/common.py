"""What Omni's flows share: the settings they hand down (:func:`load_settings`), where a deployment run
works (``OMNI_HOME``), a store whose schema is ready, artifact keys (with the optional prefix that keeps
the demo's artifacts apart) and times as people read them.

Deployment runs (a worker, or ``serve()``) work in ``OMNI_HOME``: the folder holding the store when it
is SQLite (``omni.db``), ``campaigns/``, and any folders the settings name relatively. The pull step of
``prefect.yaml`` (:func:`enter_omni_home`) moves there before the flow is loaded, and fails the run with
a clear message when ``OMNI_HOME`` is not set in the worker's environment, instead of quietly running in
whatever directory the worker was started from. Flows called directly (tests, the demo, a script) work
in the current directory.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from omni.core.settings import Settings, get_settings

WORKER_ENVIRONMENT = (
    "set it in the worker's environment to the folder Omni works in (the checkout holding prefect.yaml, "
    "or any folder with the store and campaigns/), then restart the worker; see the README, Deploying "
    "with Prefect"
)


def load_settings() -> Settings:
    """The settings a flow run or a command hands down: ``OMNI_...`` from the environment, and the
    credentials of the configured connectors the environment does not set from their Prefect Secret
    blocks (:func:`flows.secrets.resolve_secrets`)."""
    from flows.secrets import resolve_secrets  # the connectors: only when something will send

    return resolve_secrets(get_settings())


class OmniHomeError(RuntimeError):
    """A deployment run has no usable ``OMNI_HOME``."""


def _home_from_environment() -> Path:
    value = os.environ.get("OMNI_HOME", "").strip()
    if not value:
        raise OmniHomeError(f"OMNI_HOME is not set: {WORKER_ENVIRONMENT}")
    home = Path(value).expanduser()
    if not home.is_dir():
        raise OmniHomeError(f"OMNI_HOME={value} is not a directory: {WORKER_ENVIRONMENT}")
    return home.resolve()


def enter_omni_home() -> dict[str, str]:
    """Pull step of prefect.yaml (``flows.common.enter_omni_home: {}``): change to ``OMNI_HOME``, or fail
    the run with what to set. Returns ``{"directory": ...}`` like Prefect's ``set_working_directory``."""
    home = _home_from_environment()
    os.chdir(home)
    return {"directory": str(home)}


def in_deployment_run() -> bool:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def check_omni_home() -> None:
    """In a deployment run, make sure the run works in ``OMNI_HOME`` (a ``serve()`` process has no pull
    step); flows called directly keep the current directory."""
    if not in_deployment_run():
        return
    home = _home_from_environment()
    if Path.cwd().resolve() != home:
        os.chdir(home)


def ready_store(database_url: str) -> Engine:
    """The store's engine, its schema created or upgraded first when it is not at the code's revision
    (the idempotent ``omni init``), so a fresh deployment's first run works. On PostgreSQL an advisory
    lock keeps two flows starting at once from migrating together."""
    from sqlalchemy import func, select

    from profiles.db import SchemaNotReady, get_engine, require_schema, upgrade_schema

    engine = get_engine(database_url)
    try:
        require_schema(engine)
        return engine
    except SchemaNotReady:
        pass
    with engine.connect() as lock:
        postgres = engine.dialect.name == "postgresql"
        key = 0x6F6D6E69  # "omni"
        if postgres:
            lock.execute(select(func.pg_advisory_lock(key)))
        try:
            try:
                require_schema(engine)  # another flow may have migrated it meanwhile
            except SchemaNotReady:
                upgrade_schema(engine)
        finally:
            if postgres:
                lock.execute(select(func.pg_advisory_unlock(key)))
                lock.commit()
    return engine


_KEY_PREFIX = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def artifact_key(key: str, prefix: str | None = None) -> str:
    """``key``, or ``<prefix>-<key>``. ``prefix`` defaults to ``OMNI_ARTIFACT_PREFIX`` (empty: the
    production keys). The demo passes ``demo`` so it never writes a new version of the keys the
    deployments publish. Prefect allows lowercase letters, digits and dashes only."""
    if prefix is None:
        prefix = get_settings().artifact_prefix
    prefix = (prefix or "").strip().lower().strip("-")
    if prefix and not _KEY_PREFIX.match(prefix):
        raise ValueError(f"artifact prefix {prefix!r}: use lowercase letters, digits and dashes")
    key = key.lower().replace("_", "-")
    return f"{prefix}-{key}" if prefix else key


def fmt_time(value: datetime | None) -> str:
    """``2026-06-01 12:00 UTC`` (seconds only when not zero), never microseconds."""
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%d %H:%M:%S" if value.second else "%Y-%m-%d %H:%M")
    return f"{text} UTC"


def table_cell(value: Any) -> Any:
    """A value as a table artifact shows it: times without microseconds, the rest as is."""
    return fmt_time(value) if isinstance(value, datetime) else value
