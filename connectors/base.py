"""The connector interface, the one shared HTTP / classification layer and the one retry loop.

Every message Omni sends leaves through a :class:`Connector`. A connector is one class in one module
(``connectors/<provider>.py``); what a flow needs to know about it is a class attribute:

- ``provider`` (registry key, equal to the module name), ``channel`` (its main channel) and
  ``channels`` (every channel it can serve: the outbox and webhook connectors serve all of them);
- ``max_batch_size`` (messages per provider request: 1000 SendGrid personalizations, 10,000 Meta rows,
  1 for Twilio, FCM and webhooks) and ``rate_per_second`` (``None``: no client-side throttle).

Interface for the sequence engine:

- ``connectors.get_connector(channel, settings=None, *, engine=None) -> Connector`` builds the
  configured connector; a misconfigured one raises :class:`ConnectorConfigError` naming the missing
  setting (``OMNI_SENDGRID_API_KEY`` ...) at construction, never half-way through a batch.
- ``connector.send(batch: Sequence[Message]) -> list[Result]``: one request (or one per message where the
  API has no batch endpoint), one :class:`Result` per message in order: ``sent`` + ``provider_id``,
  ``retryable`` + ``retry_after`` seconds, or ``failed`` + ``reason``. A connector never retries and
  never raises for a provider's answer; it raises only for programming errors (a batch bigger than
  ``max_batch_size``, a message for a channel it does not serve).
- :func:`send_batch` (``connectors.send_batch``) is the one retry loop: it splits a batch at
  ``max_batch_size``, throttles to ``rate_per_second``, retries short throttles in the call (a 429 with
  ``Retry-After: 2``, a passing 503) with exponential backoff, jitter and a cap on attempts, and returns a
  :class:`SendReport` whose still-``retryable`` results carry the delay to wait before a later tick.
- Provider side effects (Twilio 21610 → SMS opt-out; FCM ``UNREGISTERED`` → device token removed) are
  :class:`Effect` values on the results; ``connectors.effects.apply_effects(session, results, now=...)``
  writes them to the store. Connectors themselves never touch the database (the outbox, whose job is
  to write, is handed an engine).

Secrets are ``SecretStr`` attributes: ``repr()`` masks them, provider error text is redacted before it
becomes a ``reason``, and :class:`SecretRedactingFilter` scrubs them from the HTTP libraries' debug logs.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, ClassVar

import requests
from pydantic import SecretStr

log = logging.getLogger(__name__)

MASK = "**********"


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    ADS = "ads"
    WEBHOOK = "webhook"


class Status(StrEnum):
    SENT = "sent"
    RETRYABLE = "retryable"
    FAILED = "failed"


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


@dataclass(frozen=True, slots=True)
class Effect:
    """Something the provider told us about the recipient that the profile store must learn.

    kinds: ``sms_opted_out`` (value: the phone), ``device_token_invalid`` (value: the token).
    """

    kind: str
    customer_id: int | None
    value: str
    source: str


@dataclass(frozen=True, slots=True)
class Result:
    delivery_id: str
    status: Status
    provider_id: str | None = None
    retry_after: float | None = None
    reason: str | None = None
    # True when the request may have reached the provider (read timeout, 5xx): a retry may duplicate.
    ambiguous: bool = False
    effects: tuple[Effect, ...] = ()
    info: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def sent(cls, delivery_id: str, provider_id: str | None, **info: Any) -> Result:
        return cls(delivery_id, Status.SENT, provider_id=provider_id, info=info)

    @classmethod
    def retryable(
        cls, delivery_id: str, reason: str, *, retry_after: float | None = None, ambiguous: bool = False
    ) -> Result:
        return cls(delivery_id, Status.RETRYABLE, retry_after=retry_after, reason=reason, ambiguous=ambiguous)

    @classmethod
    def failed(cls, delivery_id: str, reason: str, *, effects: Iterable[Effect] = ()) -> Result:
        return cls(delivery_id, Status.FAILED, reason=reason, effects=tuple(effects))


@dataclass(frozen=True, slots=True)
class Verdict:
    """How one provider answer is classified (the input to a per-message :class:`Result`)."""

    status: Status
    reason: str
    retry_after: float | None = None
    ambiguous: bool = False
    effects: tuple[Effect, ...] = ()

    def result(self, delivery_id: str) -> Result:
        return Result(
            delivery_id,
            self.status,
            retry_after=self.retry_after,
            reason=self.reason,
            ambiguous=self.ambiguous,
            effects=self.effects,
        )


# --- secrets in logs ----------------------------------------------------------------------------------


class SecretRedactingFilter(logging.Filter):
    """Replaces every registered secret in a log record's text with a mask.

    Installed on the loggers of the HTTP libraries connectors use (``python_http_client`` logs request
    headers, including ``Authorization``, at DEBUG).
    """

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken record is not ours to fix
                return True
            redacted = self.redact(message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


SECRETS = SecretRedactingFilter()
for _name in ("python_http_client.client", "urllib3.connectionpool", "requests", __name__):
    logging.getLogger(_name).addFilter(SECRETS)


def redact(text: str) -> str:
    """``text`` with every secret a connector registered masked (for reasons and log lines)."""
    return SECRETS.redact(text)


def reveal(secret: SecretStr | None) -> str:
    """The value of a secret, registered for redaction first. Use only where the provider needs it."""
    value = secret.get_secret_value() if secret is not None else ""
    SECRETS.add(value)
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


def classify_status(status: int, headers: Mapping[str, str] | None = None, *, now: float | None = None):
    """The default verdict on an HTTP status: 2xx sent; 408, 429 and 5xx retryable (honouring
    ``Retry-After`` / ``X-RateLimit-Reset``); other 4xx permanent."""
    if 200 <= status < 300:
        return Verdict(Status.SENT, f"HTTP {status}")
    if status in (408, 425, 429) or status >= 500:
        return Verdict(
            Status.RETRYABLE,
            f"HTTP {status}",
            retry_after=parse_retry_after(headers, now=now),
            ambiguous=status >= 500,
        )
    return Verdict(Status.FAILED, f"HTTP {status}")


def classify_transport_error(exc: BaseException) -> Verdict:
    """Connection refused / DNS / connect timeout: retryable, the provider never saw the request.
    Read timeout or a dropped connection: retryable but ambiguous (it may have been processed)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Verdict(Status.RETRYABLE, "connect timeout")
    if isinstance(exc, requests.exceptions.ReadTimeout | TimeoutError):
        return Verdict(Status.RETRYABLE, "timed out waiting for the provider", ambiguous=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc).lower()
        refused = "refused" in text or "name or service" in text or "resolve" in text
        return Verdict(
            Status.RETRYABLE, "connection refused" if refused else "connection error", ambiguous=not refused
        )
    return Verdict(Status.RETRYABLE, f"network error: {type(exc).__name__}", ambiguous=True)


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
        kwargs.setdefault("allow_redirects", False)
        self.requests_made += 1
        return self.session.request(method, url, **kwargs)

    def close(self) -> None:
        self.session.close()


