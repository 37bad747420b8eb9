"""Provider feedback webhooks: SendGrid's Event Webhook and Twilio's status and inbound callbacks.

- ``POST /webhooks/sendgrid``: SendGrid's signed Event Webhook (a JSON array of events). The signature
  (``X-Twilio-Email-Event-Webhook-Signature``: ECDSA P-256 / SHA-256 over the
  ``X-Twilio-Email-Event-Webhook-Timestamp`` value followed by the raw body) is checked with the
  official ``sendgrid`` package's helper (``sendgrid.helpers.eventwebhook.EventWebhook``) against
  ``OMNI_SENDGRID_WEBHOOK_PUBLIC_KEY``, before the body is parsed; a timestamp more than
  ``OMNI_WEBHOOK_MAX_AGE_SECONDS`` from now is refused (a replay).
- ``POST /webhooks/twilio/status`` and ``POST /webhooks/twilio/inbound``: ``X-Twilio-Signature`` is
  base64(HMAC-SHA1(``OMNI_TWILIO_AUTH_TOKEN``, URL + each POST parameter name and value sorted by
  name)), the URL being the one Twilio called: ``OMNI_PUBLIC_URL`` + the request's path and query when
  set (behind a proxy), else the request's own URL. As Twilio's own validator, the URL is also tried
  with the default port added or removed. A status callback URL may carry ``?delivery_id=`` (signed
  with the rest). Both answer empty TwiML, so Twilio sends no reply.

A missing or bad signature, or a stale timestamp, gets 403 and changes nothing; a webhook whose key is
not configured answers 503 (so the provider retries once it is). What each event changes is
:mod:`profiles.feedback`'s; each post is applied in one transaction and each event once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sendgrid.helpers.eventwebhook import EventWebhook
from sendgrid.helpers.eventwebhook.eventwebhook_header import EventWebhookHeader

from omni.core.settings import Settings
from omni.server.deps import app_settings, now_of, store_engine
from profiles.db import session_scope
from profiles.feedback import apply_sendgrid_events, apply_twilio_inbound, apply_twilio_status

log = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

MAX_BODY_BYTES = 20 * 1024 * 1024  # SendGrid batches events; far below this in practice
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
TWILIO_SIGNATURE = "X-Twilio-Signature"
DEFAULT_PORTS = {"https": 443, "http": 80}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _refusal(exc: Refused) -> Response:
    return PlainTextResponse(exc.reason + "\n", status_code=exc.status)


async def _body(request: Request) -> bytes:
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise Refused(413, "body too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, "body too large")
    return bytes(body)


# --- SendGrid -------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def sendgrid_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The console's verification key (base64 of the DER SubjectPublicKeyInfo) as an EC P-256 key;
    ValueError when it is not one."""
    text = "".join(value.split())
    if text.startswith("-----BEGIN"):  # a PEM pasted whole
        text = "".join(line for line in value.strip().splitlines() if not line.startswith("-----"))
    try:
        key = EventWebhook().convert_public_key_to_ecdsa(text)
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, the setting is wrong
        raise ValueError(f"not a base64 DER public key ({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key")
    return key


def verify_sendgrid(
    settings: Settings, body: bytes, signature: str | None, timestamp: str | None, *, now: datetime
) -> None:
    """Raise :class:`Refused` unless the post is signed by the configured key within the time window."""
    configured = settings.sendgrid_webhook_public_key
    if configured is None or not configured.get_secret_value().strip():
        raise Refused(503, "OMNI_SENDGRID_WEBHOOK_PUBLIC_KEY is not set")
    try:
        key = sendgrid_public_key(configured.get_secret_value())
    except ValueError as exc:
        log.error("OMNI_SENDGRID_WEBHOOK_PUBLIC_KEY is not usable: %s", exc)
        raise Refused(503, "OMNI_SENDGRID_WEBHOOK_PUBLIC_KEY is not usable") from None
    if not signature or not timestamp:
        raise Refused(403, "missing signature")
    timestamp = timestamp.strip()
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise Refused(403, "bad timestamp")
    if abs(now.timestamp() - int(timestamp)) > settings.webhook_max_age_seconds:
        raise Refused(403, "stale timestamp")
    try:
        base64.b64decode(signature.strip(), validate=True)
        payload = body.decode("utf-8")  # the helper signs text: (timestamp + payload).encode("utf-8")
        valid = EventWebhook().verify_signature(payload, signature.strip(), timestamp, public_key=key)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        valid = False
    if not valid:
        raise Refused(403, "bad signature")


