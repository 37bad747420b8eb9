"""Social retargeting through Meta customer-file custom audiences: ``{base}/{version}/{audience_id}/users``.

Add: ``POST``; remove: ``POST`` with ``method=DELETE`` (the documented alternative to ``DELETE``, which
would put 10,000 rows in a query string). Form fields: ``access_token`` (``OMNI_META_ACCESS_TOKEN``, a
system-user token with ``ads_management``; sent in the body, never in a URL), ``payload`` and ``session``
as JSON strings. Base URL ``OMNI_META_BASE_URL``, version ``OMNI_META_API_VERSION`` (``v25.0``).

Audiences: a message's ``to`` is an Omni audience name mapped to a Meta custom audience id by
``OMNI_META_AUDIENCES`` (``{"cart_retargeting": "2385..."}``), or a numeric Meta id as is.

Payload: multi-key schema ``["EMAIL", "PHONE", "FN", "LN"]``, each value normalised (email trimmed and
lower-cased; phone digits only with the country code; names lower-case letters only) and SHA-256-hashed
(lower-case hex); ``""`` when unknown. Raw identifiers never leave Omni. Each request is its own
session (``session_id`` random positive int64, ``batch_seq`` 1, ``last_batch_flag`` true).

Limits: ≤ 10,000 rows per request. Success ``200 {audience_id, session_id, num_received,
num_invalid_entries, invalid_entry_samples}``: every member of the request is ``sent`` (the provider id
is the session id) and ``num_invalid_entries`` / ``num_received`` are in ``Result.info``.
:meth:`MetaCustomAudience.add` / :meth:`remove` take :class:`AudienceMember` values directly and return an
:class:`AudienceReport`.

Errors ``{"error": {message, type, code, error_subcode, is_transient, fbtrace_id}}`` are classified by
code / subcode / ``is_transient``, not by HTTP status: 1, 2, 4, 17, 613, 80003, 80004, any
``is_transient`` and 2650 with 1870145 / 1870148 are retryable (``X-Business-Use-Case-Usage``
``estimated_time_to_regain_access`` honoured); the rest (100, 190, 10, 200, 294, 368, ...) permanent.
190 (invalid or expired access token) and 102 also ``halt``: ``send_batch`` stops, nothing can be sent.

Delivery semantics: ad-audience syncs are at least once (the channel's ``at_least_once`` in
``omni.core.channels``): adding or removing the same hashes again is set membership, so ``send_batch``
retries ambiguous answers (5xx, a timeout) too. Redirects are never followed (the token travels in the body).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from pydantic import SecretStr

from connectors.base import (
    AudienceMember,
    ConnectorConfigError,
    Http,
    HttpConnector,
    Message,
    Result,
    Status,
    Verdict,
    classify_transport_error,
    parse_retry_after,
    redact,
    reveal,
)
from omni.core.batching import chunked
from omni.core.channels import Channel
from omni.core.settings import Settings

SCHEMA = ["EMAIL", "PHONE", "FN", "LN"]
RETRYABLE_CODES = {1, 2, 4, 17, 613, 80003, 80004}
THROTTLE_CODES = {4, 17, 613, 80003, 80004}
# The access token is invalid or expired (or the API session is): nothing can be sent.
AUTH_CODES = {102, 190}
RETRYABLE_REPLACE_SUBCODES = {1870145, 1870148}
ACTIONS = ("add", "remove")


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def normalize_email(value: str | None) -> str:
    return (value or "").strip().lower()


def normalize_phone(value: str | None) -> str:
    """Digits only, country code included (Omni keeps phones in E.164), no leading zeros."""
    return re.sub(r"\D", "", value or "").lstrip("0")


def normalize_name(value: str | None) -> str:
    """Lower case, letters only (no punctuation or spaces; non-ASCII letters kept)."""
    return "".join(ch for ch in (value or "").strip().lower() if ch.isalpha())


def hashed_row(member: AudienceMember) -> list[str]:
    """The member's row for :data:`SCHEMA`: normalised, SHA-256-hashed values, ``""`` when unknown."""
    values = (
        normalize_email(member.email),
        normalize_phone(member.phone),
        normalize_name(member.first_name),
        normalize_name(member.last_name),
    )
    return [sha256(v) if v else "" for v in values]


