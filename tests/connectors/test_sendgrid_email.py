"""SendGrid v3 Mail Send against a fake server speaking its contract."""

from __future__ import annotations

import pytest
from connector_contract import FAST, ConnectorContract, Sleeps
from connector_fakes import FakeSendGrid

from connectors import Message, Status, send_batch
from connectors.sendgrid_email import HTML_TAG, TEXT_TAG, SendGridEmail


def email(i: int, **kwargs) -> Message:
    values = {
        "delivery_id": f"enrollment:1:{i}:cart_email",
        "channel": "email",
        "to": f"customer{i}@example.org",
        "customer_id": i,
        "template": "email/abandoned_cart",
        "subject": f"Customer {i}, you left 2 items in your cart",
        "html": f"<p>Hi customer {i}</p>",
        "text": f"Hi customer {i}",
        "unsubscribe_url": f"https://shop.example/u?token=t{i}",
        "categories": ("email_abandoned_cart",),
    }
    values.update(kwargs)
    return Message(**values)


class TestSendGridEmail(ConnectorContract):
    provider = "sendgrid"
    fake_class = FakeSendGrid
    batch_limit = 1000
    channel = "email"
    missing_setting = ({"email_connector": "sendgrid"}, "OMNI_SENDGRID_API_KEY")

    def make_connector(self, fake, base_url=None, timeout=5.0, **kwargs):
        return SendGridEmail(
            api_key=fake.api_key,
            email_from="Omni Shop <news@shop.example>",
            base_url=base_url or fake.url,
            timeout=timeout,
            **kwargs,
        )

    def message(self, index: int) -> Message:
        return email(index)

    def secrets(self, fake) -> list[str]:
        return [fake.api_key]

    def permanent(self, fake) -> None:
        fake.script(400, {"errors": [{"message": "Invalid from", "field": "from", "help": None}]})

    # --- SendGrid specifics ---------------------------------------------------------------------------

    def test_request_shape_field_by_field(self, fake, connector):
        messages = [email(1), email(2)]
        results = connector.send(messages)
        assert [r.status for r in results] == [Status.SENT, Status.SENT]
        [seen] = fake.requests
        assert seen.method == "POST" and seen.path == "/v3/mail/send"
        assert seen.headers["authorization"] == f"Bearer {fake.api_key}"
        body = seen.json()
        assert body["from"] == {"email": "news@shop.example", "name": "Omni Shop"}
        assert body["content"] == [
            {"type": "text/plain", "value": TEXT_TAG},
            {"type": "text/html", "value": HTML_TAG},
        ]
        assert body["categories"] == ["email_abandoned_cart"]
        assert body["mail_settings"] == {"sandbox_mode": {"enable": False}}
        assert "asm" not in body
        first = body["personalizations"][0]
        assert first["to"] == [{"email": "customer1@example.org"}]
        assert first["subject"] == "Customer 1, you left 2 items in your cart"
        assert first["custom_args"] == {"omni_delivery_id": "enrollment:1:1:cart_email"}
        assert first["headers"] == {
            "List-Unsubscribe": "<https://shop.example/u?token=t1>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        assert first["substitutions"] == {TEXT_TAG: "Hi customer 1", HTML_TAG: "<p>Hi customer 1</p>"}
        # The X-Message-Id of the request is every message's provider id.
        assert results[0].provider_id == results[1].provider_id == "msg000001SGfake"

    def test_single_message_carries_its_content_inline(self, fake, connector):
        connector.send([email(1)])
        body = fake.requests[0].json()
        assert body["content"][1] == {"type": "text/html", "value": "<p>Hi customer 1</p>"}
        assert "substitutions" not in body["personalizations"][0]

    def test_sandbox_and_unsubscribe_group(self, fake):
        connector = self.make_connector(fake, sandbox=True, asm_group_id=4242)
        [result] = connector.send([email(1)])
        assert result.status is Status.SENT
        assert result.info["status_code"] == 200  # sandbox mode validates only: 200, not 202
        body = fake.requests[0].json()
        assert body["mail_settings"]["sandbox_mode"]["enable"] is True
        assert body["asm"] == {"group_id": 4242, "groups_to_display": [4242]}

    def test_1000_personalizations_per_request(self, fake, connector):
        messages = [email(i) for i in range(2500)]
        report = send_batch(connector, messages, policy=FAST, sleep=Sleeps())
        assert report.counts() == {"sent": 2500, "retryable": 0, "failed": 0, "unknown": 0}
        assert [len(r.json()["personalizations"]) for r in fake.requests] == [1000, 1000, 500]

    def test_an_address_appears_once_per_request(self, fake, connector):
        results = connector.send([email(1), email(2, to="customer1@example.org", delivery_id="other")])
        assert all(r.status is Status.SENT for r in results)
        assert len(fake.requests) == 2

    def test_large_content_is_grouped_by_identical_content(self, fake, connector):
        big = "<p>" + "x" * 20_000 + "</p>"
        results = connector.send(
            [email(1, html=big, text="t"), email(2, html=big, text="t"), email(3, html=big + "!", text="t")]
        )
        assert all(r.status is Status.SENT for r in results)
        assert sorted(len(r.json()["personalizations"]) for r in fake.requests) == [1, 2]
        for seen in fake.requests:
            assert all("substitutions" not in p for p in seen.json()["personalizations"])

    def test_400_naming_one_personalization_fails_only_that_message(self, fake, connector):
        results = connector.send([email(1), email(2, to="not-an-address"), email(3)])
        assert [r.status for r in results] == [Status.RETRYABLE, Status.FAILED, Status.RETRYABLE]
        assert "valid address" in results[1].reason
        report = send_batch(
            connector, [email(1), email(2, to="not-an-address"), email(3)], policy=FAST, sleep=Sleeps()
        )
        assert [r.status for r in report.results] == [Status.SENT, Status.FAILED, Status.SENT]

    @pytest.mark.parametrize("status", [401, 403, 413])
    def test_other_4xx_are_permanent(self, fake, connector, status):
        fake.script(status, {"errors": [{"message": "nope", "field": None, "help": None}]})
        [result] = connector.send([email(1)])
        assert result.status is Status.FAILED
        assert f"HTTP {status}" in result.reason

    def test_wrong_key_is_401_permanent(self, fake):
        connector = SendGridEmail(api_key="SG.wrong", email_from="news@shop.example", base_url=fake.url)
        [result] = connector.send([email(1)])
        assert result.status is Status.FAILED
        assert "401" in result.reason

    def test_x_ratelimit_reset_is_honoured(self, fake, connector):
        import time

        reset = int(time.time()) + 30
        fake.script(429, {"errors": [{"message": "too many requests"}]}, {"X-RateLimit-Reset": str(reset)})
        [result] = connector.send([email(1)])
        assert result.status is Status.RETRYABLE
        assert 20 <= result.retry_after <= 31

    def test_502_raises_base_http_error_and_is_retryable(self, fake, connector):
        fake.script(502, b"bad gateway")
        [result] = connector.send([email(1)])
        assert result.status is Status.RETRYABLE

    def test_revoked_key_stops_before_the_other_requests_of_the_batch(self, fake):
        connector = SendGridEmail(api_key="SG.revoked", email_from="news@shop.example", base_url=fake.url)
        # The same address twice: two requests planned for one chunk.
        messages = [email(1), email(2, to="customer1@example.org", delivery_id="other"), email(3)]
        report = send_batch(connector, messages, policy=FAST, sleep=Sleeps())
        assert len(fake.requests) == 1
        assert report.halted and "401" in report.halted
        assert [r.status for r in report.results] == [Status.RETRYABLE] * 3
        assert all(r.reason == report.halted for r in report.results)

    def test_the_key_never_follows_a_redirect(self, fake, connector):
        from connector_fakes import RawServer

        with RawServer("drop") as other:
            fake.script(302, b"", {"Location": other.url + "/v3/mail/send"})
            [result] = connector.send([email(1)])
            assert other.requests == []
        assert result.status is Status.FAILED and "redirect" in result.reason
        assert fake.api_key not in result.reason
