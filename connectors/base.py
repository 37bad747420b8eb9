"""The connector interface, the one shared HTTP / classification layer and the one retry policy.

Every message Omni sends leaves through a :class:`Connector`. A connector is one class in one module
(``connectors/<provider>.py``); what a flow needs to know about it is a class attribute:

- ``provider`` (registry key, equal to the module name), ``channel`` (its main channel) and
  ``channels`` (every channel it can serve: the outbox and webhook connectors serve all of them);
- ``max_batch_size`` (messages per provider request: 1000 SendGrid personalizations, 10,000 Meta rows,
  1 for Twilio, FCM and webhooks) and ``rate_per_second`` (``None``: no client-side throttle);
- ``secret_settings``: the credential settings it reads (resolved before it is built, see below).

Interface for the sequence engine:

- ``connectors.get_connector(channel, settings, *, outbox=None) -> Connector`` builds the configured
  connector; a misconfigured one raises :class:`ConnectorConfigError` naming the missing setting
  (``OMNI_SENDGRID_API_KEY`` ...) at construction, never half-way through a batch.
- ``connector.send(batch: Sequence[Message]) -> list[Result]``: one request (or one per message where the
  API has no batch endpoint), one :class:`Result` per message in order: ``sent`` + ``provider_id``,
  ``retryable`` + ``retry_after`` seconds (``ambiguous`` when the provider may have processed it), or
  ``failed`` + ``reason`` (``halt`` when the credential cannot send). A connector never retries and
  never raises for a provider's answer (callers use :func:`send_batch`, which applies the channel
  rule); it raises only for programming errors (a batch bigger than ``max_batch_size``, a message for a
  channel it does not serve). Its ``classify`` method is the one place its provider's answers are
  judged (:meth:`HttpConnector.classify`, by HTTP status, unless the provider overrides it).
- :func:`send_batch` (``connectors.send_batch``) is the one retry policy (:class:`RetryPolicy`, run by
  tenacity): it splits a batch at ``max_batch_size``, throttles to ``rate_per_second``, retries short
  throttles in the call (a 429 with ``Retry-After: 2``, a passing 503) with exponential backoff, full
  jitter and at most ``RetryPolicy.attempts_per_send`` tries, and returns a :class:`SendReport` whose
  still-``retryable`` results carry the delay to wait before a later tick. (Delivery attempts across
  ticks are the engine's: ``Settings.delivery_attempts``.)
- Delivery semantics are the channel's (``omni.core.channels``: ``spec(channel).at_least_once``,
  ``at_most_once(channel)``). For email, SMS and push (at most once) ``send_batch`` never resends a
  request the provider may have processed (5xx, read timeout, connection dropped after sending, an
  unexpected exception): it returns ``Status.UNKNOWN`` with the reason. Only answers proving nothing
  was processed are retried (429 / Twilio 20429 / FCM ``QUOTA_EXCEEDED``, 408, connection refused, DNS
  failure, connect timeout). Ads and webhooks (at least once) retry ambiguous answers too. No
  ``RetryPolicy`` setting can override this.
- ``SendReport.halted`` is set when the connector cannot send at all (401 / 403, Twilio 20003, FCM
  ``UNAUTHENTICATED`` / ``PERMISSION_DENIED``, Meta 190; or the provider unreachable through all the
  in-call retries): sending stops at once and every message not accepted comes back ``retryable`` with
  ``reason == halted``. The caller fails its task with that reason and leaves those messages due.
- Provider side effects (Twilio 21610 → SMS opt-out; FCM ``UNREGISTERED`` → device token removed) are
  :class:`Effect` values on the results; ``sequences.effects.apply_effects(session, results, now=...)``
  writes them to the store. Connectors never touch the database: the outbox, whose job is to record,
  is handed a writer (``connectors.outbox.OutboxWriter``).

Settings are an ``omni.core.settings.Settings`` whose credentials were resolved before (the flows and
the CLI call ``flows.secrets.resolve_secrets``: the environment, else a Prefect Secret block); a
connector reads only what it is given. Secrets are ``SecretStr`` attributes: ``repr()`` masks them.
:func:`reveal` / :func:`register_secret` register a secret with its encoded forms (URL-encoded,
JSON-escaped, base64) and :func:`register_basic_auth` the ``base64(user:secret)`` of every Basic
credential a connector builds; :func:`redact` masks all of them. Every ``Result`` / ``Verdict`` reason
is redacted on construction, and every log record is scrubbed (a log-record factory plus
:class:`SecretRedactingFilter`). No connector follows a redirect (``Http`` forces
``allow_redirects=False``; a 3xx is a permanent failure).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote, quote_plus

import requests
from pydantic import SecretStr
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt, stop_any

from omni.core.batching import chunked
from omni.core.channels import at_most_once
from omni.core.settings import Settings, secret_block_name

log = logging.getLogger(__name__)

MASK = "**********"


class Status(StrEnum):
    SENT = "sent"
    RETRYABLE = "retryable"
    FAILED = "failed"
    # The provider may have processed it (a 5xx, a read timeout, a dropped connection after the request
    # was sent): never resend. Only at-most-once channels (email, SMS, push) end here.
    UNKNOWN = "unknown"


class ConnectorConfigError(ValueError):
    """A connector cannot be built from the settings; the message names the missing setting."""


@dataclass(frozen=True, slots=True)
class AudienceMember:
    """Identifiers of one customer for an ad audience; connectors normalise and hash them."""

    customer_id: int | None = None
    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    country: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """One message to one recipient, exactly as it should go out.

    Args:
        delivery_id: Omni's idempotency key for this message (the delivery's dedupe key); carried to the
            provider (SendGrid ``custom_args``, FCM ``data``, webhook header) so events can be matched.
        channel: ``email``, ``sms``, ``push``, ``ads`` or ``webhook``.
        to: email address, E.164 phone number or device token; for ``ads`` the audience name or id.
        subject, html, text: email parts (``text`` is also the SMS body and the push body).
        title: push title.
        data: push data (string values) or the webhook's JSON payload.
        unsubscribe_url: signed one-click unsubscribe URL (email headers, RFC 8058).
        categories: provider categories / tags (SendGrid ``categories``), e.g. the template name.
        action / member: ``ads`` only: ``add`` or ``remove`` this customer.
    """

    delivery_id: str
    channel: str
    to: str
    customer_id: int | None = None
    template: str | None = None
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    title: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    unsubscribe_url: str | None = None
    categories: tuple[str, ...] = ()
    action: str | None = None
    member: AudienceMember | None = None


class EffectKind(StrEnum):
    SMS_OPTED_OUT = "sms_opted_out"  # the customer replied STOP (value: the phone)
    DEVICE_TOKEN_INVALID = "device_token_invalid"  # the push token is gone (value: the token)


@dataclass(frozen=True, slots=True)
class Effect:
    """Something the provider told us about the recipient that the profile store must learn
    (``sequences.effects.apply_effects`` writes it)."""

    kind: EffectKind
    customer_id: int | None
    value: str
    source: str


@dataclass(frozen=True, slots=True)
class Result:
    """One message's outcome. ``reason`` is always redacted (see :func:`redact`) on construction.

    Flags a connector sets from the provider's answer (:func:`send_batch` acts on them):

    - ``ambiguous``: the request may have reached the provider (read timeout, 5xx, dropped connection):
      a retry may duplicate. For at-most-once channels ``send_batch`` turns it into ``Status.UNKNOWN``.
    - ``halt``: the answer means the connector cannot send anything at all (401/403, a revoked or invalid
      credential): ``send_batch`` stops and reports ``SendReport.halted``.
    - ``throttled``: the provider is up and asked us to slow down (429, Twilio 20429, FCM
      ``QUOTA_EXCEEDED``, Meta rate-limit codes): never counted as the provider being down.
    """

    delivery_id: str
    status: Status
    provider_id: str | None = None
    retry_after: float | None = None
    reason: str | None = None
    # True when the request may have reached the provider (read timeout, 5xx): a retry may duplicate.
    ambiguous: bool = False
    effects: tuple[Effect, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)
    halt: bool = False
    throttled: bool = False

    def __post_init__(self) -> None:
        if self.reason:
            object.__setattr__(self, "reason", redact(str(self.reason)))

    @classmethod
    def sent(cls, delivery_id: str, provider_id: str | None, **info: Any) -> Result:
        return cls(delivery_id, Status.SENT, provider_id=provider_id, info=info)

    @classmethod
    def retryable(
        cls,
        delivery_id: str,
        reason: str,
        *,
        retry_after: float | None = None,
        ambiguous: bool = False,
        halt: bool = False,
        throttled: bool = False,
    ) -> Result:
        return cls(
            delivery_id,
            Status.RETRYABLE,
            retry_after=retry_after,
            reason=reason,
            ambiguous=ambiguous,
            halt=halt,
            throttled=throttled,
        )

    @classmethod
    def failed(
        cls, delivery_id: str, reason: str, *, effects: Iterable[Effect] = (), halt: bool = False
    ) -> Result:
        return cls(delivery_id, Status.FAILED, reason=reason, effects=tuple(effects), halt=halt)

    @classmethod
    def unknown(cls, delivery_id: str, reason: str) -> Result:
        """The provider may have processed it: recorded as such, never resent."""
        return cls(delivery_id, Status.UNKNOWN, reason=reason, ambiguous=True)

    def replace(self, **changes: Any) -> Result:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one provider answer is classified (the input to a per-message :class:`Result`)."""

    status: Status
    reason: str
    retry_after: float | None = None
    ambiguous: bool = False
    effects: tuple[Effect, ...] = ()
    halt: bool = False
    throttled: bool = False

    def __post_init__(self) -> None:
        if self.reason:
            object.__setattr__(self, "reason", redact(str(self.reason)))

    def result(self, delivery_id: str) -> Result:
        return Result(
            delivery_id,
            self.status,
            retry_after=self.retry_after,
            reason=self.reason,
            ambiguous=self.ambiguous,
            effects=self.effects,
            halt=self.halt,
            throttled=self.throttled,
        )

    def replace(self, **changes: Any) -> Verdict:
        return dataclasses.replace(self, **changes)


