"""One-click unsubscribe (RFC 8058) and the preference centre against a live ``omni serve``, with httpx:
the one-click POST opts out at once and idempotently, GET changes nothing, bad tokens change nothing and
get a plain 400 page, every change is a consent decision with its source and an event. SQLite and
PostgreSQL."""

from __future__ import annotations

import httpx
import pytest
from feedback_kit import NOW, SendGridKey, consent, events, seed, start
from pydantic import SecretStr

from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.identity import merge_many
from profiles.ingest import ingest_payloads
from sequences.unsubscribe import make_token, unsubscribe_secret, unsubscribe_url


@pytest.fixture
def page(engine, live_server):
    ana = seed(engine)
    server = start(live_server, engine, SendGridKey())
    with session_scope(engine) as session:
        secret = unsubscribe_secret(session, Settings())
    return server, ana, secret


def link(server, secret, customer_id: int, channel: str = "email") -> str:
    return unsubscribe_url(f"{server.url}/unsubscribe", make_token(secret, customer_id, channel))


def one_click(url: str, **kwargs) -> httpx.Response:
    return httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=30, **kwargs)


def test_one_click_opts_out_at_once_and_repeating_is_harmless(engine, page):
    server, ana, secret = page
    url = link(server, secret, ana)
    for _ in range(2):
        answer = one_click(url)
        assert answer.status_code == 200 and "set-cookie" not in answer.headers
        assert answer.text == "Unsubscribed from Email.\n"
    state = consent(engine, ana, "email")
    assert (state["status"], state["source"], state["allowed"]) == ("opted_out", "one_click", False)
    [event] = events(engine, "Unsubscribed")
    assert (event.customer_id, event.channel, event.properties) == (
        ana,
        "email",
        {"channel": "email", "source": "one_click"},
    )
    assert consent(engine, ana, "sms")["status"] == "opted_in"  # only the link's channel


def test_one_click_as_multipart_as_rfc_8058_allows(engine, page):
    server, ana, secret = page
    answer = httpx.post(
        link(server, secret, ana, "sms"), files={"List-Unsubscribe": (None, "One-Click")}, timeout=30
    )
    assert answer.status_code == 200
    assert consent(engine, ana, "sms")["status"] == "opted_out"


def test_get_changes_nothing_and_shows_the_address_and_the_preference_centre(engine, page):
    server, ana, secret = page
    answer = httpx.get(link(server, secret, ana), timeout=30)
    assert answer.status_code == 200
    html = answer.text
    assert "ana@example.org" in html and "Unsubscribe from Email" in html
    for channel in ("email", "sms", "push", "ads"):
        assert f'id="pref-{channel}"' in html
    assert (
        answer.headers["cache-control"] == "no-store" and answer.headers["referrer-policy"] == "no-referrer"
    )
    assert consent(engine, ana, "email")["status"] == "default"
    assert events(engine, "Unsubscribed", "Subscribed") == []


def test_the_preference_centre_changes_any_channel_and_opts_back_in(engine, page):
    server, ana, secret = page
    url = link(server, secret, ana)
    answer = httpx.post(url, data={"channel": "sms", "status": "opted_out"}, timeout=30)
    assert answer.status_code == 200 and "Saved: you are unsubscribed from SMS." in answer.text
    answer = httpx.post(url, data={"channel": "push", "status": "opted_in"}, timeout=30)
    one_click(url)
    answer = httpx.post(url, data={"channel": "email", "status": "opted_in"}, timeout=30)
    assert "Saved: you are subscribed to Email." in answer.text
    assert [consent(engine, ana, c)["status"] for c in ("email", "sms", "push")] == [
        "opted_in",
        "opted_out",
        "opted_in",
    ]
    assert consent(engine, ana, "email")["source"] == "preference_centre"
    assert [
        (e.name, e.channel, e.properties["channel"], e.properties["source"])
        for e in events(engine, "Unsubscribed", "Subscribed")
    ] == [
        ("Unsubscribed", "web", "sms", "preference_centre"),
        ("Subscribed", "web", "push", "preference_centre"),
        ("Unsubscribed", "email", "email", "one_click"),
        ("Subscribed", "web", "email", "preference_centre"),
    ]


def test_bad_tokens_change_nothing_and_get_a_plain_400_page(engine, page):
    server, ana, secret = page
    good = make_token(secret, ana, "email")
    payload, signature = good.split(".")
    foreign = make_token(SecretStr("another store's secret"), ana, "email")
    other_channel = make_token(secret, ana, "webhook")
    nobody = make_token(secret, 987_654, "email")
    bad = {
        "missing": None,
        "empty": "",
        "truncated": good[:-5],
        "tampered": payload + "." + ("A" if signature[0] != "A" else "B") + signature[1:],
        "swapped customer": make_token(secret, ana + 1, "email").split(".")[0] + "." + signature,
        "foreign": foreign,
        "no consent channel": other_channel,
        "no such customer": nobody,
        "garbage": "<script>alert(1)</script>",
    }
    for label, token in bad.items():
        url = f"{server.url}/unsubscribe" + ("" if token is None else f"?token={token}")
        for answer in (
            httpx.get(url, params=None, timeout=30),
            one_click(url),
            httpx.post(url, data={"channel": "email", "status": "opted_out"}, timeout=30),
        ):
            assert answer.status_code == 400, label
            assert "This link is not valid" in answer.text and "<script>" not in answer.text
    assert consent(engine, ana, "email")["status"] == "default"
    assert events(engine, "Unsubscribed", "Subscribed") == []


def test_a_form_without_a_channel_or_with_a_bad_one_changes_nothing(engine, page):
    server, ana, secret = page
    url = link(server, secret, ana)
    for data in ({}, {"channel": "webhook", "status": "opted_out"}, {"channel": "email", "status": "maybe"}):
        assert httpx.post(url, data=data, timeout=30).status_code == 400
    assert (
        httpx.post(url, content=b"\x00\xff", headers={"Content-Type": "application/json"}).status_code == 400
    )
    assert consent(engine, ana, "email")["status"] == "default"


def test_a_merged_customers_link_reaches_the_survivor(engine, page):
    server, ana, secret = page
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": "old",
                "messageId": "id-old",
                "traits": {"email": "old@example.org"},
            }
        ],
        now=NOW,
    )
    from profiles.lookup import resolve_customer_key

    with session_scope(engine) as session:
        old = resolve_customer_key(session, "old")
        merge_many(session, [(ana, [old])], now=NOW)
    assert one_click(link(server, secret, old)).status_code == 200
    assert consent(engine, ana, "email")["status"] == "opted_out"


def test_the_default_link_is_the_servers_own_page():
    assert Settings().unsubscribe_base_url == "http://localhost:8000/unsubscribe"
    assert Settings(server_port=9000).unsubscribe_base_url == "http://localhost:9000/unsubscribe"
    assert Settings(server_host="10.0.0.5").unsubscribe_base_url == "http://10.0.0.5:8000/unsubscribe"
    behind = Settings(public_url="https://omni.shop.example/")
    assert behind.unsubscribe_base_url == "https://omni.shop.example/unsubscribe"
    chosen = Settings(public_url="https://omni.shop.example", unsubscribe_base_url="https://shop.example/u")
    assert chosen.unsubscribe_base_url == "https://shop.example/u"