@dataclass
class AudienceReport:
    results: list[Result]
    num_received: int = 0
    num_invalid_entries: int = 0
    invalid_entry_samples: Any = field(default_factory=dict)
    requests: int = 0


class MetaCustomAudience(HttpConnector):
    provider = "meta_audience"
    channel = Channel.ADS
    max_batch_size = 10_000
    rate_per_second = None
    secret_settings = ("meta_access_token",)
    label = "Meta"

    def __init__(
        self,
        *,
        access_token: SecretStr | str,
        ad_account_id: str | None = None,
        audiences: Mapping[str, str] | None = None,
        base_url: str = "https://graph.facebook.com",
        api_version: str = "v25.0",
        timeout: float = 30.0,
        session: requests.Session | None = None,
        session_ids: random.Random | None = None,
    ) -> None:
        self.access_token = access_token if isinstance(access_token, SecretStr) else SecretStr(access_token)
        self.require(self.access_token, "OMNI_META_ACCESS_TOKEN")
        self.ad_account_id = ad_account_id
        self.audiences = dict(audiences or {})
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version.strip("/")
        self.http = Http(timeout=timeout, session=session)
        self._ids = session_ids or random.SystemRandom()
        reveal(self.access_token)

    @classmethod
    def from_settings(cls, settings: Settings) -> MetaCustomAudience:
        return cls(
            access_token=cls.require(settings.meta_access_token, "OMNI_META_ACCESS_TOKEN"),
            ad_account_id=settings.meta_ad_account_id,
            audiences=settings.meta_audiences,
            base_url=settings.meta_base_url,
            api_version=settings.meta_api_version,
            timeout=max(settings.connector_timeout, 30.0),
        )

    def _repr_fields(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "api_version": self.api_version,
            "access_token": self.access_token,
            "ad_account_id": self.ad_account_id,
        }

    def audience_id(self, audience: str) -> str:
        if audience in self.audiences:
            return self.audiences[audience]
        if audience.isdigit():
            return audience
        raise ConnectorConfigError(
            f"no Meta custom audience id for audience {audience!r}: add it to OMNI_META_AUDIENCES"
        )

    # --- the audience operations ----------------------------------------------------------------------

    def add(self, audience: str, members: Sequence[AudienceMember], *, ids: Sequence[str] | None = None):
        return self._update("add", audience, members, ids)

    def remove(self, audience: str, members: Sequence[AudienceMember], *, ids: Sequence[str] | None = None):
        return self._update("remove", audience, members, ids)

    def _update(
        self, action: str, audience: str, members: Sequence[AudienceMember], ids: Sequence[str] | None
    ) -> AudienceReport:
        ids = list(ids) if ids is not None else [str(m.customer_id) for m in members]
        report = AudienceReport(results=[])
        audience_id = self.audience_id(audience)
        for start in range(0, len(members), self.max_batch_size):
            part = members[start : start + self.max_batch_size]
            part_ids = ids[start : start + self.max_batch_size]
            results, body = self._request(action, audience_id, part, part_ids)
            report.results.extend(results)
            report.requests += 1
            report.num_received += int(body.get("num_received") or 0)
            report.num_invalid_entries += int(body.get("num_invalid_entries") or 0)
            if body.get("invalid_entry_samples"):
                report.invalid_entry_samples = body["invalid_entry_samples"]
        return report

    def payload(self, members: Sequence[AudienceMember]) -> dict[str, Any]:
        return {"schema": SCHEMA, "data": [hashed_row(m) for m in members]}

    def _request(
        self, action: str, audience_id: str, members: Sequence[AudienceMember], ids: Sequence[str]
    ) -> tuple[list[Result], dict]:
        session_id = self._ids.randrange(1, 2**63)
        form = {
            "access_token": reveal(self.access_token),
            "payload": json.dumps(self.payload(members), separators=(",", ":")),
            "session": json.dumps(
                {
                    "session_id": session_id,
                    "batch_seq": 1,
                    "last_batch_flag": True,
                    "estimated_num_total": len(members),
                },
                separators=(",", ":"),
            ),
        }
        if action == "remove":
            form["method"] = "DELETE"
        url = f"{self.base_url}/{self.api_version}/{audience_id}/users"
        try:
            response = self.http.request("POST", url, data=form)
        except Exception as exc:  # noqa: BLE001 - classified; retried either way (at least once)
            verdict = classify_transport_error(exc)
            # Audience adds and removes are idempotent: a retry after a timeout is harmless.
            verdict = Verdict(verdict.status, f"Meta {verdict.reason}")
            return [verdict.result(i) for i in ids], {}
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        if response.status_code == 200 and "error" not in body:
            info = {
                "action": action,
                "audience_id": str(body.get("audience_id") or audience_id),
                "num_received": body.get("num_received"),
                "num_invalid_entries": body.get("num_invalid_entries"),
            }
            provider_id = str(body.get("session_id") or session_id)
            return [Result.sent(i, provider_id, **info) for i in ids], body
        verdict = self.classify(response, ())
        return [verdict.result(i) for i in ids], {}

    def classify(self, response: requests.Response, messages: Sequence[Message]) -> Verdict:
        """The one place Meta answers are judged: error code / subcode / ``is_transient`` first."""
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return super().classify(response, messages).replace(ambiguous=False)
        code, subcode = error.get("code"), error.get("error_subcode")
        reason = redact(
            f"Meta error {code}" + (f"/{subcode}" if subcode else "") + f": {error.get('message') or ''}"
        ).strip()
        retryable = (
            bool(error.get("is_transient"))
            or code in RETRYABLE_CODES
            or (code == 2650 and subcode in RETRYABLE_REPLACE_SUBCODES)
        )
        if retryable:
            wait = _regain_access_seconds(response.headers) or parse_retry_after(response.headers)
            return Verdict(Status.RETRYABLE, reason, retry_after=wait, throttled=code in THROTTLE_CODES)
        return Verdict(Status.FAILED, reason, halt=code in AUTH_CODES)

    # --- the common connector interface ---------------------------------------------------------------

    def send(self, batch: Sequence[Message]) -> list[Result]:
        """Messages with ``action`` add/remove, ``to`` the audience and ``member`` the identifiers;
        grouped by (audience, action) into one request each."""
        self.check_batch(batch)
        results: dict[str, Result] = {}
        groups: dict[tuple[str, str], list[Message]] = {}
        for message in batch:
            if message.action not in ACTIONS or message.member is None:
                results[message.delivery_id] = Result.failed(
                    message.delivery_id, "ads message needs action add/remove and a member"
                )
                continue
            groups.setdefault((message.to, message.action), []).append(message)
        halted: str | None = None
        for (audience, action), messages in groups.items():
            for part in chunked(messages, self.max_batch_size):
                if halted is not None:
                    # The token cannot send: the other requests of the batch are not attempted.
                    for m in part:
                        results[m.delivery_id] = Result.retryable(m.delivery_id, halted, halt=True)
                    continue
                report = self._update(
                    action, audience, [m.member for m in part], [m.delivery_id for m in part]
                )
                for result in report.results:
                    results[result.delivery_id] = result
                    if result.halt and halted is None:
                        halted = result.reason or "Meta cannot send"
        return [results[m.delivery_id] for m in batch]


def _regain_access_seconds(headers: Mapping[str, str]) -> float | None:
    """Minutes to wait from ``X-Business-Use-Case-Usage`` (``estimated_time_to_regain_access``)."""
    raw = None
    for key, value in (headers or {}).items():
        if key.lower() == "x-business-use-case-usage":
            raw = value
    if not raw:
        return None
    try:
        usage = json.loads(raw)
    except ValueError:
        return None
    minutes = [
        entry.get("estimated_time_to_regain_access") or 0
        for entries in (usage.values() if isinstance(usage, dict) else [])
        for entry in (entries if isinstance(entries, list) else [])
        if isinstance(entry, dict)
    ]
    return max(minutes) * 60.0 if minutes and max(minutes) > 0 else None