# --- secrets in logs, reasons, outputs ----------------------------------------------------------------


_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_forms(secret: str) -> set[str]:
    """``secret`` and the encoded forms it can take on the wire or in a provider's echo of a request:
    URL-encoded (``quote`` / ``quote_plus``, upper- and lower-case escapes), JSON-escaped (ASCII and not,
    ``\\/`` too) and base64 (standard and URL-safe, with and without padding)."""
    forms = {secret}
    for quoted in (quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret), quote_plus(secret)):
        forms.add(quoted)
        forms.add(_PERCENT.sub(lambda m: m.group().lower(), quoted))
    for escaped in (json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]):
        forms.add(escaped)
        forms.add(escaped.replace("/", "\\/"))
    raw = secret.encode("utf-8", "surrogatepass")
    for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms.add(encoded)
        forms.add(encoded.rstrip("="))
    return {form for form in forms if form}


class SecretRedactingFilter(logging.Filter):
    """Replaces every registered secret (and its encoded forms) in a log record's text with a mask.

    Installed on the loggers of the HTTP libraries connectors use, and (through a log-record factory) on
    every log record created in the process once a secret is registered.
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._ordered: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._ordered)

    def add(self, secret: str, *, derived: bool = True) -> None:
        """Register ``secret`` and, unless ``derived=False``, its encoded forms (:func:`secret_forms`)."""
        if not isinstance(secret, str) or len(secret) < 4:
            return
        forms = secret_forms(secret) if derived else {secret}
        with self._lock:
            if forms <= self._secrets:
                return
            self._secrets.update(f for f in forms if len(f) >= 4)
            # Longest first: a secret that contains another is masked whole.
            self._ordered = tuple(sorted(self._secrets, key=len, reverse=True))

    def redact(self, text: str) -> str:
        for secret in self._ordered:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        _redact_record(record)
        return True


SECRETS = SecretRedactingFilter()
for _name in ("urllib3.connectionpool", "requests", "connectors", __name__):
    logging.getLogger(_name).addFilter(SECRETS)


def _redact_record(record: logging.LogRecord) -> None:
    if not SECRETS:
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record is not ours to fix
        return
    redacted = SECRETS.redact(message)
    if redacted != message:
        record.msg, record.args = redacted, None


_previous_factory = logging.getLogRecordFactory()


def _redacting_record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    _redact_record(record)
    return record


if not getattr(_previous_factory, "_omni_redacting", False):
    _redacting_record_factory._omni_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(_redacting_record_factory)


def redact(text: str) -> str:
    """``text`` with every secret a connector registered, in every encoded form, masked (for reasons,
    log lines, CLI output, error columns and artifacts)."""
    return SECRETS.redact(text) if text else text


def register_secret(value: str | SecretStr | None) -> None:
    """Register a secret (and its URL-encoded, JSON-escaped and base64 forms) for redaction."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value:
        SECRETS.add(value)


