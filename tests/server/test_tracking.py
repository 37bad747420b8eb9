"""The tracking API with real clients nobody here wrote: the Segment and RudderStack Python SDKs and curl,
against a live server; auth, limits, CORS, hostile batches, overload and the access log."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import threading
import uuid

import httpx
import orjson
import pytest
from sqlalchemy import text
from tracking_helpers import customer_of, event_count, events, queued, rejections, wait_for

from omni.core.settings import Settings
from omni.server.tracking import TrackingLimits, tracking_state
from profiles.apikeys import revoke_key
from profiles.db import session_scope
from profiles.intake import drain


def _mid() -> str:
    return f"m-{uuid.uuid4().hex}"


def _post(server, path: str, body, key: str | None = None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = (key, "") if key else None
    return httpx.post(f"{server.url}{path}", content=content, auth=auth, timeout=30, **kwargs)


def test_segment_python_sdk_delivers_into_the_right_profiles(engine, live_server, api_key):
    from segment.analytics.client import Client

    server = live_server(engine)
    key = api_key(engine, source="web")
    client = Client(key, host=server.url, sync_mode=True, max_retries=0)
    client.track(anonymous_id="anon-1", event="Product Viewed", properties={"product_id": "tee"})
    client.identify(user_id="u-1", traits={"email": "Ana@Example.org", "first_name": "Ana"})
    client.alias(previous_id="anon-1", user_id="u-1")
    client.track(
        user_id="u-1", event="Product Added", properties={"product_id": "tee", "price": 20, "quantity": 1}
    )
    client.flush()

    wait_for(lambda: event_count(engine) == 4, what="4 events")
    ana = customer_of(engine, "email", "ana@example.org")
    assert ana is not None
    assert customer_of(engine, "anonymous_id", "anon-1") == ana == customer_of(engine, "user_id", "u-1")
    stored = events(engine)
    assert {e["context"]["omni"]["source"] for e in stored} == {"web"}
    assert all(e["context"]["library"]["name"] == "analytics-python" for e in stored)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM carts")).scalar() == 1


def test_rudderstack_python_sdk_delivers_gzipped_batches(engine, live_server, api_key):
    from rudderstack.analytics.client import Client

    server = live_server(engine)
    key = api_key(engine, source="app")
    client = Client(key, host=server.url, sync_mode=True, max_retries=0)  # gzip is its default
    client.identify(user_id="r-1", traits={"email": "rui@example.org"})
    client.screen(user_id="r-1", name="Home", properties={"tab": "new"})
    client.track(user_id="r-1", event="Order Completed", properties={"order_id": "o-9", "total": 30})
    client.flush()

    wait_for(lambda: event_count(engine) == 3, what="3 events")
    rui = customer_of(engine, "email", "rui@example.org")
    assert {e["customer_id"] for e in events(engine)} == {rui}
    assert {e["context"]["omni"]["source"] for e in events(engine)} == {"app"}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar() == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_basic_auth_and_a_gzipped_file(engine, live_server, api_key, tmp_path):
    server = live_server(engine)
    key = api_key(engine, source="pos-lisbon")
    single = subprocess.run(
        [
            "curl",
            "-sS",
            "-u",
            f"{key}:",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"userId":"c-1","event":"Store Visit","context":{"channel":"store"},"messageId":"curl-1"}',
            f"{server.url}/v1/track",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert orjson.loads(single.stdout) == {"success": True}
    batch = {
        "batch": [
            {
                "type": "identify",
                "userId": "c-1",
                "traits": {"email": "carla@example.org"},
                "messageId": "curl-2",
            },
            {
                "type": "track",
                "userId": "c-1",
                "event": "Order Completed",
                "messageId": "curl-3",
                "properties": {"order_id": "pos-7", "total": 12.5},
            },
        ],
        "context": {"channel": "store"},
    }
    path = tmp_path / "batch.json.gz"
    path.write_bytes(gzip.compress(orjson.dumps(batch)))
    gz = subprocess.run(
        [
            "curl",
            "-sS",
            "-u",
            f"{key}:",
            "-H",
            "Content-Encoding: gzip",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{path}",
            "-w",
            "\n%{http_code}",
            f"{server.url}/v1/batch",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert gz.stdout.splitlines() == ['{"success":true}', "200"]
    wait_for(lambda: event_count(engine) == 3, what="3 events")
    carla = customer_of(engine, "email", "carla@example.org")
    assert {e["customer_id"] for e in events(engine)} == {carla}
    assert {e["context"]["omni"]["source"] for e in events(engine)} == {"pos-lisbon"}


def test_analytics_js_short_paths_with_text_plain_bodies_and_write_key_in_the_body(
    engine, live_server, api_key
):
    """What @segment/analytics-next sends with apiHost pointing here: /t /i /p ... and /b, text/plain JSON,
    writeKey in the body (and in each event), no Authorization header."""
    server = live_server(engine)
    key = api_key(engine, source="web")
    headers = {"Content-Type": "text/plain"}
    for path, payload in (
        ("/p", {"type": "page", "anonymousId": "js-1", "name": "Home", "properties": {"path": "/"}}),
        (
            "/i",
            {
                "type": "identify",
                "anonymousId": "js-1",
                "userId": "js-user",
                "traits": {"email": "jo@example.org"},
            },
        ),
        ("/t", {"type": "track", "anonymousId": "js-1", "event": "Clicked", "properties": {}}),
    ):
        answer = _post(server, path, {**payload, "writeKey": key, "messageId": _mid()}, headers=headers)
        assert answer.status_code == 200, answer.text
    batch = {
        "writeKey": key,
        "sentAt": "2026-06-01T10:00:00Z",
        "batch": [
            {
                "type": "track",
                "anonymousId": "js-1",
                "event": "Scrolled",
                "messageId": _mid(),
                "writeKey": key,
            },
        ],
    }
    assert _post(server, "/b", batch, headers=headers).status_code == 200
    wait_for(lambda: event_count(engine) == 4, what="4 events")
    jo = customer_of(engine, "email", "jo@example.org")
    assert {e["customer_id"] for e in events(engine)} == {jo}
    with engine.connect() as conn:  # the key itself is stored nowhere but as its hash
        assert key not in orjson.dumps(events(engine)).decode()
        assert conn.execute(text("SELECT count(*) FROM intake")).scalar() == 0


def test_keys_missing_unknown_revoked_or_read_scoped_get_401(engine, live_server, api_key):
    server = live_server(engine)
    key = api_key(engine, source="web")
    read = api_key(engine, scope="read", source="desk")
    payload = {"userId": "u", "event": "E"}
    assert _post(server, "/v1/track", payload).status_code == 401
    assert _post(server, "/v1/track", payload, key="omni_w_nope").status_code == 401
    assert _post(server, "/v1/track", payload, key=read).status_code == 401
    assert _post(server, "/v1/track", {**payload, "writeKey": "omni_w_nope"}).status_code == 401
    assert _post(server, "/v1/track", payload, key=key).status_code == 200
    with session_scope(engine) as session:
        revoke_key(session, key)
    refused = _post(server, "/v1/track", payload, key=key)
    assert refused.status_code == 401
    assert refused.json() == {
        "success": False,
        "code": "unauthorized",
        "message": "unknown or revoked write key",
    }


def test_the_keys_source_wins_over_what_a_client_claims(engine, live_server, api_key):
    server = live_server(engine)
    key = api_key(engine, source="web")
    payload = {"userId": "u", "event": "E", "context": {"omni": {"source": "pos-lisbon", "x": 1}}}
    assert _post(server, "/v1/track", payload, key=key).status_code == 200
    (stored,) = wait_for(lambda: events(engine), what="the event")
    assert stored["context"]["omni"] == {"source": "web", "x": 1}


def test_limits_malformed_bodies_and_compression_bombs(engine, live_server, api_key):
    server = live_server(engine)
    key = api_key(engine)
    big = {"userId": "u", "event": "E", "properties": {"blob": "x" * (33 * 1024)}}
    too_big = _post(server, "/v1/track", big, key=key)
    assert too_big.status_code == 413
    assert too_big.json()["code"] == "payload_too_large"
    huge_batch = {
        "batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"b": "x" * 20_000}}] * 30
    }
    assert _post(server, "/v1/batch", huge_batch, key=key).status_code == 413
    bomb = gzip.compress(b'{"batch":[' + b" " * (200 << 20) + b"]}")  # 200 MB of spaces, 200 KB zipped
    answer = _post(server, "/v1/batch", bomb, key=key, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 413
    assert "decoded body" in answer.json()["message"]
    assert _post(server, "/v1/track", b"{not json", key=key).status_code == 400
    assert _post(server, "/v1/track", b"[1, 2]", key=key).json()["code"] == "invalid_payload"
    assert _post(server, "/v1/batch", {"batch": "nope"}, key=key).json()["code"] == "invalid_batch"
    assert (
        _post(server, "/v1/track", b"garbage", key=key, headers={"Content-Encoding": "gzip"}).status_code
        == 400
    )
    assert _post(server, "/v1/track", b"{}", key=key, headers={"Content-Encoding": "br"}).status_code == 415
    assert queued(engine) == 0 and event_count(engine) == 0


def test_a_batch_stores_good_items_and_rejects_hostile_ones_with_reason_and_source(
    engine, live_server, api_key
):
    server = live_server(engine)
    key = api_key(engine, source="web")
    batch = {
        "batch": [
            {
                "type": "identify",
                "userId": "h-1",
                "traits": {"email": "hana@example.org"},
                "messageId": "ok-1",
            },
            "not an object",
            {"type": "batch", "batch": []},
            {"type": "track", "userId": "h-1", "messageId": "no-event-name"},
            {"type": "track", "event": "No Ids"},
            {"type": "track", "userId": "h-1", "event": "Big", "properties": {"b": "y" * (33 * 1024)}},
            {"type": "track", "userId": "h-1", "event": "Nul \u0000 and \ud800", "messageId": "ok-2"},
            {"type": "track", "userId": "h-1", "event": "Bad channel", "context": {"channel": "telepathy"}},
            {"type": "track", "userId": "h-1", "event": "Fine", "messageId": "ok-3"},
        ]
    }
    # As JSON text with escapes (\u0000, a lone \ud800), which orjson would not write.
    answer = _post(server, "/v1/batch", json.dumps(batch).encode(), key=key)
    assert answer.status_code == 200 and answer.json() == {"success": True}
    wait_for(lambda: queued(engine) == 0 and event_count(engine) >= 2, what="the batch to be ingested")
    assert {e["message_id"] for e in events(engine)} >= {"ok-1", "ok-3"}
    rejected = rejections(engine)
    assert len(rejected) + event_count(engine) == len(batch["batch"])
    assert all(r["source"].startswith("web request ") and "[batch item " in r["source"] for r in rejected)
    reasons = " | ".join(r["reason"] for r in rejected)
    for expected in (
        "expected a JSON object",
        "nested",
        "without an event name",
        "neither userId nor anonymousId",
        "32 KB",
        "context.channel",
    ):
        assert expected in reasons


def test_retries_are_dropped_by_message_id(engine, live_server, api_key):
    server = live_server(engine)
    key = api_key(engine)
    payload = {"userId": "d-1", "event": "Clicked", "messageId": "retry-me"}
    for _ in range(3):
        assert _post(server, "/v1/track", payload, key=key).status_code == 200
    batch = {"batch": [{**payload, "type": "track"}, {**payload, "type": "track"}]}
    assert _post(server, "/v1/batch", batch, key=key).status_code == 200
    wait_for(lambda: queued(engine) == 0, what="the queue to empty")
    assert [e["message_id"] for e in events(engine)] == ["retry-me"]


def test_cors_for_configured_origins_only(engine, live_server, api_key):
    settings = Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        cors_origins=["https://shop.example.com"],
    )
    server = live_server(engine, settings)
    key = api_key(engine)
    allowed = httpx.options(
        f"{server.url}/t",
        headers={
            "Origin": "https://shop.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://shop.example.com"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    refused = httpx.options(
        f"{server.url}/t", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    body = {"type": "track", "anonymousId": "c", "event": "E", "writeKey": key}
    sent = _post(
        server, "/t", body, headers={"Origin": "https://shop.example.com", "Content-Type": "text/plain"}
    )
    assert sent.status_code == 200
    assert sent.headers["access-control-allow-origin"] == "https://shop.example.com"
    # A "simple" text/plain POST is not preflighted by browsers: refused here, not only unreadable there.
    forged = _post(
        server, "/t", body, headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}
    )
    assert forged.status_code == 403
    wait_for(lambda: queued(engine) == 0 and event_count(engine) == 1, what="one event")


def test_a_full_queue_sheds_with_429_and_retry_after(engine, live_server, api_key):
    server = live_server(engine, background=False)  # nothing ingests: the queue only grows
    state = tracking_state(server.app)
    state.limits = TrackingLimits(max_backlog=2)
    key = api_key(engine)
    for n in range(2):
        assert _post(server, "/v1/track", {"userId": "q", "event": f"E{n}"}, key=key).status_code == 200
    shed = _post(server, "/v1/track", {"userId": "q", "event": "E2"}, key=key)
    assert shed.status_code == 429
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["code"] == "overloaded"
    assert queued(engine) == 2
    drain(engine)
    assert event_count(engine) == 2
    wait_for(
        lambda: _post(server, "/v1/track", {"userId": "q", "event": "E2"}, key=key).status_code == 200,
        what="the queue to take requests again",
    )


def test_too_many_requests_in_flight_shed_with_429(engine, live_server, api_key):
    """While the store holds the writer up, a second request beyond max_inflight is shed at once."""
    server = live_server(engine, background=False)
    tracking_state(server.app).limits = TrackingLimits(max_inflight=1)
    key = api_key(engine)
    blocker = engine.connect()
    if engine.dialect.name == "postgresql":
        blocker.exec_driver_sql("BEGIN")
        blocker.exec_driver_sql("LOCK TABLE intake IN EXCLUSIVE MODE")
    else:
        blocker.exec_driver_sql("SELECT 1")  # the engine begins IMMEDIATE: the write lock is held
    first: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: first.append(_post(server, "/v1/track", {"userId": "f", "event": "E"}, key=key))
    )
    sender.start()
    try:
        wait_for(lambda: tracking_state(server.app).inflight == 1, what="the first request to be in flight")
        shed = _post(server, "/v1/track", {"userId": "f", "event": "E2"}, key=key)
        assert shed.status_code == 429
        assert shed.headers["retry-after"] == "1"
    finally:
        blocker.rollback()
        blocker.close()
    sender.join(30)
    assert first[0].status_code == 200
    assert queued(engine) == 1


def test_access_log_names_route_status_and_source_but_no_key_token_or_pii(
    engine, live_server, api_key, caplog
):
    server = live_server(engine)
    key = api_key(engine, source="web")
    with caplog.at_level(logging.INFO, logger="omni.server.access"):
        _post(
            server,
            "/v1/identify?token=s3cr3t",
            {"userId": "u", "traits": {"email": "pii@example.org"}},
            key=key,
        )
        _post(server, "/v1/track", {"userId": "u", "event": "E", "writeKey": key})
        httpx.get(f"{server.url}/nothing/pii@example.org")
        # A request is logged once its response is sent: the client may read it first.
        wait_for(lambda: len([r for r in caplog.records if r.name == "omni.server.access"]) >= 3, what="logs")
    lines = [r.getMessage() for r in caplog.records if r.name == "omni.server.access"]
    assert any(line.startswith("POST /v1/identify 200 ") and line.endswith("source=web") for line in lines)
    assert any(line.startswith("POST /v1/track 200 ") for line in lines)
    assert any(line.startswith("GET (no route) 404 ") for line in lines)
    logged = "\n".join(lines)
    for secret in (key, "s3cr3t", "pii@example.org", "token"):
        assert secret not in logged


def test_a_queue_falling_behind_sheds_until_it_catches_up(engine, live_server, api_key):
    server = live_server(engine, background=False)  # no processor: the oldest request only ages
    tracking_state(server.app).limits = TrackingLimits(max_lag=0.3)
    key = api_key(engine)
    assert _post(server, "/v1/track", {"userId": "l", "event": "E"}, key=key).status_code == 200

    def shed() -> httpx.Response | None:
        answer = _post(server, "/v1/track", {"userId": "l", "event": "Later"}, key=key)
        return answer if answer.status_code == 429 else None

    assert "behind" in wait_for(shed, what="a 429").json()["message"]
    drain(engine)
    wait_for(
        lambda: _post(server, "/v1/track", {"userId": "l", "event": "E3"}, key=key).status_code == 200,
        what="the queue to take requests again",
    )


def test_sheds_once_the_queue_holds_more_than_the_processor_ingests_in_max_lag(engine, live_server, api_key):
    """Admission by the processor's measured capacity: a queue the processor needs longer than
    max_lag for is not allowed to grow (before the oldest request is even late)."""
    server = live_server(engine, background=False)
    state = tracking_state(server.app)
    state.limits = TrackingLimits(max_lag=60)  # the oldest request will never be late in this test
    state.writer.capacity = 100.0  # bytes a second: 6,000 bytes in 60 s
    key = api_key(engine)
    body = {"userId": "c", "event": "E", "properties": {"pad": "x" * 1000}}
    answers = [_post(server, "/v1/track", body, key=key).status_code for _ in range(8)]
    assert answers[:6] == [200] * 6  # 6 x ~1 KB accepted, then the queue holds 6,000+ bytes
    assert answers[6:] == [429, 429]
    assert state.writer.backlog_bytes > 6000
    drain(engine)
    wait_for(
        lambda: _post(server, "/v1/track", body, key=key).status_code == 200,
        what="the queue to take requests again",
    )
