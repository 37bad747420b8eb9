"""The end-to-end story: an email goes out through (a local server speaking) SendGrid's contract, SendGrid
posts a signed hard bounce to ``omni serve``, and the next tick emails that address no more but still
reaches the customer by SMS, the step's fallback. SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "sequences"))  # journey_kit
sys.path.insert(0, str(Path(__file__).parents[1] / "connectors"))  # connector_fakes

from connector_fakes import FakeSendGrid  # noqa: E402
from feedback_kit import SendGridKey, post_sendgrid, settings_for  # noqa: E402
from journey_kit import T0, customer, deliveries, no_sleep, outbox, seed_stores  # noqa: E402

from audiences import load_audiences  # noqa: E402
from omni.core.settings import Settings  # noqa: E402
from profiles.consent import reachability_of  # noqa: E402
from profiles.db import session_scope  # noqa: E402
from sequences.definitions import parse_sequence  # noqa: E402
from sequences.tick import run_tick  # noqa: E402


def test_a_hard_bounce_stops_email_and_the_customer_is_still_reached_by_sms(engine, live_server, httpserver):
    fake = FakeSendGrid(httpserver)
    seed_stores(engine)
    customer(engine, 1)  # cust1@example.org, +12125551001 with an SMS opt-in, and a cart
    story = parse_sequence(
        {
            "name": "story",
            "trigger": {"audience": "cart_abandoners"},
            "steps": [
                {"id": "first", "send": {"channel": "email", "template": "email/abandoned_cart"}},
                {"wait": "1d"},
                {
                    "id": "second",
                    "send": {
                        "channel": "email",
                        "template": "email/abandoned_cart",
                        "fallback": "sms",
                        "fallback_template": "sms/pickup_reminder",
                    },
                },
            ],
        },
        file="story.yaml",
        audiences=load_audiences(),
    )
    settings = Settings(
        email_connector="sendgrid",
        sendgrid_api_key=FakeSendGrid.api_key,
        sendgrid_base_url=fake.url,
        email_from="shop@example.org",
    )

    def tick(at):
        return run_tick(engine, now=at, settings=settings, sequences={"story": story}, sleep=no_sleep)

    tick(T0)
    [sent] = fake.requests
    [personalization] = sent.json()["personalizations"]
    assert personalization["to"] == [{"email": "cust1@example.org"}]
    assert personalization["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    delivery_id = personalization["custom_args"]["omni_delivery_id"]
    [first] = deliveries(engine)
    assert (first.dedupe_key, first.status, first.provider_message_id) == (
        delivery_id,
        "sent",
        "msg000001SGfake",
    )

    # SendGrid's signed Event Webhook: delivered to the inbox once, then the mailbox is gone.
    key = SendGridKey()
    server = live_server(engine, settings_for(engine, key), background=False)
    server.app.state.clock = lambda: T0 + timedelta(hours=2)
    bounce = {
        "email": "cust1@example.org",
        "timestamp": int((T0 + timedelta(hours=1)).timestamp()),
        "event": "bounce",
        "type": "bounce",
        "reason": "550 5.1.1 The email account that you tried to reach does not exist",
        "sg_event_id": "ZmFrZS1ib3VuY2U",
        "sg_message_id": "msg000001SGfake.filterdrecv-1.0",
        "omni_delivery_id": delivery_id,
    }
    answer = post_sendgrid(server, key, [bounce], at=T0 + timedelta(hours=2))
    assert answer.status_code == 200 and answer.json()["outcomes"] == {"applied": 1}
    [first] = deliveries(engine)
    assert first.provider_status == "bounced" and "550 5.1.1" in first.error

    tick(T0 + timedelta(days=1, minutes=5))
    assert len(fake.requests) == 1  # the address is never emailed again
    rows = {d.step_id: d for d in deliveries(engine)}
    assert rows["second"].status == "skipped"
    assert rows["second"].error == "email address suppressed (hard bounce)"
    [sms] = outbox(engine, "sms")
    assert (sms.recipient, sms.customer_id) == ("+12125551001", first.customer_id)
    with session_scope(engine) as session:
        reasons = reachability_of(session, first.customer_id)
    assert reasons["email"] == "email address suppressed (hard bounce)" and reasons["sms"] is None
