"""Twilio Programmable Messaging against a fake server speaking its contract."""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import replace
from urllib.parse import quote, quote_plus

import pytest
from connector_contract import FAST, ConnectorContract, Sleeps
from connector_fakes import FakeTwilio

from connectors import Message, Status, send_batch
from connectors.twilio_sms import TwilioSms


def sms(i: int, to: str | None = None, **kwargs) -> Message:
    return Message(
        delivery_id=f"d{i}",
        channel="sms",
        to=to or f"+1415555{i:04d}",
        customer_id=i,
        text=f"Omni: your order o-{i} is ready for pickup. Reply STOP to opt out.",
        **kwargs,
    )


class TestTwilioSms(ConnectorContract):
    provider = "twilio_sms"
    fake_class = FakeTwilio
    batch_limit = 1
    channel = "sms"
    missing_setting = (
        {"sms_connector": "twilio_sms", "twilio_account_sid": "AC1", "twilio_from": "+15005550006"},
        "OMNI_TWILIO_AUTH_TOKEN",
    )

    def make_connector(self, fake, base_url=None, timeout=5.0, sender="+15005550006"):
        return TwilioSms(
            account_sid=fake.account_sid,
            auth_token=fake.auth_token,
            sender=sender,
            base_url=base_url or fake.url,
            timeout=timeout,
        )

    def message(self, index: int) -> Message:
        return sms(index)

    def secrets(self, fake) -> list[str]:
        return [fake.auth_token]

    def throttled(self, fake, retry_after: int) -> None:
        fake.script(
            429,
            {
                "code": 20429,
                "message": "Too Many Requests",
                "more_info": "https://www.twilio.com/docs/errors/20429",
                "status": 429,
            },
            {"Retry-After": str(retry_after)},
        )

    def permanent(self, fake) -> None:
        fake.script(
            400,
            {
                "code": 21211,
                "message": "The 'To' number is not a valid phone number.",
                "more_info": "",
                "status": 400,
            },
        )

    def revoked(self, fake) -> None:
        fake.script(
            401,
            {
                "code": 20003,
                "message": "Authentication Error - invalid username",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            },
        )

    def test_request_is_form_encoded_field_by_field(self, fake, connector):
        [result] = connector.send([sms(1)])
        assert result.status is Status.SENT
        assert result.provider_id.startswith("SM")
        [seen] = fake.requests
        assert seen.path == f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json"
        assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
        assert seen.form == {
            "To": ["+14155550001"],
            "From": ["+15005550006"],
            "Body": ["Omni: your order o-1 is ready for pickup. Reply STOP to opt out."],
        }

    def test_the_status_callback_names_the_delivery(self, fake):
        connector = TwilioSms(
            account_sid=fake.account_sid,
            auth_token=fake.auth_token,
            sender="+15005550006",
            base_url=fake.url,
            status_callback_url="https://hooks.shop.example/webhooks/twilio/status",
        )
        message = replace(sms(1), delivery_id="enrollment:12:reminder")
        [result] = connector.send([message])
        assert result.status is Status.SENT
        assert fake.requests[0].form["StatusCallback"] == [
            "https://hooks.shop.example/webhooks/twilio/status?delivery_id=enrollment%3A12%3Areminder"
        ]

    @pytest.mark.parametrize(
        ("configured", "expected"),
        [
            ("https://h.example/s", "https://h.example/s?delivery_id=campaign%3Aa+b%3A7"),
            ("https://h.example/s?", "https://h.example/s?delivery_id=campaign%3Aa+b%3A7"),
            ("https://h.example/s?tenant=eu", "https://h.example/s?tenant=eu&delivery_id=campaign%3Aa+b%3A7"),
            (
                "https://h.example/s?tenant=eu&",
                "https://h.example/s?tenant=eu&delivery_id=campaign%3Aa+b%3A7",
            ),
            (" https://h.example/s#frag ", "https://h.example/s?delivery_id=campaign%3Aa+b%3A7#frag"),
        ],
    )
    def test_the_delivery_id_is_added_to_the_configured_query(self, fake, configured, expected):
        connector = TwilioSms(
            account_sid=fake.account_sid,
            auth_token=fake.auth_token,
            sender="+15005550006",
            base_url=fake.url,
            status_callback_url=configured,
        )
        message = replace(sms(1), delivery_id="campaign:a b:7")
        assert connector.form(message)["StatusCallback"] == expected

    def test_messaging_service_sid_is_sent_as_such(self, fake):
        connector = self.make_connector(fake, sender="MG" + "a" * 32)
        connector.send([sms(1)])
        assert fake.requests[0].form["MessagingServiceSid"] == ["MG" + "a" * 32]
        assert "From" not in fake.requests[0].form

    def test_21610_is_permanent_and_asks_for_an_sms_opt_out(self, connector):
        [result] = connector.send([sms(4, to="+15005550004")])
        assert result.status is Status.FAILED
        assert "21610" in result.reason
        [effect] = result.effects
        assert (effect.kind, effect.customer_id, effect.value, effect.source) == (
            "sms_opted_out",
            4,
            "+15005550004",
            "twilio:21610",
        )

    def test_21211_invalid_number_is_permanent(self, connector):
        [result] = connector.send([sms(1, to="+15005550001")])
        assert result.status is Status.FAILED
        assert "21211" in result.reason and not result.effects

    def test_21408_region_is_permanent(self, connector):
        [result] = connector.send([sms(1, to="+15005550003")])
        assert result.status is Status.FAILED and "21408" in result.reason

    def test_not_e164_fails_without_a_request(self, fake, connector):
        [result] = connector.send([sms(1, to="0415 555 0100")])
        assert result.status is Status.FAILED
        assert fake.requests == []

    def test_wrong_token_is_permanent(self, fake):
        connector = TwilioSms(
            account_sid=fake.account_sid, auth_token="wrong", sender="+15005550006", base_url=fake.url
        )
        [result] = connector.send([sms(1)])
        assert result.status is Status.FAILED and "20003" in result.reason

    def test_5xx_is_ambiguous(self, fake, connector):
        fake.script(503, {"code": 20500, "message": "Service unavailable", "status": 503})
        [result] = connector.send([sms(1)])
        assert result.status is Status.RETRYABLE and result.ambiguous

    def test_a_revoked_token_halts_after_one_request_not_one_per_message(self, fake):
        wrong = TwilioSms(
            account_sid=fake.account_sid, auth_token="revoked-token", sender="+15005550006", base_url=fake.url
        )
        report = send_batch(wrong, [sms(i) for i in range(1000)], policy=FAST, sleep=Sleeps())
        assert len(fake.requests) == 1
        assert report.halted and "20003" in report.halted
        assert report.counts() == {"sent": 0, "retryable": 1000, "failed": 0, "unknown": 0}

    def test_20429_is_never_ambiguous_and_retried(self, fake, connector):
        self.throttled(fake, 0)
        report = send_batch(connector, [sms(1)], policy=FAST, sleep=Sleeps())
        assert report.results[0].status is Status.SENT and len(fake.requests) == 2


