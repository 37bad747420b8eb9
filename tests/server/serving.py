"""A live ``omni serve`` app in a thread, for the tests of this folder (``conftest.py``'s ``live_server``
fixture, and tests that build the app themselves): a module of its own, since two test folders have a
``conftest`` and ``from conftest import ...`` would depend on which was imported first."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(app: FastAPI, *, port: int | None = None) -> LiveServer:
    """Serve ``app`` on 127.0.0.1 in a thread; returns once ``/healthz`` answers."""
    port = port or free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"omni-serve-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code in (200, 503):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"omni serve did not start on {url}")
        time.sleep(0.02)  # polling for the server to listen, not waiting for behaviour
    return LiveServer(url=url, app=app, server=server, thread=thread)
