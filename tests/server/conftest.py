"""Fixtures for ``omni serve``: a live server on a free port, API keys, and a real headless browser.

- ``live_server(engine, settings=None, background=True)``: builds ``create_app`` over ``engine`` and runs it
  with uvicorn in a thread; returns a :class:`LiveServer` (``.url``, ``.app``); stopped after the test.
- ``api_key(engine, scope="write", source="web")``: a new key's plain text.
- ``browser``: Selenium driving the system's headless Chromium (``chromium`` / ``chromium-driver`` from
  Debian; ``.ci/run`` installs them when missing). Skipped, with the reason, where neither can be had.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
from serving import LiveServer, start_server
from sqlalchemy import Engine

from omni.core.settings import Settings
from omni.server.app import create_app
from profiles.apikeys import create_key
from profiles.db import session_scope


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(engine: Engine, settings: Settings | None = None, *, background: bool = True) -> LiveServer:
        settings = settings or Settings(database_url=engine.url.render_as_string(hide_password=False))
        server = start_server(create_app(settings, engine=engine, background=background))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def api_key() -> Callable[..., str]:
    def make(engine: Engine, scope: str = "write", source: str = "web") -> str:
        with session_scope(engine) as session:
            _key, plaintext = create_key(session, source=source, scope=scope)
        return plaintext

    return make


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser():
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium and ChromeDriver on this machine (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