class EchoingTwilio(FakeTwilio):
    """A Twilio whose error body echoes the request's Authorization header (raw, URL- and JSON-encoded)."""

    def answer(self, seen):
        auth = seen.headers.get("authorization", "")
        message = f"Bad request; headers: Authorization={auth} ({quote(auth, safe='')}) {json.dumps(auth)}"
        return self.json_response(500, {"code": 20500, "message": message, "status": 500})


def test_an_echoed_authorization_header_never_leaks(httpserver, caplog):
    caplog.set_level(logging.DEBUG)
    fake = EchoingTwilio(httpserver)
    connector = TwilioSms(
        account_sid=fake.account_sid, auth_token=fake.auth_token, sender="+15005550006", base_url=fake.url
    )
    report = send_batch(connector, [sms(1), sms(2)], policy=FAST, sleep=Sleeps())
    encoded = base64.b64encode(f"{fake.account_sid}:{fake.auth_token}".encode()).decode()
    assert report.results[0].status is Status.UNKNOWN
    assert "Authorization=Basic" in report.results[0].reason  # the echo is there, masked
    text = repr(report) + caplog.text + json.dumps([r.reason for r in report.results])
    for secret in (
        fake.auth_token,
        encoded,
        quote(encoded, safe=""),
        quote_plus(encoded),
        encoded.rstrip("="),
    ):
        assert secret not in text, secret
