"""The ASGI app of ``omni serve``.

``create_app(settings, engine=None)`` builds one FastAPI app over the profile store: ``/healthz`` here, and
the ``router`` of each module in :data:`ROUTER_MODULES` that exists (the tracking API, the profile API, the
customer page, unsubscribe and the preference centre, provider webhooks, the report page). Each router
reads the store through the dependencies in :mod:`omni.server.deps`.

The processor of the live intake (``profiles.intake``) ingests what the tracking API queued, within a
second. Under ``omni serve`` it runs in a child process of its own (``omni.server.processor``), supervised
by the ``omni serve`` process, and the app (each worker of ``--workers N``) only wakes it and reports its
health; ``create_app(..., processor_dir=...)`` says where it is. Without ``processor_dir`` (tests, an app
embedded elsewhere), ``background`` runs it in a thread of the app's process instead.

``/healthz``: 200 ``{"ok": true, "store": "sqlite", "processor": "running"}`` when the store answers
and the processor is running (``processor`` is absent when the app runs none); 503 with ``ok`` false and
the reason otherwise.

Request logs (logger ``omni.server.access``, one line per request): method, the route's path template
(``/v1/profiles/{key}``, never the actual key, query string or body), status, duration and, for the
tracking API, the write key's source. So logs never hold keys, tokens or a customer's data.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from omni.core.clock import utcnow
from omni.core.settings import Settings, get_settings
from omni.server.processor import RUN_DIR_ENV, Waker, processor_capacity, processor_problem
from profiles.db import create_store_engine, require_schema
from profiles.ingest import IngestOptions
from profiles.intake import IntakeOptions, IntakeProcessor

access_log = logging.getLogger("omni.server.access")

# The routers of the app, each a module defining ``router`` (a fastapi.APIRouter).
ROUTER_MODULES = (
    "omni.server.tracking",
    "omni.server.profile_api",
    "omni.server.customer_page",
    "omni.server.unsubscribe",
    "omni.server.webhooks",
    "omni.server.report_page",
)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    background: bool = True,
    processor_dir: Path | None = None,
) -> FastAPI:
    """The app over the store ``engine`` (default: ``settings.database_url``).

    ``processor_dir``: the run directory of the intake processor ``omni serve`` supervises (see
    :mod:`omni.server.processor`); without it, ``background`` runs the processor in a thread of this
    process (tests may switch it off)."""
    engine = engine or create_store_engine(settings.database_url)
    require_schema(engine)
    app = FastAPI(title="Omni", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.add_middleware(AccessLog)
    app.state.engine = engine
    app.state.settings = settings
    app.state.clock = utcnow  # routers read the time through deps.now_of; tests may fix it
    app.state.background = background and processor_dir is None
    app.state.processor_dir = processor_dir
    app.state.intake_processor = None

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is "not healthy"
            return JSONResponse({"ok": False, "store": f"unreachable: {type(exc).__name__}"}, status_code=503)
        answer: dict[str, object] = {"ok": True, "store": engine.dialect.name}
        problem = _processor_problem(app)
        if problem is not False:
            answer["processor"] = problem or "running"
            if problem:
                answer["ok"] = False
                return JSONResponse(answer, status_code=503)
        return JSONResponse(answer)

    for name in ROUTER_MODULES:
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)
    tracking = importlib.import_module("omni.server.tracking")
    app.openapi = lambda: _openapi(app, tracking.openapi_paths())  # type: ignore[method-assign]
    return app


def _processor_problem(app: FastAPI) -> str | None | Literal[False]:
    """Why the app's intake processor is not running; None when it is; False when the app runs none."""
    if app.state.processor_dir is not None:
        return processor_problem(app.state.processor_dir)
    if not app.state.background:
        return False
    processor = app.state.intake_processor
    if processor is None:  # the lifespan has not started it yet
        return "starting"
    return None if processor.alive else "not running (its thread died)"


def processor_waker(app: FastAPI) -> Callable[[], None] | None:
    """What the tracking API calls after each commit to wake the intake processor."""
    if app.state.processor_dir is not None:
        return Waker(app.state.processor_dir)
    processor = app.state.intake_processor
    return processor.wake if processor is not None else None


def processor_capacity_reader(app: FastAPI) -> Callable[[], float | None] | None:
    """What tells the tracking API how many bytes a second the intake processor ingests."""
    if app.state.processor_dir is not None:
        run_dir = app.state.processor_dir
        return lambda: processor_capacity(run_dir)
    processor = app.state.intake_processor
    return (lambda: processor.capacity) if processor is not None else None


def _openapi(app: FastAPI, extra_paths: dict) -> dict:
    """The app's OpenAPI schema, with the tracking API's paths (plain routes, documented by hand)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema["paths"] = {**extra_paths, **schema.get("paths", {})}
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["writeKey"] = {
            "type": "http",
            "scheme": "basic",
            "description": "A write key (omni keys create) as the user name, empty password.",
        }
        app.openapi_schema = schema
    return app.openapi_schema


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the intake processor (``background``) and the tracking API's writer; stop both, the writer
    first (it commits what is still waiting), at shutdown."""
    from omni.server.tracking import tracking_state

    processor = None
    if app.state.background:
        settings = app.state.settings
        processor = IntakeProcessor(
            app.state.engine,
            IntakeOptions.of(settings, app.state.engine.dialect.name, IngestOptions.of(settings)),
        )
        processor.start()
    app.state.intake_processor = processor
    app.state.wake = processor_waker(app)
    app.state.capacity = processor_capacity_reader(app)
    tracking = tracking_state(app)
    try:
        yield
    finally:
        tracking.writer.stop()
        if processor is not None:
            processor.stop()


class AccessLog:
    """ASGI middleware: one log line per HTTP request, without anything a request carries (see the
    module's docstring)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get("omni.route") or "(no route)"
            source = (scope.get("state") or {}).get("source")
            access_log.info(
                "%s %s %d %.1fms%s",
                scope["method"],
                path,
                status,
                (time.perf_counter() - started) * 1000,
                f" source={source}" if source else "",
            )


def app_from_settings() -> FastAPI:
    """The app over the environment's settings (``OMNI_*``): what each worker process of ``omni serve
    --workers N`` builds (uvicorn's factory mode); ``omni serve`` names its processor's run directory in
    ``OMNI_SERVE_RUN_DIR``."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    return create_app(get_settings(), processor_dir=Path(run_dir) if run_dir else None)