# --- the connector interface ---------------------------------------------------------------------------


class Connector:
    """Base class of every connector; see the module docstring."""

    provider: ClassVar[str]
    channel: ClassVar[str]
    channels: ClassVar[frozenset[str]] = frozenset()
    max_batch_size: ClassVar[int] = 1
    rate_per_second: ClassVar[float | None] = None
    # Settings a connector reads, for docs and error messages.
    settings_used: ClassVar[tuple[str, ...]] = ()

    requests_made: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.channels and getattr(cls, "channel", None):
            cls.channels = frozenset({cls.channel})

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> Connector:  # pragma: no cover - abstract
        raise NotImplementedError

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

    @property
    def requests_made(self) -> int:  # type: ignore[override]
        return self.http.requests_made

    def close(self) -> None:
        self.http.close()


# Credentials that may also come from a Prefect Secret block named after the variable
# (OMNI_SENDGRID_API_KEY -> "omni-sendgrid-api-key") when the environment does not set them.
SECRET_SETTINGS = frozenset(
    {"OMNI_SENDGRID_API_KEY", "OMNI_META_ACCESS_TOKEN", "OMNI_TWILIO_AUTH_TOKEN", "OMNI_WEBHOOK_SECRET"}
)


def secret_block_name(setting: str) -> str:
    return setting.lower().replace("_", "-")


