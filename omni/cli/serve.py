"""``omni serve``: the HTTP service (tracking API, profile API, customer pages, unsubscribe, webhooks)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from omni.cli.common import DatabaseUrlOption, err_console, handle_errors, open_store

# The app each worker builds from the environment's settings (uvicorn's factory mode).
APP_FACTORY = "omni.server.app:app_from_settings"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def log_config(access_log: bool) -> dict:
    """Logging of uvicorn and Omni to stderr. uvicorn's own access log is off: it shows query strings
    (unsubscribe tokens) and paths (profile keys); Omni's (``omni.server.access``) shows neither."""
    line = {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": line},
        "handlers": {"stderr": handler},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "omni": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
            "omni.server.access": {
                "handlers": ["stderr"],
                "level": "INFO" if access_log else "WARNING",
                "propagate": False,
            },
        },
    }


@handle_errors
def serve(
    host: Annotated[
        str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1; OMNI_SERVER_HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", min=1, max=65535, help="Port (default 8000; OMNI_SERVER_PORT).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="HTTP worker processes (default 1; OMNI_SERVER_WORKERS)."),
    ] = None,
    database_url: DatabaseUrlOption = None,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="One line per request on stderr.")
    ] = True,
) -> None:
    """Run the HTTP service until stopped (Ctrl-C or SIGTERM finish the requests in flight first).

    What the tracking API accepts is ingested within a second by the intake processor, a child process
    that omni serve supervises (started again if it dies; /healthz answers 503 while it is not running).
    Behind a reverse proxy that terminates TLS, keep --host 127.0.0.1 and set OMNI_PUBLIC_URL to the
    public address.
    """
    import uvicorn

    from omni.core.settings import get_settings
    from omni.server.processor import RUN_DIR_ENV, ProcessorSupervisor

    if database_url:
        # The workers and the processor read their settings from the environment.
        os.environ["OMNI_DATABASE_URL"] = database_url
        get_settings.cache_clear()
    settings = get_settings()
    open_store(settings.database_url).dispose()  # fail here, with the reason, if the store is not ready
    host = host or settings.server_host
    port = port or settings.server_port
    workers = workers or settings.server_workers
    err_console.print(
        f"omni serve: http://{host}:{port} ({workers} worker{'s' if workers > 1 else ''} and the intake "
        f"processor, store: {settings.database_url.split('://')[0]})",
        highlight=False,
    )
    previous = signal.signal(signal.SIGTERM, _terminated)
    with tempfile.TemporaryDirectory(prefix="omni-serve-") as run_dir:
        os.environ[RUN_DIR_ENV] = run_dir
        supervisor = ProcessorSupervisor(Path(run_dir))
        supervisor.start()
        try:
            uvicorn.run(
                APP_FACTORY,
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_config=log_config(access_log),
                access_log=False,
                proxy_headers=True,
                server_header=False,
                timeout_graceful_shutdown=10,
            )
        finally:
            # After the workers: what they committed last is queued, and is ingested by the next start.
            supervisor.stop()
            os.environ.pop(RUN_DIR_ENV, None)
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM outside uvicorn's own handling (before it starts; uvicorn raises it again once it has
    stopped): leave through ``finally``, stopping the processor."""
    raise SystemExit(0)
