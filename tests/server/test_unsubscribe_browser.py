"""In a real headless browser: the unsubscribe link of a real email (sent by a tick to the outbox, the link
following ``OMNI_PUBLIC_URL`` by default) opens the page, a preference is changed, and the store has the
consent change. SQLite and PostgreSQL."""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "sequences"))  # journey_kit

from feedback_kit import consent, events  # noqa: E402
from journey_kit import T0, customer, no_sleep, outbox, seed_stores  # noqa: E402
from tracking_helpers import wait_for  # noqa: E402

from omni.core.settings import Settings  # noqa: E402
from sequences.tick import run_tick  # noqa: E402


def test_the_link_of_a_real_email_changes_a_preference(engine, live_server, browser):
    from selenium.webdriver.common.by import By

    seed_stores(engine)
    customer(engine, 1)
    server = live_server(engine, background=False)
    settings = Settings(public_url=server.url)  # the link defaults to the server's own page
    run_tick(engine, now=T0, settings=settings, names=["abandoned_cart"], sleep=no_sleep)
    [email] = outbox(engine, "email")
    hrefs = re.findall(r'<a href="([^"]+)"[^>]*>Unsubscribe</a>', email.payload["html"])
    [link] = [html.unescape(h) for h in hrefs]
    assert link == email.payload["unsubscribe_url"] and link.startswith(f"{server.url}/unsubscribe?token=")
    customer_id = email.customer_id

    browser.get(link)
    assert browser.find_element(By.ID, "address").text == "cust1@example.org"
    assert consent(engine, customer_id, "email")["status"] == "default"  # opening the page changes nothing
    browser.find_element(By.ID, "change-sms").click()
    notice = wait_for(lambda: browser.find_elements(By.ID, "notice"), what="the saved notice")
    assert notice[0].text == "Saved: you are unsubscribed from SMS."
    state = consent(engine, customer_id, "sms")
    assert (state["status"], state["source"]) == ("opted_out", "preference_centre")
    row = browser.find_element(By.ID, "pref-sms")
    assert "unsubscribed" in row.text and browser.find_element(By.ID, "change-sms").text == "Subscribe"

    browser.find_element(By.CSS_SELECTOR, "#confirm button").click()
    wait_for(lambda: browser.find_elements(By.ID, "unsubscribed"), what="the unsubscribed message")
    assert consent(engine, customer_id, "email")["status"] == "opted_out"
    browser.find_element(By.ID, "change-email").click()  # and back in
    wait_for(lambda: consent(engine, customer_id, "email")["status"] == "opted_in", what="the opt-in")
    assert [(e.name, e.properties["channel"]) for e in events(engine, "Unsubscribed", "Subscribed")] == [
        ("Unsubscribed", "sms"),
        ("Unsubscribed", "email"),
        ("Subscribed", "email"),
    ]