def register_basic_auth(user: str, secret: str | SecretStr) -> str:
    """Register the HTTP Basic credential ``base64(user:secret)`` (every encoded form of it, and of the
    secret alone) for redaction; returns the ``Authorization`` header value. Every connector that builds
    Basic auth calls this, so a provider echoing the header back cannot leak it."""
    value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    register_secret(value)
    token = base64.b64encode(f"{user}:{value}".encode()).decode()
    SECRETS.add(token)
    SECRETS.add(f"{user}:{value}")
    return f"Basic {token}"


def reveal(secret: SecretStr | None) -> str:
    """The value of a secret, registered for redaction first (with its encoded forms). Use only where
    the provider needs it."""
    value = secret.get_secret_value() if secret is not None else ""
    register_secret(value)
    return value


# --- the shared HTTP layer ----------------------------------------------------------------------------


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``X-RateLimit-Reset``.

    ``X-RateLimit-Reset`` is an epoch second on SendGrid and a number of seconds on others: a value
    above 10^9 is read as an epoch.
    """
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    now = time.time() if now is None else now
    value = lower.get("retry-after")
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    value = lower.get("x-ratelimit-reset")
    if value:
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return max(0.0, number - now) if number > 1e9 else max(0.0, number)
    return None


AUTH_STATUSES = frozenset({401, 403})
THROTTLE_STATUSES = frozenset({429})
# Answers that prove the request was not processed (the client may send it again).
NOT_PROCESSED_STATUSES = frozenset({408, 425, 429})


def classify_status(status: int, headers: Mapping[str, str] | None = None, *, now: float | None = None):
    """The default verdict on an HTTP status.

    - 2xx: sent.
    - 3xx: failed. Redirects are never followed: credentials must not reach another location.
    - 401, 403: failed and ``halt`` (the credential is invalid or lacks the permission: nothing can go out).
    - 408, 425, 429: retryable, not ambiguous (the provider did not process it); 429 ``throttled``.
    - 5xx: retryable and ``ambiguous``: the request was sent and may have been processed.
    - other 4xx: failed (permanent for this message).
    ``Retry-After`` / ``X-RateLimit-Reset`` are honoured on retryable answers.
    """
    if 200 <= status < 300:
        return Verdict(Status.SENT, f"HTTP {status}")
    if 300 <= status < 400:
        return Verdict(
            Status.FAILED,
            f"HTTP {status} redirect not followed (credentials are never sent to a redirect target; "
            "check the provider base URL)",
        )
    if status in NOT_PROCESSED_STATUSES or status >= 500:
        return Verdict(
            Status.RETRYABLE,
            f"HTTP {status}",
            retry_after=parse_retry_after(headers, now=now),
            ambiguous=status >= 500,
            throttled=status in THROTTLE_STATUSES,
        )
    return Verdict(Status.FAILED, f"HTTP {status}", halt=status in AUTH_STATUSES)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (``__cause__``, ``__context__``, ``.reason``, exception args):
    requests wraps urllib3's ``MaxRetryError`` which wraps ``NewConnectionError`` ..."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(
            e
            for e in (
                current.__cause__,
                current.__context__,
                getattr(current, "reason", None),
                *getattr(current, "args", ()),
            )
            if isinstance(e, BaseException)
        )
    return seen


def request_not_sent(exc: BaseException) -> str | None:
    """Why the request never left (connection refused, DNS failure, connect timeout), or None when it may
    have been sent (read timeout, connection reset or closed after sending, anything unexpected)."""
    import socket

    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

    chain = _exception_chain(exc)
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    if any(isinstance(e, NameResolutionError | socket.gaierror) for e in chain):
        return "DNS failure: the provider host could not be resolved"
    if any(isinstance(e, NewConnectionError) for e in chain):  # (a ConnectTimeoutError subclass)
        text = " ".join(str(e) for e in chain).lower()
        if "refused" in text:
            return "connection refused"
        return "connect timeout" if "timed out" in text else "could not connect"
    if any(isinstance(e, requests.exceptions.ConnectTimeout | ConnectTimeoutError) for e in chain):
        return "connect timeout"
    return None


def classify_transport_error(exc: BaseException) -> Verdict:
    """Connection refused / DNS / connect timeout: retryable, the provider never saw the request.
    Anything else (read timeout, a connection reset or closed after the request was sent, an unexpected
    error) is retryable but ``ambiguous``: it may have been processed."""
    why = request_not_sent(exc)
    if why is not None:
        return Verdict(Status.RETRYABLE, why)
    if any(isinstance(e, requests.exceptions.ReadTimeout | TimeoutError) for e in _exception_chain(exc)):
        return Verdict(Status.RETRYABLE, "timed out waiting for the provider's answer", ambiguous=True)
    if isinstance(exc, requests.exceptions.ConnectionError | ConnectionError):
        return Verdict(Status.RETRYABLE, "connection dropped before the provider answered", ambiguous=True)
    return Verdict(
        Status.RETRYABLE, f"unexpected error during the request: {type(exc).__name__}", ambiguous=True
    )


class Http:
    """The HTTP session every requests-based connector uses: a timeout on every call, a request count."""

    def __init__(self, *, timeout: float, session: requests.Session | None = None, user_agent: str = "omni"):
        self.timeout = timeout
        self.session = session or requests.Session()
        self.session.headers["User-Agent"] = user_agent
        self.requests_made = 0

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """Raises ``requests.RequestException`` on transport errors (see :func:`classify_transport_error`)."""
        kwargs.setdefault("timeout", self.timeout)
        # Never follow a redirect: the credentials would go with it (see classify_status).
        kwargs["allow_redirects"] = False
        self.requests_made += 1
        return self.session.request(method, url, **kwargs)

    def close(self) -> None:
        self.session.close()


# --- the connector interface ---------------------------------------------------------------------------

T = TypeVar("T")


def _blank(value: object) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return isinstance(value, str) and not value.strip()


class Connector:
    """Base class of every connector; see the module docstring."""

    provider: ClassVar[str]
    channel: ClassVar[str]
    channels: ClassVar[frozenset[str]] = frozenset()
    max_batch_size: ClassVar[int] = 1
    rate_per_second: ClassVar[float | None] = None
    # The credentials it reads (``Settings`` fields), which ``flows.secrets.resolve_secrets`` fills from a
    # Prefect Secret block when the environment does not set them.
    secret_settings: ClassVar[tuple[str, ...]] = ()

    requests_made: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.channels and getattr(cls, "channel", None):
            cls.channels = frozenset({cls.channel})

    @classmethod
    def from_settings(cls, settings: Settings) -> Connector:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def require(cls, value: T | None, setting: str) -> T:
        """``value``, or a :class:`ConnectorConfigError` naming the variable ``setting`` to set (for a
        credential, also the Prefect Secret block that may hold it)."""
        if value is not None and not _blank(value):
            return value
        name = setting.removeprefix("OMNI_").lower()
        block = f" (or a Prefect Secret block named {secret_block_name(name)!r})"
        raise ConnectorConfigError(
            f"the {cls.provider} connector needs {setting} to be set"
            + (block if name in cls.secret_settings else "")
        )

    def send(self, batch: Sequence[Message]) -> list[Result]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (optional)."""

    def check_batch(self, batch: Sequence[Message]) -> None:
        if len(batch) > self.max_batch_size:
            raise ValueError(
                f"{self.provider}: batch of {len(batch)} exceeds max_batch_size {self.max_batch_size}"
            )
        for message in batch:
            if message.channel not in self.channels:
                raise ValueError(f"{self.provider} cannot send {message.channel!r} messages")

    def _repr_fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        parts = []
        for key, value in self._repr_fields().items():
            if isinstance(value, SecretStr):
                value = MASK if value.get_secret_value() else ""
            parts.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    __str__ = __repr__


