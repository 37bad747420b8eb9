"""Signed JSON webhooks against a fake receiver that checks the signature."""

from __future__ import annotations

from connector_contract import ConnectorContract
from connector_fakes import FakeWebhook

from connectors import Message, Status
from connectors.webhook import WebhookConnector, sign, verify_signature


def hook(i: int) -> Message:
    return Message(
        delivery_id=f"w{i}",
        channel="webhook",
        to="nyc-01",
        customer_id=i,
        template="prepare_pickup",
        data={"order_id": f"o-{i}", "action": "prepare"},
    )


class TestWebhook(ConnectorContract):
    provider = "webhook"
    fake_class = FakeWebhook
    batch_limit = 1
    channel = "webhook"
    missing_setting = ({"webhook_connector": "webhook", "webhook_url": "http://x"}, "OMNI_WEBHOOK_SECRET")

    def make_connector(self, fake, base_url=None, timeout=5.0):
        return WebhookConnector(
            url=(base_url or fake.url) + "/hooks/omni",
            secret=fake.secret,
            timeout=timeout,
            clock=lambda: 1_780_000_000,
        )

    def message(self, index: int) -> Message:
        return hook(index)

    def secrets(self, fake) -> list[str]:
        return [fake.secret]

    def permanent(self, fake) -> None:
        fake.script(422, {"error": "unknown order"})

    def test_body_and_signature(self, fake, connector):
        [result] = connector.send([hook(1)])
        assert result.status is Status.SENT and result.provider_id == "wh-1"
        [seen] = fake.requests
        assert seen.path == "/hooks/omni"
        assert seen.headers["x-omni-delivery-id"] == "w1"
        assert seen.headers["x-omni-timestamp"] == "1780000000"
        assert seen.json() == {
            "delivery_id": "w1",
            "channel": "webhook",
            "to": "nyc-01",
            "customer_id": 1,
            "template": "prepare_pickup",
            "data": {"order_id": "o-1", "action": "prepare"},
            "sent_at": 1780000000,
        }
        assert verify_signature(
            fake.secret, seen.body, "1780000000", seen.headers["x-omni-signature"], now=1_780_000_010
        )

    def test_verify_rejects_tampering_and_stale_timestamps(self):
        body = b'{"a":1}'
        signature = sign("s3cret", 100, body)
        assert verify_signature("s3cret", body, "100", signature, now=100)
        assert not verify_signature("s3cret", b'{"a":2}', "100", signature, now=100)
        assert not verify_signature("other", body, "100", signature, now=100)
        assert not verify_signature("s3cret", body, "100", signature, now=100 + 301)

    def test_wrong_secret_is_permanent(self, fake):
        connector = WebhookConnector(url=fake.url, secret="wrong-secret")
        [result] = connector.send([hook(1)])
        assert result.status is Status.FAILED

    def test_serves_any_channel(self, fake, connector):
        message = Message(delivery_id="e1", channel="sms", to="+14155550100", text="hi")
        [result] = connector.send([message])
        assert result.status is Status.SENT
