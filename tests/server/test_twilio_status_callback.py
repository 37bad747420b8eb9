"""The SMS status loop end to end: a tick sends through (a local server speaking) Twilio's contract with
``OMNI_TWILIO_STATUS_CALLBACK_URL`` pointing at ``omni serve``; the fake Twilio then calls that URL back as
Twilio does (after answering the send, signed with the account's auth token, ``delivery_id`` in the URL the
connector gave), and the delivery records what Twilio said. SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).parents[1] / "sequences"))  # journey_kit
sys.path.insert(0, str(Path(__file__).parents[1] / "connectors"))  # connector_fakes

from connector_fakes import FakeTwilio  # noqa: E402
from feedback_kit import provider_events, twilio_signature  # noqa: E402
from journey_kit import T0, customer, deliveries, no_sleep, seed_stores  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from audiences import load_audiences  # noqa: E402
from omni.core.settings import Settings  # noqa: E402
from sequences.definitions import parse_sequence  # noqa: E402
from sequences.tick import run_tick  # noqa: E402


class CallingBackTwilio(FakeTwilio):
    """A fake Twilio that, like Twilio, reports each accepted message's progress to its StatusCallback:
    queued, sent, delivered, each a signed form POST (kept here until :meth:`call_back`, because Twilio
    calls back after the send has been answered, never within it)."""

    def __init__(self, httpserver) -> None:
        super().__init__(httpserver)
        self.pending: list[tuple[str, dict[str, str]]] = []

    def answer(self, seen):
        response = super().answer(seen)
        callback = (seen.form.get("StatusCallback") or [None])[0]
        if response.status_code == 201 and callback:
            sid = response.get_json()["sid"]
            for status in ("queued", "sent", "delivered"):
                params = {
                    "MessageSid": sid,
                    "SmsSid": sid,
                    "AccountSid": self.account_sid,
                    "MessageStatus": status,
                    "SmsStatus": status,
                    "To": seen.form["To"][0],
                    "From": seen.form["From"][0],
                    "ApiVersion": "2010-04-01",
                }
                self.pending.append((callback, params))
        return response

    def call_back(self) -> list[httpx.Response]:
        answers = []
        for url, params in self.pending:
            signature = twilio_signature(self.auth_token, url, params)
            answers.append(
                httpx.post(
                    url,
                    content=urlencode(params),
                    headers={
                        "Content-Type": "application/x-www-form-urlencoded",
                        "X-Twilio-Signature": signature,
                    },
                    timeout=30,
                )
            )
        self.pending.clear()
        return answers


def test_the_status_callback_carries_the_delivery_and_updates_it(engine, live_server, httpserver):
    twilio = CallingBackTwilio(httpserver)
    seed_stores(engine)
    customer(engine, 1)  # +12125551001 with an SMS opt-in, and a cart
    server = live_server(
        engine,
        Settings(
            database_url=engine.url.render_as_string(hide_password=False),
            twilio_auth_token=SecretStr(twilio.auth_token),
        ),
        background=False,
    )
    server.app.state.clock = lambda: T0
    settings = Settings(
        sms_connector="twilio_sms",
        twilio_account_sid=twilio.account_sid,
        twilio_auth_token=SecretStr(twilio.auth_token),
        twilio_from="+15005550006",
        twilio_base_url=twilio.url,
        twilio_status_callback_url=f"{server.url}/webhooks/twilio/status",
    )
    sequence = parse_sequence(
        {
            "name": "texts",
            "trigger": {"audience": "cart_abandoners"},
            "steps": [{"id": "text", "send": {"channel": "sms", "template": "sms/pickup_reminder"}}],
        },
        file="texts.yaml",
        audiences=load_audiences(),
    )
    run_tick(engine, now=T0, settings=settings, sequences={"texts": sequence}, sleep=no_sleep)

    [sent] = twilio.requests
    [row] = deliveries(engine)
    callback = sent.form["StatusCallback"][0]
    assert callback.startswith(f"{server.url}/webhooks/twilio/status?delivery_id=")
    assert parse_qs(urlsplit(callback).query) == {"delivery_id": [row.dedupe_key]}
    assert (row.status, row.provider_status) == ("sent", None)

    answers = twilio.call_back()
    assert [a.status_code for a in answers] == [200, 200, 200]
    [row] = deliveries(engine)
    assert (row.provider_status, row.delivered_at, row.error) == ("delivered", T0, None)
    kept = provider_events(engine)
    assert [(e.kind, e.outcome, e.delivery_id) for e in kept] == [
        ("status:queued", "applied", row.dedupe_key),
        ("status:sent", "applied", row.dedupe_key),
        ("status:delivered", "applied", row.dedupe_key),
    ]
    assert {e.payload["MessageSid"] for e in kept} == {row.provider_message_id}