class HttpConnector(Connector):
    """A connector speaking HTTP through the shared :class:`Http` session (``self.http``)."""

    http: Http
    # The provider as reasons name it ("SendGrid HTTP 400: ...").
    label: ClassVar[str]

    @property
    def requests_made(self) -> int:  # type: ignore[override]
        return self.http.requests_made

    def classify(self, response: requests.Response, messages: Sequence[Message]) -> Verdict:
        """The one place this provider's answers are judged; a provider overrides it to read its error
        codes. ``messages``: what the request carried, for what an answer says about their recipients
        (an :class:`Effect`). Default: the HTTP status (:func:`classify_status`), ``Retry-After``
        honoured."""
        verdict = classify_status(response.status_code, response.headers)
        return verdict.replace(reason=f"{self.label} {verdict.reason}")

    def close(self) -> None:
        self.http.close()


# --- the one retry policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retries within one :func:`send_batch` call: at most ``attempts_per_send`` tries of a message;
    waits of ``base_delay * 2^(n-1)`` with full jitter, capped at ``max_delay``, or the provider's
    Retry-After when longer. A wait longer than ``max_inline_delay`` is not slept: the message is returned
    ``retryable`` with that delay instead. (Delivery attempts across ticks are a different count: the
    engine's ``Settings.delivery_attempts``.)

    Which answers may be retried is not a policy setting: it is the channel's rule (``at_most_once``).
    An ambiguous answer (the provider may have processed the request) is never retried for email, SMS or
    push, whatever the policy; it is retried only for the at-least-once channels (ads, webhook)."""

    attempts_per_send: int = 3
    base_delay: float = 0.5
    max_delay: float = 60.0
    max_inline_delay: float = 5.0

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The wait after try ``attempt``; ``rng`` draws the jitter (``lambda: 1.0``: the ceiling)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return ceiling * rng()


@dataclass
class SendReport:
    """What :func:`send_batch` did: one result per message, in order.

    ``halted`` is the reason when the connector could not send at all (a 401/403 or a provider-specific
    invalid-credential answer, or the provider unreachable / failing through all the in-call retries).
    Then sending stopped at once: messages not accepted (including the one that got the 401) are
    ``retryable`` with ``reason`` = ``halted``; results obtained before the halt are kept. The caller must
    fail its task with that reason, record nothing as sent for those messages and leave them due.
    """

    results: list[Result]
    attempts: int = 0
    calls: int = 0
    slept: float = 0.0
    halted: str | None = None

    def by_status(self, status: Status) -> list[Result]:
        return [r for r in self.results if r.status is status]

    @property
    def sent(self) -> list[Result]:
        return self.by_status(Status.SENT)

    @property
    def retryable(self) -> list[Result]:
        return self.by_status(Status.RETRYABLE)

    @property
    def failed(self) -> list[Result]:
        return self.by_status(Status.FAILED)

    @property
    def unknown(self) -> list[Result]:
        return self.by_status(Status.UNKNOWN)

    def counts(self) -> dict[str, int]:
        return {s.value: len(self.by_status(s)) for s in Status}


def not_resent(result: Result) -> Result:
    """An ambiguous result of an at-most-once channel as recorded: ``unknown``, never resent."""
    reason = (result.reason or "no answer").rstrip(".")
    return Result(
        result.delivery_id,
        Status.UNKNOWN,
        provider_id=result.provider_id,
        reason=f"{reason} after the request was sent: may have been delivered; not resent (at most once)",
        ambiguous=True,
        effects=result.effects,
        info=result.info,
    )


def send_batch(
    connector: Connector,
    messages: Sequence[Message],
    *,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: Callable[[], float] = random.random,
) -> SendReport:
    """Send ``messages`` through ``connector`` with bounded in-call retries; one result per message, in order.

    The batch is split at ``max_batch_size``; each chunk is sent and its retryable messages retried (at
    most ``policy.attempts_per_send`` tries, backoff with jitter, Retry-After honoured; tenacity runs the
    tries) before the next chunk.

    Delivery semantics (the channel's, ``omni.core.channels.at_most_once``; no policy overrides them):

    - at-most-once channels (email, SMS, push): an ambiguous answer (5xx, read timeout, connection dropped
      after sending, an unexpected exception during the request) is never retried and comes back
      ``Status.UNKNOWN`` with the reason; only answers proving nothing was processed are retried (429,
      Twilio 20429, connection refused, DNS failure, connect timeout, 408);
    - at-least-once channels (ads, webhook): ambiguous answers are retried too.

    Halting: on an answer meaning nothing can be sent (``Result.halt``: 401/403, an invalid credential),
    or when every message of a chunk is still retryable after all its tries without the provider having
    asked us to slow down (unreachable / failing throughout), sending stops: ``SendReport.halted`` is the
    reason, and every message not accepted is ``retryable`` with that reason.

    Args:
        policy: attempts, backoff and the longest wait slept here (default :class:`RetryPolicy`).
        sleep, clock, rng: injectable for tests (no test sleeps or reads the wall clock).

    Returns:
        a :class:`SendReport`; its ``retryable`` results are what a later tick should retry, each with
        ``retry_after`` set to the wait before it; ``unknown`` ones must never be sent again.
    """
    policy = policy or RetryPolicy()
    ids = [m.delivery_id for m in messages]
    if len(set(ids)) != len(ids):
        raise ValueError("send_batch: delivery ids must be unique within a batch")
    report = SendReport(results=[])
    final: dict[str, Result] = {}
    interval = 1.0 / connector.rate_per_second if connector.rate_per_second else 0.0
    next_slot = clock()

    def call(chunk: Sequence[Message]) -> list[Result]:
        nonlocal next_slot
        connector.check_batch(chunk)  # programming errors raise here, before any request
        if interval:
            wait = next_slot - clock()
            if wait > 0:
                sleep(wait)
                report.slept += wait
            next_slot = max(next_slot, clock()) + interval * len(chunk)
        report.calls += 1
        try:
            results = connector.send(chunk)
        except ConnectorConfigError:
            raise  # a configuration error found before any request (an unmapped audience ...)
        except Exception as exc:  # noqa: BLE001 - the request may have gone out: ambiguous
            reason = f"{connector.provider}: unexpected error during the request: {type(exc).__name__}"
            log.warning("%s (%s)", redact(reason), redact(str(exc))[:500])
            results = [Result.retryable(m.delivery_id, reason, ambiguous=True) for m in chunk]
        if [r.delivery_id for r in results] != [m.delivery_id for m in chunk]:
            raise RuntimeError(f"{connector.provider}: results do not match the batch sent")
        return [
            not_resent(r) if r.status is Status.RETRYABLE and r.ambiguous and at_most_once(m.channel) else r
            for r, m in zip(results, chunk, strict=True)
        ]

    def halt(pending: Sequence[Message], reason: str) -> None:
        report.halted = report.halted or reason
        for m in pending:
            current = final.get(m.delivery_id)
            if current is None or current.halt or current.status is Status.RETRYABLE:
                final[m.delivery_id] = Result.retryable(
                    m.delivery_id,
                    report.halted,
                    retry_after=current.retry_after if current is not None else None,
                    ambiguous=current.ambiguous if current is not None else False,
                )

    def attempt(pending: list[Message]) -> list[Message]:
        """One try of ``pending``; leaves in it (and returns) the messages to try again."""
        for result in call(pending):
            final[result.delivery_id] = result
        halting = [final[m.delivery_id] for m in pending if final[m.delivery_id].halt]
        if halting:
            halt(pending, f"{connector.provider} cannot send: {halting[0].reason}")
            pending.clear()
        else:
            pending[:] = [m for m in pending if final[m.delivery_id].status is Status.RETRYABLE]
        return pending

    def delay(state: RetryCallState) -> float:
        """The provider's Retry-After when longer than the backoff."""
        hint = max((final[m.delivery_id].retry_after or 0.0) for m in state.outcome.result())
        return max(hint, policy.backoff(state.attempt_number, rng))

    def pause(seconds: float) -> None:
        if seconds > 0:
            sleep(seconds)
            report.slept += seconds

    retrying = Retrying(
        retry=retry_if_result(bool),  # messages left to try
        stop=stop_any(
            stop_after_attempt(policy.attempts_per_send),
            # The provider asked for a longer wait than is slept here: left for a later tick.
            lambda state: state.upcoming_sleep > policy.max_inline_delay,
        ),
        wait=delay,
        sleep=pause,
        retry_error_callback=lambda state: state.outcome.result(),  # what is left stays retryable
    )
    for chunk in chunked(messages, connector.max_batch_size):
        if report.halted:
            halt(chunk, report.halted)
            continue
        left = retrying(attempt, list(chunk))
        tries = retrying.statistics["attempt_number"]
        report.attempts = max(report.attempts, tries)
        if report.halted or (left and tries < policy.attempts_per_send):
            continue  # halted, or waiting longer than is slept here
        outcome = [final[m.delivery_id] for m in chunk]
        if all(r.status is Status.RETRYABLE and not r.throttled for r in outcome):
            # Nothing of this chunk was accepted through every try: the provider is down or unreachable.
            halt(
                chunk,
                f"{connector.provider} unavailable: {outcome[0].reason} "
                f"(every try failed, {tries} attempt{'s' if tries != 1 else ''}); nothing was accepted",
            )
    # What is still retryable carries the wait before the next try (a later tick).
    for delivery_id, result in final.items():
        if result.status is Status.RETRYABLE:
            wait = max(result.retry_after or 0.0, policy.backoff(report.attempts + 1, lambda: 1.0))
            final[delivery_id] = result.replace(retry_after=math.ceil(wait * 1000) / 1000, halt=False)
    report.results = [final[i] for i in ids]
    return report
