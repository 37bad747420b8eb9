"""Email through SendGrid v3 Mail Send (``POST {host}/v3/mail/send``) over the shared HTTP session.

Auth: ``Authorization: Bearer <OMNI_SENDGRID_API_KEY>``. Host: ``OMNI_SENDGRID_BASE_URL`` (default
``https://api.sendgrid.com``; EU subusers ``https://api.eu.sendgrid.com``; tests a local fake server).

Limits: up to 1000 personalizations and 1000 recipients per request, an address at most once per request,
``custom_args`` ≤ 10,000 bytes, ≤ 10 categories of ≤ 255 chars. Success is ``202`` (``200`` in sandbox
mode) with ``X-Message-Id``, kept as the provider id of every message of the request (Event Webhook
``sg_message_id`` values start with it; ``custom_args.omni_delivery_id`` tells the messages apart).

Batching: every customer's email is rendered for them, but ``content`` is per request. So each message's
parts travel as personalization ``substitutions`` (``-omni_text-`` / ``-omni_html-`` in a shared
``content``) when they fit the substitution size limit (10,000 bytes per personalization, the
conservative figure from SendGrid's docs); larger messages share a request only with messages of
identical content. Subject, RFC 8058 one-click ``List-Unsubscribe`` / ``List-Unsubscribe-Post``
headers and ``custom_args`` are per personalization. Optional unsubscribe group (``asm``) and sandbox
mode (``OMNI_SENDGRID_SANDBOX``: validate only).

Transport: the shared :class:`~connectors.base.Http` session (``requests``, keep-alive), not the
``sendgrid`` SDK: its ``python_http_client`` sends through ``urllib``, whose default opener follows a
302 to another host with the ``Authorization: Bearer`` header. Here a 3xx is never followed: it is a
permanent failure naming the base URL to fix.

Errors: 429 retryable (``Retry-After`` or ``X-RateLimit-Reset`` honoured: never processed); 401 / 403
permanent and ``halt`` (a revoked key or a missing ``mail.send`` scope: ``send_batch`` stops at once
and the rest of the batch is not attempted); 5xx, read timeouts and a connection dropped after the
request was sent are ambiguous (SendGrid may have queued the mail): ``send_batch`` records them
``unknown`` and never resends (email is at most once). Connection refused, DNS failures and connect
timeouts are retryable (nothing was sent). Other 4xx are permanent. A 400 naming ``personalizations.N``
fails only message N; the others of that request are returned retryable at once (SendGrid rejected the
whole request, nothing was sent).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from email.utils import parseaddr
from typing import Any

import requests
from pydantic import SecretStr

from connectors.base import (
    Http,
    HttpConnector,
    Message,
    Result,
    Status,
    Verdict,
    classify_transport_error,
    redact,
    reveal,
)
from omni.core.channels import Channel
from omni.core.settings import Settings

TEXT_TAG = "-omni_text-"
HTML_TAG = "-omni_html-"
_PERSONALIZATION_FIELD = re.compile(r"personalizations\.(\d+)")


class SendGridEmail(HttpConnector):
    provider = "sendgrid"
    channel = Channel.EMAIL
    max_batch_size = 1000
    max_recipients_per_request = 1000
    substitution_max_bytes = 10_000
    max_categories = 10
    category_max_chars = 255
    rate_per_second = None
    secret_settings = ("sendgrid_api_key",)
    label = "SendGrid"

    def __init__(
        self,
        *,
        api_key: SecretStr | str,
        email_from: str,
        base_url: str = "https://api.sendgrid.com",
        sandbox: bool = False,
        asm_group_id: int | None = None,
        reply_to: str | None = None,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self.require(self.api_key, "OMNI_SENDGRID_API_KEY")
        name, address = parseaddr(email_from)
        if not address or "@" not in address:
            raise ValueError(f"OMNI_EMAIL_FROM {email_from!r} is not an email address")
        self.sender = {"email": address, **({"name": name} if name else {})}
        self.base_url = base_url.rstrip("/")
        self.sandbox = sandbox
        self.asm_group_id = asm_group_id
        self.reply_to = reply_to
        self.timeout = timeout
        self.http = Http(timeout=timeout, session=session)
        reveal(self.api_key)  # registered for redaction (with its encoded forms) before any request

    @classmethod
    def from_settings(cls, settings: Settings) -> SendGridEmail:
        return cls(
            api_key=cls.require(settings.sendgrid_api_key, "OMNI_SENDGRID_API_KEY"),
            email_from=settings.email_from,
            base_url=settings.sendgrid_base_url,
            sandbox=settings.sendgrid_sandbox,
            asm_group_id=settings.sendgrid_asm_group_id,
            reply_to=settings.email_reply_to,
            timeout=settings.connector_timeout,
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_key": self.api_key,
            "sender": self.sender["email"],
            "sandbox": self.sandbox,
        }

    # --- building requests ----------------------------------------------------------------------------

    def _fits_substitutions(self, message: Message) -> bool:
        size = len((message.text or "").encode()) + len((message.html or "").encode())
        return size <= self.substitution_max_bytes

    def _categories(self, message: Message) -> list[str]:
        unique = list(dict.fromkeys(c[: self.category_max_chars] for c in message.categories if c))
        return unique[: self.max_categories]

    def plan(self, batch: Sequence[Message]) -> list[list[Message]]:
        """Group a batch into requests: same categories and parts; substitutable or identical content;
        ≤ 1000 personalizations; each address once per request."""
        groups: dict[tuple, list[tuple[list[Message], set[str]]]] = {}
        for message in batch:
            parts = (message.text is not None, message.html is not None)
            if self._fits_substitutions(message):
                key: tuple = ("sub", tuple(self._categories(message)), parts)
            else:
                key = ("raw", tuple(self._categories(message)), message.text, message.html)
            requests_ = groups.setdefault(key, [])
            address = message.to.strip().lower()
            for members, addresses in requests_:
                if len(members) < self.max_recipients_per_request and address not in addresses:
                    members.append(message)
                    addresses.add(address)
                    break
            else:
                requests_.append(([message], {address}))
        return [members for requests_ in groups.values() for members, _ in requests_]

    def build_body(self, messages: Sequence[Message]) -> dict[str, Any]:
        """The Mail Send JSON body for one request (every message shares categories and parts)."""
        first = messages[0]
        substitute = len(messages) > 1 and self._fits_substitutions(first)
        personalizations = []
        for message in messages:
            personalization: dict[str, Any] = {
                "to": [{"email": message.to}],
                "custom_args": {"omni_delivery_id": message.delivery_id},
            }
            if message.subject is not None:
                personalization["subject"] = message.subject
            if message.unsubscribe_url:
                personalization["headers"] = {
                    "List-Unsubscribe": f"<{message.unsubscribe_url}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                }
            if substitute:
                substitutions = {}
                if message.text is not None:
                    substitutions[TEXT_TAG] = message.text
                if message.html is not None:
                    substitutions[HTML_TAG] = message.html
                personalization["substitutions"] = substitutions
            personalizations.append(personalization)
        content = []
        # text/plain must come before text/html.
        if first.text is not None:
            content.append({"type": "text/plain", "value": TEXT_TAG if substitute else first.text})
        if first.html is not None:
            content.append({"type": "text/html", "value": HTML_TAG if substitute else first.html})
        body: dict[str, Any] = {"personalizations": personalizations, "from": self.sender, "content": content}
        if self.reply_to:
            body["reply_to"] = {"email": self.reply_to}
        categories = self._categories(first)
        if categories:
            body["categories"] = categories
        if self.asm_group_id is not None:
            body["asm"] = {"group_id": self.asm_group_id, "groups_to_display": [self.asm_group_id]}
        body["mail_settings"] = {"sandbox_mode": {"enable": self.sandbox}}
        return body

    # --- sending --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.base_url}/v3/mail/send"

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        results: dict[str, Result] = {}
        halted: str | None = None
        for request in self.plan(batch):
            if halted is not None:
                # The key cannot send: the other requests of the batch are not attempted.
                for m in request:
                    results[m.delivery_id] = Result.retryable(m.delivery_id, halted, halt=True)
                continue
            for result in self._send_request(request):
                results[result.delivery_id] = result
                if result.halt and halted is None:
                    halted = result.reason or "SendGrid cannot send"
        return [results[m.delivery_id] for m in batch]

    def _send_request(self, messages: Sequence[Message]) -> list[Result]:
        for message in messages:
            if not message.subject:
                return [Result.failed(m.delivery_id, "email without a subject") for m in messages]
        body = json.dumps(self.build_body(messages), separators=(",", ":")).encode()
        try:
            response = self.http.request(
                "POST",
                self.url,
                data=body,
                headers={
                    "Authorization": f"Bearer {reveal(self.api_key)}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                },
            )
        except Exception as exc:  # noqa: BLE001 - classified: refused/DNS retryable, the rest ambiguous
            verdict = classify_transport_error(exc)
            verdict = verdict.replace(reason=f"SendGrid {verdict.reason}")
            return [verdict.result(m.delivery_id) for m in messages]
        if 200 <= response.status_code < 300:
            provider_id = response.headers.get("X-Message-Id")
            return [
                Result.sent(m.delivery_id, provider_id, status_code=response.status_code) for m in messages
            ]
        return self._error_results(messages, response)

    def classify(self, response: requests.Response, messages: Sequence[Message]) -> Verdict:
        """The one place SendGrid answers are judged: HTTP status, then the documented error body."""
        verdict = super().classify(response, messages)
        status = response.status_code
        if 300 <= status < 400:
            return verdict
        detail = _error_text(response.content)
        reason = f"SendGrid HTTP {status}" + (f": {detail}" if detail else "")
        return verdict.replace(reason=redact(reason))

    def _error_results(self, messages: Sequence[Message], response: requests.Response) -> list[Result]:
        verdict = self.classify(response, messages)
        if verdict.status is Status.FAILED and response.status_code == 400 and len(messages) > 1:
            culprits = _personalization_indexes(response.content, len(messages))
            if culprits:
                return [
                    verdict.result(m.delivery_id)
                    if i in culprits
                    else Result.retryable(
                        m.delivery_id, "request rejected for another message", retry_after=0
                    )
                    for i, m in enumerate(messages)
                ]
        return [verdict.result(m.delivery_id) for m in messages]


def _error_body(body: bytes | str | None) -> dict:
    if not body:
        return {}
    try:
        value = json.loads(body)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _error_text(body: bytes | str | None) -> str:
    errors = _error_body(body).get("errors") or []
    parts = []
    for error in errors[:3] if isinstance(errors, list) else []:
        if isinstance(error, dict):
            field = error.get("field")
            parts.append(f"{error.get('message')}" + (f" ({field})" if field else ""))
    return "; ".join(parts)


def _personalization_indexes(body: bytes | str | None, count: int) -> set[int]:
    found: set[int] = set()
    errors = _error_body(body).get("errors")
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        match = _PERSONALIZATION_FIELD.match(str(error.get("field") or ""))
        if match and int(match.group(1)) < count:
            found.add(int(match.group(1)))
    return found
