"""The shared retry loop's delivery semantics: at most once vs at least once, halting, redaction."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from urllib.parse import quote, quote_plus

import pytest

from connectors import Message, Result, RetryPolicy, SendReport, Status, send_batch
from connectors.base import (
    Connector,
    ConnectorConfigError,
    classify_status,
    redact,
    register_basic_auth,
    register_secret,
)
from omni.core.channels import CHANNELS
from omni.core.channels import at_most_once as at_most_once_

FAST = RetryPolicy(attempts_per_send=3, base_delay=0.0)


class Scripted(Connector):
    """Answers each call with the next scripted outcome, for every message of the call."""

    provider = "scripted"
    channel = "email"
    channels = frozenset({"email", "sms", "push", "ads", "webhook"})
    max_batch_size = 1

    def __init__(self, answers, *, batch: int = 1):
        self.answers = list(answers)
        self.calls: list[list[str]] = []
        self.max_batch_size = batch

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        self.calls.append([m.delivery_id for m in batch])
        answer = self.answers.pop(0) if self.answers else "sent"
        if answer == "raise":
            raise RuntimeError("socket exploded mid-request")
        if answer == "config":
            raise ConnectorConfigError("no audience id: set OMNI_META_AUDIENCES")
        out = []
        for m in batch:
            if answer == "sent":
                out.append(Result.sent(m.delivery_id, "x"))
            elif answer == "ambiguous":
                out.append(Result.retryable(m.delivery_id, "HTTP 500", ambiguous=True))
            elif answer == "refused":
                out.append(Result.retryable(m.delivery_id, "connection refused"))
            elif answer == "throttled":
                out.append(Result.retryable(m.delivery_id, "HTTP 429", retry_after=1, throttled=True))
            elif answer == "401":
                out.append(Result.failed(m.delivery_id, "HTTP 401: key revoked", halt=True))
            elif answer == "invalid":
                out.append(Result.failed(m.delivery_id, "invalid number"))
            else:  # pragma: no cover
                raise AssertionError(answer)
        return out


def msgs(n: int, channel: str = "email") -> list[Message]:
    return [Message(delivery_id=f"d{i}", channel=channel, to=f"to{i}") for i in range(n)]


# --- the one place the channel rule lives ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("email", True), ("sms", True), ("push", True), ("ads", False), ("webhook", False), ("fax", True)],
)
def test_at_most_once_per_channel(channel, expected):
    assert at_most_once_(channel) is expected
    assert {c for c, facts in CHANNELS.items() if facts.at_least_once} == {"ads", "webhook"}


def test_status_unknown_exists():
    assert Status.UNKNOWN.value == "unknown"
    assert SendReport(results=[]).counts()["unknown"] == 0


@pytest.mark.parametrize("channel", ["email", "sms", "push"])
def test_ambiguous_is_unknown_and_sent_once_for_at_most_once_channels(channel):
    connector = Scripted(["ambiguous"] * 5)
    policy = RetryPolicy(attempts_per_send=10, base_delay=0.0, max_inline_delay=100)
    report = send_batch(connector, msgs(1, channel), policy=policy, sleep=lambda s: None)
    assert connector.calls == [["d0"]]
    [result] = report.results
    assert result.status is Status.UNKNOWN
    assert result.reason.startswith("HTTP 500 after the request was sent")
    assert "not resent (at most once)" in result.reason
    assert report.unknown == [result] and report.halted is None


@pytest.mark.parametrize("channel", ["ads", "webhook"])
def test_ambiguous_is_retried_for_at_least_once_channels(channel):
    connector = Scripted(["ambiguous", "sent"])
    report = send_batch(connector, msgs(1, channel), policy=FAST, sleep=lambda s: None)
    assert connector.calls == [["d0"], ["d0"]]
    assert report.results[0].status is Status.SENT


def test_the_message_channel_decides_not_the_connector():
    # An email sent through the webhook connector is still an email: at most once.
    connector = Scripted(["ambiguous"] * 3)
    report = send_batch(connector, msgs(1, "email"), policy=FAST, sleep=lambda s: None)
    assert report.results[0].status is Status.UNKNOWN and len(connector.calls) == 1


def test_an_unexpected_exception_during_the_request_is_ambiguous():
    connector = Scripted(["raise", "raise", "raise"])
    report = send_batch(connector, msgs(1, "sms"), policy=FAST, sleep=lambda s: None)
    assert connector.calls == [["d0"]]
    assert report.results[0].status is Status.UNKNOWN
    assert "RuntimeError" in report.results[0].reason
    hooks = Scripted(["raise", "sent"])
    report = send_batch(hooks, msgs(1, "webhook"), policy=FAST, sleep=lambda s: None)
    assert report.results[0].status is Status.SENT and len(hooks.calls) == 2


def test_configuration_errors_still_raise():
    with pytest.raises(ConnectorConfigError):
        send_batch(Scripted(["config"]), msgs(1, "ads"), policy=FAST, sleep=lambda s: None)


def test_non_ambiguous_answers_are_retried_in_the_call():
    connector = Scripted(["refused", "throttled", "sent"])
    report = send_batch(connector, msgs(1), policy=FAST, sleep=lambda s: None)
    assert len(connector.calls) == 3 and report.results[0].status is Status.SENT


# --- halting ----------------------------------------------------------------------------------------------


def test_401_halts_at_once_and_keeps_earlier_results():
    # d0 sent, d1 invalid (per recipient), d2 ambiguous, d3 gets the 401; d4.. never attempted.
    connector = Scripted(["sent", "invalid", "ambiguous", "401"])
    report = send_batch(connector, msgs(8, "sms"), policy=FAST, sleep=lambda s: None)
    assert connector.calls == [["d0"], ["d1"], ["d2"], ["d3"]]
    statuses = [r.status for r in report.results]
    assert statuses == [Status.SENT, Status.FAILED, Status.UNKNOWN] + [Status.RETRYABLE] * 5
    assert report.halted and "401" in report.halted and "key revoked" in report.halted
    assert all(r.reason == report.halted for r in report.results[3:])
    assert report.results[1].reason == "invalid number"


def test_401_in_a_batch_request_halts_the_whole_chunk():
    connector = Scripted(["sent", "401"], batch=3)
    report = send_batch(connector, msgs(9), policy=FAST, sleep=lambda s: None)
    assert connector.calls == [["d0", "d1", "d2"], ["d3", "d4", "d5"]]
    assert [r.status for r in report.results] == [Status.SENT] * 3 + [Status.RETRYABLE] * 6
    assert report.halted


def test_per_recipient_failures_do_not_halt():
    report = send_batch(Scripted(["invalid"] * 3), msgs(3), policy=FAST, sleep=lambda s: None)
    assert [r.status for r in report.results] == [Status.FAILED] * 3 and report.halted is None


def test_provider_down_halts_after_bounded_retries():
    connector = Scripted(["refused"] * 100)
    sleeps: list[float] = []
    policy = RetryPolicy(attempts_per_send=4, base_delay=0.25)
    report = send_batch(connector, msgs(50), policy=policy, sleep=sleeps.append, rng=lambda: 1.0)
    assert connector.calls == [["d0"]] * 4  # not 50 x 4 attempts against a dead provider
    assert sleeps == [0.25, 0.5, 1.0]
    assert report.halted and "unavailable" in report.halted and "connection refused" in report.halted
    assert all(r.status is Status.RETRYABLE and r.reason == report.halted for r in report.results)
    assert all(r.retry_after and r.retry_after > 0 for r in report.results)


def test_provider_down_midway_keeps_what_was_sent():
    connector = Scripted(["sent", "sent"] + ["refused"] * 10)
    report = send_batch(connector, msgs(5), policy=FAST, sleep=lambda s: None)
    assert [r.status for r in report.results] == [Status.SENT] * 2 + [Status.RETRYABLE] * 3
    assert report.halted and len(connector.calls) == 2 + FAST.attempts_per_send


def test_a_throttling_provider_is_not_down():
    connector = Scripted(["throttled"] * 100)
    report = send_batch(connector, msgs(2), policy=FAST, sleep=lambda s: None)
    assert report.halted is None
    assert [r.status for r in report.results] == [Status.RETRYABLE] * 2


def test_an_at_least_once_provider_failing_with_5xx_throughout_is_down():
    connector = Scripted(["ambiguous"] * 100)
    report = send_batch(connector, msgs(3, "webhook"), policy=FAST, sleep=lambda s: None)
    assert report.halted and len(connector.calls) == FAST.attempts_per_send


@pytest.mark.parametrize("status", [401, 403])
def test_auth_statuses_halt_and_redirects_fail(status):
    assert classify_status(status).halt and classify_status(status).status is Status.FAILED
    assert not classify_status(400).halt
    redirect = classify_status(302)
    assert redirect.status is Status.FAILED and "redirect" in redirect.reason and not redirect.halt
    assert classify_status(429).throttled and not classify_status(429).ambiguous
    assert classify_status(502).ambiguous


# --- redaction of encoded secrets ------------------------------------------------------------------------


def test_every_encoded_form_of_a_secret_is_redacted():
    secret = "tok/en+with=odd&chars-0123"
    register_secret(secret)
    forms = [
        secret,
        quote(secret, safe=""),
        quote(secret, safe="").lower().replace("tok", "tok"),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
    ]
    for form in forms:
        assert form not in redact(f"error: {form} echoed"), form


def test_basic_auth_is_redacted_in_every_form(caplog):
    header = register_basic_auth("AC" + "1" * 32, "basic-auth-secret-xyz")
    encoded = header.split()[1]
    caplog.set_level(logging.DEBUG)
    text = f"Authorization: {header}; url {quote(header)}; json {json.dumps({'h': header})}"
    assert encoded not in redact(text) and quote(encoded, safe="") not in redact(text)
    logging.getLogger("anything.at.all").warning("echo %s / %s", header, quote_plus(encoded))
    assert encoded not in caplog.text and quote_plus(encoded) not in caplog.text
    assert "basic-auth-secret-xyz" not in caplog.text


def test_reasons_are_redacted_on_construction():
    register_secret("reason-secret-value")
    result = Result.failed("d", "provider said reason-secret-value")
    assert "reason-secret-value" not in result.reason
