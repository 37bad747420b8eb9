"""A sequence step on the webhook channel reaches another system end to end: "prepare pickup order P123 at
store nyc" goes to the store's system, signed, recorded as a delivery and on the timeline. A webhook is
not marketing (no consent, quiet hours or cap) and is delivered at least once. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from journey_kit import T0, customer, deliveries, seed_stores, timeline
from werkzeug import Response

from connectors.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature
from omni.core.settings import Settings
from profiles.ingest import ingest_payloads
from sequences.definitions import parse_sequence
from sequences.tick import run_tick

SECRET = "whsec-test-secret"
PREPARE = parse_sequence(
    {
        "name": "prepare_pickup",
        "trigger": {"event": "Order Completed"},
        "steps": [{"id": "tell_store", "send": {"channel": "webhook", "template": "webhook/prepare_pickup"}}],
    }
)


@pytest.fixture
def store_system(engine, httpserver, monkeypatch):
    from omni.core.settings import get_settings

    seed_stores(engine)
    # No email consent, no SMS opt-in, no device: nothing marketing could reach them; the store still must.
    user = customer(engine, 1, sms=False, push=False, email=False)
    ingest_payloads(
        engine,
        [
            {
                "type": "track",
                "userId": user,
                "event": "Order Completed",
                "messageId": "order-p123",
                "timestamp": (T0 - timedelta(minutes=30)).isoformat(),
                "properties": {
                    "order_id": "P123",
                    "total": 39.0,
                    "fulfillment": "pickup",
                    "store_id": "nyc",
                    "products": [{"product_id": "tee", "sku": "TEE-B", "name": "Black Tee", "quantity": 2}],
                },
            }
        ],
        now=T0,
    )
    monkeypatch.setenv("OMNI_WEBHOOK_CONNECTOR", "webhook")
    monkeypatch.setenv("OMNI_WEBHOOK_URL", httpserver.url_for("/store-system"))
    monkeypatch.setenv("OMNI_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    yield engine
    get_settings.cache_clear()


def _tick(engine, at):
    return run_tick(
        engine,
        now=at,
        settings=Settings(),
        sequences={"prepare_pickup": PREPARE},
        build=False,
        sleep=lambda _s: None,
    )


def test_a_webhook_step_tells_the_store_to_prepare_the_order(store_system, httpserver):
    received = []

    def store(request):
        received.append(request)
        return Response(json.dumps({"id": "task-9"}), status=200, content_type="application/json")

    httpserver.expect_request("/store-system", method="POST").respond_with_handler(store)
    report = _tick(store_system, T0)
    assert report.sequences["prepare_pickup"].steps["tell_store"].sent == 1
    [request] = received
    body = request.get_data()
    stamp = request.headers[TIMESTAMP_HEADER]
    assert verify_signature(SECRET, body, stamp, request.headers[SIGNATURE_HEADER], now=float(stamp))
    assert not verify_signature(
        "another secret", body, stamp, request.headers[SIGNATURE_HEADER], now=float(stamp)
    )
    document = json.loads(body)
    assert document["channel"] == "webhook" and document["to"] == "store:nyc"
    assert document["data"]["action"] == "prepare_pickup"
    assert document["data"]["order_id"] == "P123" and document["data"]["store_id"] == "nyc"
    assert document["data"]["items"] == [{"sku": "TEE-B", "name": "Black Tee", "quantity": 2}]
    [delivery] = deliveries(store_system)
    assert (delivery.channel, delivery.status, delivery.provider_message_id) == ("webhook", "sent", "task-9")
    assert [e.name for e in timeline(store_system, ("Webhook Sent",))] == ["Webhook Sent"]
    _tick(store_system, T0 + timedelta(minutes=5))
    assert len(received) == 1  # once per enrollment and step


def test_a_webhook_is_delivered_at_least_once(store_system, httpserver):
    answers = [Response("busy", status=500), Response("{}", status=200, content_type="application/json")]
    received = []

    def store(request):
        received.append(request.headers["X-Omni-Delivery-Id"])
        return answers[len(received) - 1]

    httpserver.expect_request("/store-system", method="POST").respond_with_handler(store)
    _tick(store_system, T0)
    assert len(received) == 2 and received[0] == received[1]  # the receiver dedupes on the delivery id
    assert [d.status for d in deliveries(store_system)] == ["sent"]


def test_a_webhook_template_must_render_a_json_object(store_system, httpserver, tmp_path, monkeypatch):
    import shutil

    from omni.core.settings import get_settings
    from templates.rendering import templates_dir

    folder = tmp_path / "templates"
    shutil.copytree(templates_dir(), folder)
    (folder / "webhook" / "prepare_pickup.json.j2").write_text('["not", "an", "object"]')
    monkeypatch.setenv("OMNI_TEMPLATES_DIR", str(folder))
    get_settings.cache_clear()
    report = _tick(store_system, T0)
    assert report.sequences["prepare_pickup"].steps["tell_store"].failed == 1
    [delivery] = deliveries(store_system)
    assert delivery.status == "failed" and "not a JSON object" in delivery.error
