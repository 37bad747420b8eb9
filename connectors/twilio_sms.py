"""SMS through Twilio Programmable Messaging: ``POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json``.

Auth: HTTP Basic ``OMNI_TWILIO_ACCOUNT_SID:OMNI_TWILIO_AUTH_TOKEN``. Body form-encoded: ``To`` (E.164),
``From`` (``OMNI_TWILIO_FROM``; a ``MG…`` value is sent as ``MessagingServiceSid``), ``Body`` (≤ 1,600
characters), optional ``StatusCallback`` (``OMNI_TWILIO_STATUS_CALLBACK_URL`` with ``delivery_id=<the
delivery>`` added to its query, which ``omni serve``'s ``/webhooks/twilio/status`` matches). Base URL
``OMNI_TWILIO_BASE_URL``.

Limits: one recipient per request (no bulk endpoint). Success: ``201`` with the Message JSON; its
``sid`` (``SM…``) is the provider id.

Errors ``{"code", "message", "more_info", "status"}``:
- 21610 (the customer replied STOP): permanent, with an ``sms_opted_out`` effect so the profile store
  records an SMS opt-out (``sequences.effects.apply_effects``);
- 21211 invalid ``To``, 21408 region not enabled, 21612 unroutable, 21614 not a mobile number:
  permanent for that message;
- 20003 / 20005 / HTTP 401 / 403 (authentication failed, account not active): permanent and ``halt``
  (nothing can be sent with this credential: ``send_batch`` stops at once);
- 20429 / HTTP 429 (too many concurrent requests; documented as never processed): retryable, safe;
- 5xx, read timeouts, a connection dropped after the request was sent: ambiguous (Twilio may have queued
  the message), so ``send_batch`` records them ``unknown`` and never resends (SMS is at most once).

The Basic credential (``base64(SID:token)``, and its URL-encoded forms) is registered for redaction: a
Twilio error body echoing the ``Authorization`` header never reaches a reason or a log.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import requests
from pydantic import SecretStr

from connectors.base import (
    Effect,
    EffectKind,
    Http,
    HttpConnector,
    Message,
    Result,
    Status,
    Verdict,
    classify_transport_error,
    redact,
    register_basic_auth,
)
from omni.core.channels import Channel, spec
from omni.core.settings import Settings

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
MESSAGING_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")

PERMANENT_CODES = {
    21211: "invalid To number",
    21408: "region not enabled (Geo Permissions)",
    21612: "To number unroutable",
    21614: "To number is not a mobile number",
}
# The credential or the account is invalid: nothing can be sent (SendReport.halted).
AUTH_CODES = {20003: "authentication failed", 20005: "account not active"}
OPTED_OUT = 21610
TOO_MANY_REQUESTS = 20429


class TwilioSms(HttpConnector):
    provider = "twilio_sms"
    channel = Channel.SMS
    max_batch_size = 1
    # Twilio's documented Body limit is the SMS channel's (10 segments of a concatenated message).
    body_max_chars = spec(Channel.SMS).body_limit
    rate_per_second = None
    secret_settings = ("twilio_auth_token",)
    label = "Twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: SecretStr | str,
        sender: str,
        base_url: str = "https://api.twilio.com",
        status_callback_url: str | None = None,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.account_sid = self.require(account_sid, "OMNI_TWILIO_ACCOUNT_SID")
        self.auth_token = auth_token if isinstance(auth_token, SecretStr) else SecretStr(auth_token)
        self.require(self.auth_token, "OMNI_TWILIO_AUTH_TOKEN")
        self.sender = self.require(sender, "OMNI_TWILIO_FROM")
        self.base_url = base_url.rstrip("/")
        self.status_callback_url = status_callback_url
        self.http = Http(timeout=timeout, session=session)
        self._authorization = register_basic_auth(self.account_sid, self.auth_token)

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioSms:
        return cls(
            account_sid=cls.require(settings.twilio_account_sid, "OMNI_TWILIO_ACCOUNT_SID"),
            auth_token=cls.require(settings.twilio_auth_token, "OMNI_TWILIO_AUTH_TOKEN"),
            sender=cls.require(settings.twilio_from, "OMNI_TWILIO_FROM"),
            base_url=settings.twilio_base_url,
            status_callback_url=settings.twilio_status_callback_url,
            timeout=settings.connector_timeout,
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "account_sid": self.account_sid,
            "auth_token": self.auth_token,
            "sender": self.sender,
        }

    @property
    def url(self) -> str:
        return f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"

    def form(self, message: Message) -> dict[str, str]:
        form = {"To": message.to.strip(), "Body": message.text or ""}
        if MESSAGING_SERVICE_SID.match(self.sender):
            form["MessagingServiceSid"] = self.sender
        else:
            form["From"] = self.sender
        if self.status_callback_url:
            form["StatusCallback"] = self.callback_url(message)
        return form

    def callback_url(self, message: Message) -> str:
        """``OMNI_TWILIO_STATUS_CALLBACK_URL`` with ``delivery_id=<the message's delivery id>`` appended to
        its query, so that ``omni serve``'s status webhook finds the delivery without a lookup by
        ``MessageSid`` (Twilio calls, and signs, the URL exactly as given)."""
        url = (self.status_callback_url or "").strip()
        base, hash_, fragment = url.partition("#")
        if "?" not in base:
            base += "?"
        elif not base.endswith(("?", "&")):
            base += "&"
        return base + urlencode({"delivery_id": message.delivery_id}) + hash_ + fragment

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        return [self._send_one(message) for message in batch]

    def _send_one(self, message: Message) -> Result:
        to = message.to.strip()
        if not (E164.match(to) or to.startswith("whatsapp:")):
            return Result.failed(message.delivery_id, f"{to!r} is not an E.164 phone number")
        if not message.text:
            return Result.failed(message.delivery_id, "empty SMS body")
        if len(message.text) > self.body_max_chars:
            return Result.failed(
                message.delivery_id, f"SMS body of {len(message.text)} chars exceeds {self.body_max_chars}"
            )
        try:
            response = self.http.request(
                "POST",
                self.url,
                data=self.form(message),
                headers={"Accept": "application/json", "Authorization": self._authorization},
            )
        except Exception as exc:  # noqa: BLE001 - classified: refused/DNS retryable, the rest ambiguous
            return classify_transport_error(exc).result(message.delivery_id)
        if response.status_code in (200, 201):
            try:
                sid = response.json().get("sid")
            except ValueError:
                sid = None
            return Result.sent(message.delivery_id, sid)
        return self.classify(response, [message]).result(message.delivery_id)

    def classify(self, response: requests.Response, messages: Sequence[Message]) -> Verdict:
        """The one place Twilio answers are judged: by error ``code``, then by HTTP status."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("code") if isinstance(body, dict) else None
        text = redact(str(body.get("message") or ""))[:500] if isinstance(body, dict) else ""
        reason = (
            f"Twilio HTTP {response.status_code}"
            + (f" error {code}" if code else "")
            + (f": {text}" if text else "")
        )
        if code == OPTED_OUT:
            effects = tuple(
                Effect(EffectKind.SMS_OPTED_OUT, m.customer_id, m.to.strip(), f"twilio:{OPTED_OUT}")
                for m in messages
            )
            return Verdict(Status.FAILED, reason + " (recipient replied STOP)", effects=effects)
        if code in PERMANENT_CODES:
            return Verdict(Status.FAILED, f"{reason} ({PERMANENT_CODES[code]})")
        if code in AUTH_CODES or response.status_code in (401, 403):
            what = AUTH_CODES.get(code, "authentication failed")
            return Verdict(Status.FAILED, f"{reason} ({what})", halt=True)
        verdict = super().classify(response, messages)
        if code == TOO_MANY_REQUESTS or response.status_code == 429:
            # Documented as never processed: safe to retry.
            return Verdict(Status.RETRYABLE, reason, retry_after=verdict.retry_after, throttled=True)
        if verdict.status is Status.FAILED and 300 <= response.status_code < 400:
            return verdict
        return Verdict(verdict.status, reason, verdict.retry_after, verdict.ambiguous)
