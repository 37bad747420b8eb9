"""The customer page in a real headless Chromium (Selenium), and over plain HTTP, on SQLite and PostgreSQL:
a shopper's history across web, app, chat, call centre and a store's till, on one screen."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from history import EMAIL, HOSTILE, TICK, ingest_history, run_journeys
from sqlalchemy import select

from omni.server.customer_page import channel_label
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import PROFILE_VIEWED
from profiles.models import Event

HOSTILE_EVENT = '<img src=x onerror="window.__pwned = 2">'


@pytest.fixture
def shop(engine, live_server, api_key):
    """A live server over Ana's history, plus a chat message carrying markup, and a read key."""
    ingest_history(engine)
    run_journeys(engine)
    hostile = {
        "type": "track",
        "userId": "u-ana",
        "event": "Chat Message",
        "properties": {"text": HOSTILE_EVENT},
        "context": {"channel": "chat"},
        "messageId": "hostile-1",
        "timestamp": "2026-06-01T10:05:00Z",
    }
    assert ingest_payloads(engine, [hostile], now=TICK).accepted == 1
    server = live_server(engine, background=False)
    server.app.state.clock = lambda: TICK + timedelta(hours=1)
    return server, api_key(engine, scope="read", source="desk-lisbon")


def authorize(browser, key: str) -> None:
    """Send the read key as HTTP Basic on every request of the browser (what its login prompt would do)."""
    token = base64.b64encode(f"{key}:".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def rows(browser, section: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [row.text for row in browser.find_elements(By.CSS_SELECTOR, f"#{section} tr")]


def test_an_agent_sees_the_customer_across_channels(engine, shop, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    server, key = shop
    authorize(browser, key)
    browser.get(f"{server.url}/customers/{EMAIL}")
    text = browser.find_element(By.TAG_NAME, "body").text

    # Who: name, contact, the channels she used.
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Ana Silva")
    assert EMAIL in text and "+351912345678" in text
    used = browser.find_element(By.ID, "channels-used").text
    for channel in ("web", "app", "chat", "call_center", "store"):
        assert channel_label(channel) in used

    # Consents, with whether Omni can reach her and why not.
    consents = {
        row.get_attribute("data-channel"): row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "#consents tr[data-channel]")
    }
    assert consents["sms"].endswith("yes") and "opted in" in consents["sms"]
    assert "no push consent (never opted in)" in consents["push"]
    assert consents["email"].endswith("yes")

    # The open cart with its items; the store order with channel and store.
    cart = browser.find_element(By.ID, "cart").text
    assert "Rain Jacket" in cart and "89.50 EUR" in cart and "Trail Boots" not in cart
    [order] = [r for r in rows(browser, "orders") if "pos-1" in r]
    assert channel_label("store") in order and "Omni Chiado" in order and "144.00 EUR" in order
    assert "in store, placed" in order

    # The journey she is in, and the last message Omni sent.
    [journey] = rows(browser, "journeys")[1:]
    assert journey.startswith("abandoned_cart") and ("active" in journey or "holdout" in journey)
    messages = browser.find_element(By.ID, "messages").text
    if "active" in journey:
        assert "Ana, you left 1 item in your cart" in messages and "abandoned_cart" in messages
    else:
        assert "Omni has sent nothing" in messages

    # The timeline, newest first, across channels, labelled.
    timeline = rows(browser, "timeline")[1:]
    assert timeline[0].startswith("2026-06-01 20:00 ") or timeline[0].startswith("2026-06-01 18:00 ")
    shown = "\n".join(timeline)
    for channel, event in [
        ("app", "Product Added"),
        ("store", "Order Completed"),
        ("call_center", "Call Completed"),
        ("chat", "Chat Started"),
        ("web", "Product Viewed"),
    ]:
        assert f"{channel_label(channel)} {event}" in shown, (channel, event)
    assert "order pos-1 total 144.00 EUR at store s-chiado" in shown

    # Hostile customer data is shown as text, never run.
    assert HOSTILE_EVENT in shown
    traits = browser.find_element(By.ID, "traits").get_attribute("textContent")
    assert HOSTILE in traits
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.execute_script("return window.__pwned === undefined")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - reading it is the check

    # One click narrows the timeline to a channel.
    browser.find_element(By.LINK_TEXT, channel_label("chat")).click()
    chat = rows(browser, "timeline")[1:]
    assert chat and all(channel_label("chat") in row for row in chat)
    assert any("Chat Started" in row for row in chat)

    # The look is on her timeline, by the key's source, via the page (the filter click is a look too).
    with session_scope(engine) as session:
        looks = session.execute(select(Event.properties).where(Event.name == PROFILE_VIEWED)).scalars().all()
    assert looks and all(look == {"source": "desk-lisbon", "via": "page"} for look in looks)


def test_an_unknown_customer_gets_a_404_page(engine, shop, browser):
    from selenium.webdriver.common.by import By

    server, key = shop
    authorize(browser, key)
    browser.get(f"{server.url}/customers/nobody@example.org")
    assert browser.find_element(By.TAG_NAME, "h1").text == "No such customer"
    assert "no customer has email 'nobody@example.org'" in browser.find_element(By.ID, "reason").text
    answer = httpx.get(f"{server.url}/customers/nobody@example.org", auth=(key, ""))
    assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
    bad = httpx.get(f"{server.url}/customers/twitter:<b>ana", auth=(key, ""))
    assert bad.status_code == 400
    assert "unknown identity kind" in bad.text and "<b>ana" not in bad.text and "&lt;b&gt;" in bad.text


def test_the_page_asks_the_browser_for_a_read_key(engine, shop, api_key):
    server, _key = shop
    url = f"{server.url}/customers/{EMAIL}"
    answer = httpx.get(url)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == 'Basic realm="omni"'
    write = api_key(engine, scope="write", source="web")
    assert httpx.get(url, auth=(write, "")).status_code == 401


def test_older_events_are_a_link_away(engine, shop):
    server, key = shop
    start = datetime(2026, 5, 1, tzinfo=UTC)
    browsing = [
        {
            "type": "page",
            "userId": "u-ana",
            "name": f"Page {n}",
            "context": {"channel": "web"},
            "messageId": f"old-{n}",
            "timestamp": (start + timedelta(minutes=n)).isoformat(),
        }
        for n in range(60)
    ]
    assert ingest_payloads(engine, browsing, now=TICK).accepted == 60
    client = httpx.Client(base_url=server.url, auth=(key, ""))
    first = client.get(f"/customers/{EMAIL}", params={"channel": "web"})
    assert first.status_code == 200
    assert first.text.count('<td class="when">') == 50
    older = first.text.split('<a id="older" href="')[1].split('"')[0].replace("&amp;", "&")
    assert "channel=web" in older
    second = client.get(older)
    assert second.status_code == 200
    # 60 pages in May, and the day's page, Product Viewed and identify: 63 web events, 13 on page two.
    assert second.text.count('<td class="when">') == 13
    assert 'id="older"' not in second.text
    assert "Page 0" in second.text and "Page 0" not in first.text
    with session_scope(engine) as session:
        looks = session.execute(select(Event.id).where(Event.name == PROFILE_VIEWED)).scalars().all()
    assert len(looks) == 1  # the older page continues the same look
