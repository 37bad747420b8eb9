"""Signed JSON webhooks: ``POST OMNI_WEBHOOK_URL`` for a store's clienteling or POS system ("prepare this
pickup order") or anything else that wants Omni's messages.

Body: ``{"delivery_id", "channel", "to", "customer_id", "template", "subject", "text", "html", "title",
"data", "sent_at"}`` (keys with no value left out). Headers: ``X-Omni-Delivery-Id``,
``X-Omni-Timestamp`` (unix seconds) and ``X-Omni-Signature: v1=<hex HMAC-SHA256(OMNI_WEBHOOK_SECRET,
"<timestamp>.<body>")>``. A receiver checks it with :func:`verify_signature` (reject stale timestamps:
replay protection). One message per request.

Answers: 2xx sent (the provider id is the JSON body's ``id`` when there is one, else the delivery id);
408, 429 and 5xx retryable (``Retry-After`` honoured); 401 / 403 permanent and ``halt`` (the receiver
rejects our signature or credentials: ``send_batch`` stops); 3xx never followed (permanent); other 4xx
permanent.

Delivery semantics: webhooks are at least once (the channel's ``at_least_once`` in ``omni.core.channels``):
receivers dedupe on ``X-Omni-Delivery-Id``, so ``send_batch`` retries ambiguous answers (5xx, timeouts,
dropped connections).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests
from pydantic import SecretStr

from connectors.base import Http, HttpConnector, Message, Result, classify_transport_error, reveal
from omni.core.channels import SEND_CHANNELS, Channel
from omni.core.settings import Settings

SIGNATURE_HEADER = "X-Omni-Signature"
TIMESTAMP_HEADER = "X-Omni-Timestamp"
DELIVERY_HEADER = "X-Omni-Delivery-Id"


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(
    secret: str, body: bytes, timestamp: str, signature: str, *, now: float, tolerance: float = 300
) -> bool:
    """Whether ``signature`` signs ``body`` at ``timestamp`` with ``secret`` and is at most ``tolerance``
    seconds from ``now`` (for receivers, and tests)."""
    try:
        if abs(now - int(timestamp)) > tolerance:
            return False
    except (TypeError, ValueError):
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookConnector(HttpConnector):
    provider = "webhook"
    channel = Channel.WEBHOOK
    channels = frozenset(SEND_CHANNELS)
    max_batch_size = 1
    rate_per_second = None
    secret_settings = ("webhook_secret",)
    label = "webhook"

    def __init__(
        self,
        *,
        url: str,
        secret: SecretStr | str,
        timeout: float = 10.0,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = self.require(url, "OMNI_WEBHOOK_URL")
        self.secret = secret if isinstance(secret, SecretStr) else SecretStr(secret)
        self.require(self.secret, "OMNI_WEBHOOK_SECRET")
        self.http = Http(timeout=timeout, session=session)
        self.clock = clock
        reveal(self.secret)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookConnector:
        return cls(
            url=cls.require(settings.webhook_url, "OMNI_WEBHOOK_URL"),
            secret=cls.require(settings.webhook_secret, "OMNI_WEBHOOK_SECRET"),
            timeout=settings.connector_timeout,
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {"url": self.url, "secret": self.secret}

    def body(self, message: Message, sent_at: int) -> bytes:
        document: dict[str, Any] = {
            "delivery_id": message.delivery_id,
            "channel": message.channel,
            "to": message.to,
            "customer_id": message.customer_id,
            "template": message.template,
            "subject": message.subject,
            "text": message.text,
            "html": message.html,
            "title": message.title,
            "data": dict(message.data) if message.data else None,
            "action": message.action,
            "sent_at": sent_at,
        }
        return json.dumps(
            {k: v for k, v in document.items() if v is not None}, separators=(",", ":")
        ).encode()

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        return [self._send_one(message) for message in batch]

    def _send_one(self, message: Message) -> Result:
        timestamp = int(self.clock())
        body = self.body(message, timestamp)
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: message.delivery_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(reveal(self.secret), timestamp, body),
        }
        try:
            response = self.http.request("POST", self.url, data=body, headers=headers)
        except Exception as exc:  # noqa: BLE001 - classified: refused/DNS or ambiguous (retried: at least once)
            verdict = classify_transport_error(exc)
            return verdict.replace(reason=f"webhook {verdict.reason}").result(message.delivery_id)
        if 200 <= response.status_code < 300:
            try:
                provider_id = response.json().get("id")
            except (ValueError, AttributeError):
                provider_id = None
            return Result.sent(message.delivery_id, str(provider_id or message.delivery_id))
        # Judged by HTTP status alone (HttpConnector.classify): the receiver's body is not read.
        return self.classify(response, [message]).result(message.delivery_id)
