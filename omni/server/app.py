"""The ASGI app of ``omni serve``.

``create_app(settings, engine=None)`` builds one FastAPI app over the profile store: ``/healthz`` here, and
the ``router`` of each module in :data:`ROUTER_MODULES` that exists (the tracking API, the profile API, the
customer page, unsubscribe and the preference centre, provider webhooks, the report page). Each router
reads the store through the dependencies in :mod:`omni.server.deps`.
"""

from __future__ import annotations

import importlib
import importlib.util

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from omni.core.settings import Settings
from profiles.db import create_store_engine, require_schema

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
    app = FastAPI(title="Omni", docs_url="/docs", redoc_url=None)
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