def load_secret_block(setting: str) -> SecretStr | None:
    """The value of the Prefect Secret block for ``setting``, or None.

    Looked up only where a Prefect API is at hand (``PREFECT_API_URL`` set, or inside a flow run), so a
    CLI command never starts a temporary Prefect server just to find a credential.
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value() and FlowRunContext.get() is None:
        return None
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(secret_block_name(setting))
    except ValueError:  # no block of that name
        return None
    value = block.get()
    return SecretStr(value) if isinstance(value, str) and value.strip() else None


def require(value: Any, setting: str, provider: str) -> Any:
    """``value`` (or, for a credential, its Prefect Secret block), or a :class:`ConnectorConfigError`
    naming the environment variable to set."""
    missing = value is None or (isinstance(value, str) and not value.strip())
    missing = missing or (isinstance(value, SecretStr) and not value.get_secret_value().strip())
    if not missing:
        return value
    if setting in SECRET_SETTINGS:
        found = load_secret_block(setting)
        if found is not None:
            SECRETS.add(found.get_secret_value())
            return found
        raise ConnectorConfigError(
            f"the {provider} connector needs {setting} to be set "
            f"(or a Prefect Secret block named {secret_block_name(setting)!r})"
        )
    raise ConnectorConfigError(f"the {provider} connector needs {setting} to be set")


# --- the one retry loop --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded in-call retries: ``max_attempts`` tries in all; waits of ``base_delay * 2^(n-1)`` with full
    jitter, capped at ``max_delay``, or the provider's Retry-After when longer. A wait longer than
    ``max_inline_delay`` is not slept: the message is returned ``retryable`` with that delay instead.
    ``retry_ambiguous=False`` keeps at-most-once channels from retrying a request the provider may have
    processed (a read timeout, a 5xx)."""

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 60.0
    max_inline_delay: float = 5.0
    retry_ambiguous: bool = True

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        ceiling = min(self.max_delay, self.base_delay * (2 ** max(0, attempt - 1)))
        return ceiling * rng()


@dataclass
class SendReport:
    results: list[Result]
    attempts: int = 0
    calls: int = 0
    slept: float = 0.0

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

    def counts(self) -> dict[str, int]:
        return {s.value: len(self.by_status(s)) for s in Status}


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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

    Args:
        policy: attempts, backoff and the longest wait slept here (default :class:`RetryPolicy`).
        sleep, clock, rng: injectable for tests (no test sleeps or reads the wall clock).

    Returns:
        a :class:`SendReport`; its ``retryable`` results are what a later tick should retry, each with
        ``retry_after`` set to the wait before it.
    """
    policy = policy or RetryPolicy()
    ids = [m.delivery_id for m in messages]
    if len(set(ids)) != len(ids):
        raise ValueError("send_batch: delivery ids must be unique within a batch")
    report = SendReport(results=[])
    final: dict[str, Result] = {}
    pending = list(messages)
    interval = 1.0 / connector.rate_per_second if connector.rate_per_second else 0.0
    next_slot = clock()
    while pending:
        report.attempts += 1
        for chunk in chunks(pending, connector.max_batch_size):
            if interval:
                wait = next_slot - clock()
                if wait > 0:
                    sleep(wait)
                    report.slept += wait
                next_slot = max(next_slot, clock()) + interval * len(chunk)
            results = connector.send(chunk)
            report.calls += 1
            if [r.delivery_id for r in results] != [m.delivery_id for m in chunk]:
                raise RuntimeError(f"{connector.provider}: results do not match the batch sent")
            for result in results:
                final[result.delivery_id] = result
        retry = [
            m
            for m in pending
            if final[m.delivery_id].status is Status.RETRYABLE
            and (policy.retry_ambiguous or not final[m.delivery_id].ambiguous)
        ]
        if not retry or report.attempts >= policy.max_attempts:
            break
        hint = max((final[m.delivery_id].retry_after or 0.0) for m in retry)
        delay = max(hint, policy.backoff(report.attempts, rng))
        if delay > policy.max_inline_delay:
            break
        if delay > 0:
            sleep(delay)
            report.slept += delay
        pending = retry
    # What is still retryable carries the wait before the next try (a later tick).
    for delivery_id, result in final.items():
        if result.status is Status.RETRYABLE:
            wait = max(result.retry_after or 0.0, policy.backoff(report.attempts + 1, lambda: 1.0))
            final[delivery_id] = Result(
                result.delivery_id,
                result.status,
                retry_after=math.ceil(wait * 1000) / 1000,
                reason=result.reason,
                ambiguous=result.ambiguous,
                effects=result.effects,
                info=result.info,
            )
    report.results = [final[i] for i in ids]
    return report
