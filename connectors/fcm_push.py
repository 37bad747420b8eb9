"""Push through Firebase Cloud Messaging HTTP v1: ``POST {base}/v1/projects/{project_id}/messages:send``.

Auth: ``Authorization: Bearer <OAuth2 access token>`` for the service account in
``OMNI_FCM_CREDENTIALS_FILE`` (scope ``https://www.googleapis.com/auth/firebase.messaging``): a JWT signed
RS256 with the account's private key is exchanged at the file's ``token_uri`` (the JWT-bearer grant);
the token is cached until a minute before it expires and refreshed once on a 401 ``UNAUTHENTICATED``.
Project ``OMNI_FCM_PROJECT_ID``; base URL ``OMNI_FCM_BASE_URL``.

Body: ``{"message": {"token", "notification": {"title", "body"}, "data": {str: str}, "android":
{"priority": "HIGH"}}}`` with ``data.omni_delivery_id`` carrying the delivery id. Limits: no batch
endpoint in v1, one message per request; payload ≤ 4096 bytes. Success ``200 {"name":
"projects/…/messages/…"}``, the name is the provider id.

Errors are read from ``error.details[].errorCode`` (then ``error.status``):
- ``UNREGISTERED`` (404), ``SENDER_ID_MISMATCH`` (403), ``INVALID_ARGUMENT`` on ``message.token``:
  permanent, with a ``device_token_invalid`` effect (the token is deleted from the profile);
- other ``INVALID_ARGUMENT``, ``THIRD_PARTY_AUTH_ERROR``: permanent;
- ``UNAUTHENTICATED`` (401, still after one token refresh), ``PERMISSION_DENIED`` (403), and a service
  account the token endpoint rejects (``invalid_grant``, 400/401/403): permanent and ``halt``
  (``send_batch`` stops: nothing can be sent with these credentials);
- ``QUOTA_EXCEEDED`` / ``RESOURCE_EXHAUSTED`` (429): retryable, never processed, ``Retry-After`` honoured;
- ``UNAVAILABLE`` (503), ``INTERNAL`` (500), any 5xx, a read timeout or a connection dropped after the
  request was sent: ambiguous (FCM may have delivered it): ``send_batch`` records them ``unknown`` and
  never resends (push is at most once). A failure to get the OAuth token is never ambiguous: the push
  itself was not sent.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from pydantic import SecretStr

from connectors.base import (
    ConnectorConfigError,
    Effect,
    EffectKind,
    Http,
    HttpConnector,
    Message,
    Result,
    Status,
    Verdict,
    classify_status,
    classify_transport_error,
    redact,
    reveal,
)
from omni.core.channels import Channel
from omni.core.settings import Settings

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_ERRORS = {"UNREGISTERED", "SENDER_ID_MISMATCH"}
THROTTLE_ERRORS = {"QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"}
RETRYABLE_ERRORS = {"UNAVAILABLE", "INTERNAL"} | THROTTLE_ERRORS
AUTH_ERRORS = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ServiceAccount:
    """A Google service account read from its JSON key file; mints and caches OAuth2 access tokens."""

    def __init__(
        self,
        info: Mapping[str, Any],
        *,
        http: Http,
        scope: str = SCOPE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for key in ("client_email", "private_key", "token_uri"):
            if not info.get(key):
                raise ConnectorConfigError(f"OMNI_FCM_CREDENTIALS_FILE: the service-account key has no {key}")
        self.client_email = str(info["client_email"])
        self.key_id = info.get("private_key_id")
        self.token_uri = str(info["token_uri"])
        self.private_key = SecretStr(str(info["private_key"]))
        reveal(self.private_key)
        try:
            self._key = serialization.load_pem_private_key(self.private_key.get_secret_value().encode(), None)
        except (ValueError, TypeError):
            raise ConnectorConfigError(
                "OMNI_FCM_CREDENTIALS_FILE: the service-account private_key is not a PEM RSA key"
            ) from None
        self.scope = scope
        self.http = http
        self.clock = clock
        self._token: SecretStr | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> ServiceAccount:
        try:
            info = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConnectorConfigError(f"OMNI_FCM_CREDENTIALS_FILE: {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ConnectorConfigError(
                f"OMNI_FCM_CREDENTIALS_FILE: cannot read {path}: {type(exc).__name__}"
            ) from None
        if not isinstance(info, dict):
            raise ConnectorConfigError(f"OMNI_FCM_CREDENTIALS_FILE: {path} is not a service-account key")
        return cls(info, **kwargs)

    def __repr__(self) -> str:
        return f"ServiceAccount(client_email={self.client_email!r}, private_key='**********')"

    def assertion(self) -> str:
        now = int(self.clock())
        header = {"alg": "RS256", "typ": "JWT", **({"kid": self.key_id} if self.key_id else {})}
        claims = {
            "iss": self.client_email,
            "scope": self.scope,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def token(self, *, refresh: bool = False) -> str:
        """A valid access token. Raises ``requests.RequestException`` or :class:`TokenError`."""
        with self._lock:
            if refresh or self._token is None or self.clock() >= self._expires_at - 60:
                response = self.http.request(
                    "POST", self.token_uri, data={"grant_type": JWT_BEARER, "assertion": self.assertion()}
                )
                if response.status_code != 200:
                    raise TokenError(response)
                body = response.json()
                self._token = SecretStr(str(body["access_token"]))
                reveal(self._token)
                self._expires_at = self.clock() + float(body.get("expires_in") or 3600)
            return self._token.get_secret_value()


class TokenError(Exception):
    def __init__(self, response: requests.Response) -> None:
        super().__init__(f"OAuth token request failed: HTTP {response.status_code}")
        self.response = response


class FcmPush(HttpConnector):
    provider = "fcm_push"
    channel = Channel.PUSH
    max_batch_size = 1
    payload_max_bytes = 4096
    rate_per_second = None
    label = "FCM"

    def __init__(
        self,
        *,
        project_id: str,
        credentials: ServiceAccount | Path | str,
        base_url: str = "https://fcm.googleapis.com",
        timeout: float = 10.0,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.project_id = self.require(project_id, "OMNI_FCM_PROJECT_ID")
        self.base_url = base_url.rstrip("/")
        self.http = Http(timeout=timeout, session=session)
        if isinstance(credentials, ServiceAccount):
            self.credentials = credentials
        else:
            self.credentials = ServiceAccount.from_file(Path(credentials), http=self.http, clock=clock)

    @classmethod
    def from_settings(cls, settings: Settings) -> FcmPush:
        return cls(
            project_id=cls.require(settings.fcm_project_id, "OMNI_FCM_PROJECT_ID"),
            credentials=cls.require(settings.fcm_credentials_file, "OMNI_FCM_CREDENTIALS_FILE"),
            base_url=settings.fcm_base_url,
            timeout=settings.connector_timeout,
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "project_id": self.project_id,
            "client_email": self.credentials.client_email,
            "private_key": self.credentials.private_key,
        }

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/projects/{self.project_id}/messages:send"

    def body(self, message: Message) -> dict[str, Any]:
        data = {str(k): str(v) for k, v in (message.data or {}).items()}
        data["omni_delivery_id"] = message.delivery_id
        notification = {"title": message.title or "", "body": message.text or ""}
        return {
            "message": {
                "token": message.to,
                "notification": notification,
                "data": data,
                "android": {"priority": "HIGH"},
            }
        }

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        return [self._send_one(message) for message in batch]

    def _send_one(self, message: Message) -> Result:
        body = self.body(message)
        raw = json.dumps(body, separators=(",", ":")).encode()
        if len(raw) > self.payload_max_bytes + 200:  # the envelope around the FCM payload is ~100 bytes
            return Result.failed(message.delivery_id, f"push payload of {len(raw)} bytes is too large")
        response = None
        for attempt in (1, 2):
            try:
                token = self.credentials.token(refresh=attempt == 2)
            except TokenError as exc:
                return self._token_failure(exc).result(message.delivery_id)
            except Exception as exc:  # noqa: BLE001 - the push itself was not sent: never ambiguous
                verdict = classify_transport_error(exc)
                return Verdict(Status.RETRYABLE, f"FCM OAuth token request: {verdict.reason}").result(
                    message.delivery_id
                )
            try:
                response = self.http.request(
                    "POST",
                    self.url,
                    data=raw,
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
            except Exception as exc:  # noqa: BLE001 - classified: refused/DNS retryable, the rest ambiguous
                verdict = classify_transport_error(exc)
                return verdict.replace(reason=f"FCM {verdict.reason}").result(message.delivery_id)
            # OAuth 401 UNAUTHENTICATED (not processed): refresh the token and retry once.
            if response.status_code != 401 or _status_of(response) != "UNAUTHENTICATED":
                break
        assert response is not None
        if response.status_code == 200:
            try:
                name = response.json().get("name")
            except (ValueError, AttributeError):
                name = None
            return Result.sent(message.delivery_id, name)
        return self.classify(response, [message]).result(message.delivery_id)

    def _token_failure(self, exc: TokenError) -> Verdict:
        """The token endpoint's answer: the push was not sent, so never ambiguous. A rejected service
        account (400 ``invalid_grant``, 401, 403) halts: nothing can be sent with it."""
        status = exc.response.status_code
        try:
            body = exc.response.json()
        except ValueError:
            body = {}
        error = body.get("error") if isinstance(body, dict) else None
        detail = f" {error}" if isinstance(error, str) else ""
        reason = f"FCM {exc}{detail}"
        if status in (400, 401, 403):
            return Verdict(
                Status.FAILED, f"{reason} (the service-account credentials were rejected)", halt=True
            )
        verdict = classify_status(status, exc.response.headers)
        if verdict.status is Status.RETRYABLE:
            return Verdict(Status.RETRYABLE, reason, verdict.retry_after, throttled=verdict.throttled)
        return Verdict(verdict.status, reason)

    def classify(self, response: requests.Response, messages: Sequence[Message]) -> Verdict:
        """The one place FCM answers are judged: ``details[].errorCode``, then ``status``, then HTTP."""
        try:
            error = response.json().get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        error = error if isinstance(error, dict) else {}
        details = error.get("details") if isinstance(error.get("details"), list) else []
        code = None
        token_field = False
        for detail in details:
            if not isinstance(detail, dict):
                continue
            code = code or detail.get("errorCode")
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    token_field = True
        code = code or error.get("status")
        text = redact(str(error.get("message") or ""))[:500]
        reason = f"FCM HTTP {response.status_code} {code or ''}".rstrip() + (f": {text}" if text else "")
        if code in TOKEN_ERRORS or (code == "INVALID_ARGUMENT" and token_field):
            effects = tuple(
                Effect(EffectKind.DEVICE_TOKEN_INVALID, m.customer_id, m.to, f"fcm:{code}") for m in messages
            )
            return Verdict(Status.FAILED, reason, effects=effects)
        verdict = super().classify(response, messages)
        if 300 <= response.status_code < 400:
            return verdict
        if code in AUTH_ERRORS or (code is None and response.status_code in (401, 403)):
            return Verdict(Status.FAILED, f"{reason} (the credentials cannot send)", halt=True)
        if code in THROTTLE_ERRORS or response.status_code == 429:
            # Quota exceeded: documented as not processed, safe to retry.
            return Verdict(Status.RETRYABLE, reason, verdict.retry_after, throttled=True)
        if code in RETRYABLE_ERRORS or verdict.status is Status.RETRYABLE:
            # UNAVAILABLE / INTERNAL / any 5xx: the request was sent and may have been delivered.
            return Verdict(
                Status.RETRYABLE,
                reason,
                verdict.retry_after,
                ambiguous=response.status_code >= 500 or code in {"UNAVAILABLE", "INTERNAL"},
            )
        return Verdict(Status.FAILED, reason)


def _status_of(response: requests.Response) -> str | None:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return None
    return error.get("status") if isinstance(error, dict) else None