@router.post("/sendgrid", include_in_schema=False)
async def sendgrid_events(request: Request) -> Response:
    settings, engine, now = app_settings(request), store_engine(request), now_of(request)
    try:
        body = await _body(request)
        verify_sendgrid(
            settings,
            body,
            request.headers.get(EventWebhookHeader.SIGNATURE),
            request.headers.get(EventWebhookHeader.TIMESTAMP),
            now=now,
        )
        try:
            events = json.loads(body)
        except ValueError:
            raise Refused(400, "body is not JSON") from None
        if not isinstance(events, list):
            raise Refused(400, "body is not a JSON array of events")
    except Refused as exc:
        return _refusal(exc)

    def apply() -> dict[str, Any]:
        with session_scope(engine) as session:
            report = apply_sendgrid_events(session, events, now=now)
        return {"received": len(events), "duplicates": report.duplicates, "outcomes": report.outcomes}

    return JSONResponse(await run_in_threadpool(apply))


# --- Twilio ---------------------------------------------------------------------------------------------


def twilio_signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """Twilio's ``X-Twilio-Signature`` of a form POST to ``url`` (as its ``RequestValidator``: names
    sorted, each name's distinct values sorted)."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(values) for value in sorted(values[name]))
    digest = hmac.new(auth_token.encode(), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_url(request: Request, settings: Settings) -> str:
    """The URL Twilio called: ``OMNI_PUBLIC_URL`` + path and query behind a proxy, else the request's."""
    if settings.public_url:
        query = request.url.query
        return settings.public_url.rstrip("/") + request.url.path + (f"?{query}" if query else "")
    return str(request.url)


def _port_variants(url: str) -> list[str]:
    """``url`` and the same with the scheme's default port added or removed (Twilio signs either)."""
    parts = urlsplit(url)
    default = DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.hostname is None:
        return [url]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None:
        other = parts._replace(netloc=f"{prefix}{host}:{default}")
    elif parts.port == default:
        other = parts._replace(netloc=f"{prefix}{host}")
    else:
        return [url]
    return [url, urlunsplit(other)]


def verify_twilio(settings: Settings, request: Request, params: list[tuple[str, str]]) -> None:
    token = settings.twilio_auth_token
    if token is None or not token.get_secret_value():
        raise Refused(503, "OMNI_TWILIO_AUTH_TOKEN is not set")
    signature = (request.headers.get(TWILIO_SIGNATURE) or "").strip()
    if not signature:
        raise Refused(403, "missing signature")
    for url in _port_variants(twilio_url(request, settings)):
        expected = twilio_signature(token.get_secret_value(), url, params)
        if hmac.compare_digest(expected.encode(), signature.encode()):
            return
    raise Refused(403, "bad signature")


async def _twilio_params(request: Request, settings: Settings) -> list[tuple[str, str]]:
    body = await _body(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and content_type != "application/x-www-form-urlencoded":
        raise Refused(415, "expected application/x-www-form-urlencoded")
    try:
        params = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "body is not a form") from None
    verify_twilio(settings, request, params)
    return params


def _twiml() -> Response:
    return Response(TWIML_EMPTY, media_type="text/xml")


@router.post("/twilio/status", include_in_schema=False)
async def twilio_status(request: Request) -> Response:
    settings, engine, now = app_settings(request), store_engine(request), now_of(request)
    try:
        params = dict(await _twilio_params(request, settings))
    except Refused as exc:
        return _refusal(exc)
    delivery_id = request.query_params.get("delivery_id")

    def apply() -> None:
        with session_scope(engine) as session:
            apply_twilio_status(
                session,
                params,
                now=now,
                delivery_id=delivery_id,
                default_region=settings.default_phone_region,
            )

    await run_in_threadpool(apply)
    return _twiml()


@router.post("/twilio/inbound", include_in_schema=False)
async def twilio_inbound(request: Request) -> Response:
    settings, engine, now = app_settings(request), store_engine(request), now_of(request)
    try:
        params = dict(await _twilio_params(request, settings))
    except Refused as exc:
        return _refusal(exc)

    def apply() -> None:
        with session_scope(engine) as session:
            apply_twilio_inbound(session, params, now=now, default_region=settings.default_phone_region)

    await run_in_threadpool(apply)
    return _twiml()
