"""The ASGI app of ``omni serve``.

``create_app(settings, engine=None)`` builds one FastAPI app over the profile store: ``/healthz`` here, and
the ``router`` of each module in :data:`ROUTER_MODULES` that exists (the tracking API, the profile API, the
customer page, unsubscribe and the preference centre, provider webhooks, the report page). Each router
reads the store through the dependencies in :mod:`omni.server.deps`.

With ``background`` the app's lifespan runs the processor of the live intake (``profiles.intake``): it
ingests what the tracking API queued, within a second. Every process of ``omni serve --workers N`` runs
one; they share the queue.

Request logs (logger ``omni.server.access``, one line per request): method, the route's path template
(``/v1/profiles/{key}``, never the actual key, query string or body), status, duration and, for the
tracking API, the write key's source. So logs never hold keys, tokens or a customer's data.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from omni.core.settings import Settings, get_settings
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


def create_app(settings: Settings, *, engine: Engine | None = None, background: bool = True) -> FastAPI:
    """The app over the store ``engine`` (default: ``settings.database_url``). ``background``: run the
    background work (processing of live intake) in the app's lifespan; tests may switch it off."""
    engine = engine or create_store_engine(settings.database_url)
    require_schema(engine)
    app = FastAPI(title="Omni", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.add_middleware(AccessLog)
    app.state.engine = engine
    app.state.settings = settings
    app.state.background = background

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is "not healthy"
            return JSONResponse({"ok": False, "store": f"unreachable: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"ok": True, "store": engine.dialect.name})

    for name in ROUTER_MODULES:
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the intake processor (``background``) and the tracking API's writer; stop both, the writer
    first (it commits what is still waiting), at shutdown."""
    from omni.server.tracking import tracking_state

    processor = None
    if app.state.background:
        processor = IntakeProcessor(
            app.state.engine, IntakeOptions(ingest=IngestOptions.of(app.state.settings))
        )
        processor.start()
    app.state.intake_processor = processor
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
    --workers N`` builds (uvicorn's factory mode)."""
    return create_app(get_settings())
