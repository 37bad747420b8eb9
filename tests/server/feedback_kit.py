"""Helpers for the feedback webhook tests: a store with a customer and two sent deliveries, real SendGrid
signatures (an ECDSA P-256 key pair made with ``cryptography``, the public key shown as SendGrid's console
shows it) and real Twilio signatures (HMAC-SHA1, written out here from Twilio's documentation)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlalchemy import insert, select

from omni.core.settings import Settings
from profiles.consent import consents_of
from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.lookup import resolve_customer_key
from profiles.models import Delivery, Event, ProviderEvent

NOW = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
TWILIO_TOKEN = "twilio-auth-token-for-tests"
EMAIL_KEY = "campaign:spring:1"
SMS_KEY = "campaign:spring-sms:1"
SMS_SID = "SM" + "a" * 32
PHONE = "+14155550100"


class SendGridKey:
    """A signing key pair like SendGrid's: the console shows the public key as base64 DER."""

    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_b64 = base64.b64encode(der).decode()

    def sign(self, body: bytes, timestamp: str) -> str:
        signature = self.private.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(signature).decode()


def settings_for(engine, key: SendGridKey, **values: Any) -> Settings:
    return Settings(
        database_url=engine.url.render_as_string(hide_password=False),
        sendgrid_webhook_public_key=SecretStr(key.public_b64),
        twilio_auth_token=SecretStr(TWILIO_TOKEN),
        **values,
    )


def start(live_server, engine, key: SendGridKey, **values: Any):
    server = live_server(engine, settings_for(engine, key, **values), background=False)
    server.app.state.clock = lambda: NOW
    return server


def post_sendgrid(
    server,
    key: SendGridKey,
    events: Any,
    *,
    at: datetime = NOW,
    signature: str | None = None,
    raw: bytes | None = None,
) -> httpx.Response:
    body = raw if raw is not None else json.dumps(events).encode()
    timestamp = str(int(at.timestamp()))
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "X-Twilio-Email-Event-Webhook-Signature": signature
        if signature is not None
        else key.sign(body, timestamp),
    }
    return httpx.post(f"{server.url}/webhooks/sendgrid", content=body, headers=headers, timeout=30)


def twilio_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented algorithm: the full URL, then each POST parameter name and value sorted by
    name, HMAC-SHA1 keyed with the auth token, base64."""
    data = url + "".join(f"{name}{params[name]}" for name in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def post_twilio(
    server,
    path: str,
    params: dict[str, str],
    *,
    token: str = TWILIO_TOKEN,
    signed_url: str | None = None,
    signature: str | None = None,
) -> httpx.Response:
    url = f"{server.url}{path}"
    signature = signature if signature is not None else twilio_signature(token, signed_url or url, params)
    return httpx.post(
        url,
        content=urlencode(params),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
        timeout=30,
    )


def sg_event(kind: str, event_id: str, *, delivery: str | None = EMAIL_KEY, **fields: Any) -> dict[str, Any]:
    event = {
        "email": "ana@example.org",
        "timestamp": int((NOW - timedelta(minutes=10)).timestamp()),
        "event": kind,
        "sg_event_id": event_id,
        "sg_message_id": "msg000001SGfake.filter0001.1.0",
        **fields,
    }
    if delivery is not None:
        event["omni_delivery_id"] = delivery
    return event


def seed(engine) -> int:
    """Ana (email, phone, SMS opt-in) with a sent campaign email and a sent SMS; returns her id."""
    ingest_payloads(
        engine,
        [
            {
                "type": "identify",
                "userId": "ana",
                "messageId": "id-ana",
                "timestamp": (NOW - timedelta(days=3)).isoformat(),
                "traits": {"email": "ana@example.org", "phone": PHONE, "sms_opt_in": True},
            }
        ],
        now=NOW - timedelta(days=3),
    )
    with session_scope(engine) as session:
        ana = resolve_customer_key(session, "ana")
        base = {
            "enrollment_id": None,
            "step_id": "send",
            "customer_id": ana,
            "ad_audience": None,
            "action": None,
            "status": "sent",
            "attempts": 1,
            "marketing": True,
            "next_attempt_at": None,
            "created_at": NOW - timedelta(hours=1),
            "updated_at": NOW - timedelta(hours=1),
            "sent_at": NOW - timedelta(hours=1),
            "error": None,
        }
        session.execute(
            insert(Delivery.__table__),
            [
                {
                    **base,
                    "dedupe_key": EMAIL_KEY,
                    "campaign": "spring",
                    "channel": "email",
                    "connector": "sendgrid",
                    "template": "email/x",
                    "provider_message_id": "msg000001SGfake",
                },
                {
                    **base,
                    "dedupe_key": SMS_KEY,
                    "campaign": "spring-sms",
                    "channel": "sms",
                    "connector": "twilio_sms",
                    "template": "sms/x",
                    "provider_message_id": SMS_SID,
                },
            ],
        )
    return ana


def delivery(engine, key: str):
    table = Delivery.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).where(table.c.dedupe_key == key)).one()


def events(engine, *names: str) -> list[Any]:
    table = Event.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).where(table.c.name.in_(names)).order_by(table.c.id)).all()


def provider_events(engine) -> list[Any]:
    table = ProviderEvent.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).order_by(table.c.id)).all()


def consent(engine, customer_id: int, channel: str) -> dict:
    with session_scope(engine) as session:
        return consents_of(session, customer_id)[channel]
