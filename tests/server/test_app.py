"""The app skeleton: health, and API keys checked as Segment sends them (Basic-auth user name)."""

from __future__ import annotations

import httpx

from profiles.apikeys import revoke_key
from profiles.db import session_scope


def test_healthz_answers_with_the_store(engine, live_server):
    server = live_server(engine, background=False)
    answer = httpx.get(f"{server.url}/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"ok": True, "store": engine.dialect.name}


def test_a_customer_page_in_a_real_browser_needs_the_server(engine, live_server, browser):
    server = live_server(engine, background=False)
    browser.get(f"{server.url}/healthz")
    assert '"ok":true' in browser.page_source.replace(" ", "")


def test_keys_are_checked_by_scope_and_revocation(engine):
    from profiles.apikeys import authenticate, create_key, list_keys

    with session_scope(engine) as session:
        key, plaintext = create_key(session, source="pos-lisbon", scope="write")
    with session_scope(engine) as session:
        assert authenticate(session, plaintext, "write").source == "pos-lisbon"
        assert authenticate(session, plaintext, "read") is None
        assert authenticate(session, plaintext + "x", "write") is None
        assert authenticate(session, "", "write") is None
        assert [k.prefix for k in list_keys(session)] == [plaintext[:12]]
    with session_scope(engine) as session:
        assert revoke_key(session, key.prefix).revoked_at is not None
    with session_scope(engine) as session:
        assert authenticate(session, plaintext, "write") is None
