"""The demo's emails, unsubscribed from in a browser against ``omni serve``: ``omni demo`` fills a store
(the engine path, as a user runs it, with the default settings but for the port), ``omni serve`` runs on
that port as its own process, and the unsubscribe link of an email the demo sent opens in headless
Chromium, confirms, and the store holds the opt-out; a mail client's RFC 8058 one-click POST to another
email's link does the same. SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from feedback_kit import consent
from serving import free_port
from sqlalchemy import select
from tracking_helpers import wait_for

from profiles.db import session_scope
from profiles.models import OutboxMessage

OMNI = str(Path(sys.executable).with_name("omni"))


def _env(url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNI_", "PREFECT_"))}
    env.update(OMNI_DATABASE_URL=url, OMNI_SERVER_PORT=str(port))
    return env


@pytest.fixture
def demo_store(engine, tmp_path):
    """A store ``omni demo`` filled, and ``omni serve`` on the port the demo's links name."""
    url = engine.url.render_as_string(hide_password=False)
    port = free_port()
    env = _env(url, port)
    ran = subprocess.run(
        [OMNI, "demo", "--no-prefect", "--customers", "30", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert sum(tick["channels"]["email"] for tick in json.loads(ran.stdout)["ticks"]) > 0
    server = subprocess.Popen(
        [OMNI, "serve"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://localhost:{port}"

    def up() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"omni serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(up, timeout=30, what="omni serve to answer")
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def demo_emails(engine) -> list:
    table = OutboxMessage.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).where(table.c.channel == "email").order_by(table.c.id)).all()


def test_the_demo_unsubscribe_link_works_in_a_browser_against_omni_serve(engine, demo_store, browser):
    from selenium.webdriver.common.by import By

    base = demo_store
    emails = demo_emails(engine)
    by_customer = {}
    for email in emails:
        by_customer.setdefault(email.customer_id, email)
    first, second = list(by_customer.values())[:2]

    hrefs = re.findall(r'<a href="([^"]+)"[^>]*>Unsubscribe</a>', first.payload["html"])
    [link] = [html.unescape(h) for h in hrefs]
    assert link == first.payload["unsubscribe_url"] and link.startswith(f"{base}/unsubscribe?token=")
    assert consent(engine, first.customer_id, "email")["allowed"]

    browser.get(link)
    assert browser.find_element(By.ID, "address").text == first.recipient
    assert consent(engine, first.customer_id, "email")["allowed"]  # opening the page changes nothing
    browser.find_element(By.CSS_SELECTOR, "#confirm button").click()
    wait_for(
        lambda: browser.find_elements(By.ID, "unsubscribed"), timeout=30, what="the unsubscribed message"
    )
    state = consent(engine, first.customer_id, "email")
    assert (state["status"], state["source"], state["allowed"]) == ("opted_out", "preference_centre", False)
    assert "unsubscribed" in browser.find_element(By.ID, "pref-email").text

    # A mail client's one-click unsubscribe (RFC 8058) on another demo email: no browser, no redirect.
    one_click = second.payload["unsubscribe_url"]
    answer = httpx.post(one_click, data={"List-Unsubscribe": "One-Click"}, timeout=30)
    assert answer.status_code == 200 and not answer.cookies
    state = consent(engine, second.customer_id, "email")
    assert (state["status"], state["source"], state["allowed"]) == ("opted_out", "one_click", False)
