"""The shared layer: Retry-After parsing, backoff, throttling, secret redaction, retry bookkeeping."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from pydantic import SecretStr

from connectors import Message, Result, RetryPolicy, Status, send_batch
from connectors.base import Connector, classify_status, parse_retry_after, reveal
from omni.core.settings import Settings


def test_retry_after_seconds_date_and_ratelimit_reset():
    assert parse_retry_after({"Retry-After": "12"}) == 12
    assert parse_retry_after({"retry-after": "Tue, 02 Jun 2026 10:00:30 GMT"}, now=1_780_394_400) == 30
    assert parse_retry_after({"X-RateLimit-Reset": "1780394460"}, now=1_780_394_400) == 60
    assert parse_retry_after({"X-RateLimit-Reset": "5"}) == 5
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "soon"}) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (202, Status.SENT),
        (400, Status.FAILED),
        (401, Status.FAILED),
        (404, Status.FAILED),
        (408, Status.RETRYABLE),
        (429, Status.RETRYABLE),
        (500, Status.RETRYABLE),
        (502, Status.RETRYABLE),
        (503, Status.RETRYABLE),
    ],
)
def test_default_classification(status, expected):
    assert classify_status(status).status is expected


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(base_delay=1, max_delay=10)
    assert [policy.backoff(n, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert policy.backoff(3, lambda: 0.5) == 2


def test_delivery_attempts_are_a_setting_apart_from_the_tries_of_one_send(monkeypatch):
    assert RetryPolicy().attempts_per_send == 3 and Settings().delivery_attempts == 5
    monkeypatch.setenv("OMNI_MAX_SEND_ATTEMPTS", "7")  # the former name is still read
    assert Settings().delivery_attempts == 7
    monkeypatch.setenv("OMNI_DELIVERY_ATTEMPTS", "8")
    assert Settings().delivery_attempts == 8
    assert Settings(delivery_attempts=2).delivery_attempts == 2


class Scripted(Connector):
    provider = "scripted"
    channel = "email"
    max_batch_size = 2
    rate_per_second = 10.0

    def __init__(self, answers):
        self.answers = list(answers)
        self.calls: list[list[str]] = []

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        self.calls.append([m.delivery_id for m in batch])
        status = self.answers.pop(0) if self.answers else "sent"
        if status == "sent":
            return [Result.sent(m.delivery_id, "x") for m in batch]
        if status == "ambiguous":
            return [Result.retryable(m.delivery_id, "timeout", ambiguous=True) for m in batch]
        return [Result.retryable(m.delivery_id, "throttled", retry_after=1) for m in batch]


def messages(n):
    return [Message(delivery_id=f"d{i}", channel="email", to=f"{i}@x.org") for i in range(n)]


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_throttle_spaces_calls_at_the_rate():
    clock = Clock()
    report = send_batch(Scripted([]), messages(6), sleep=clock.sleep, clock=clock)
    assert report.calls == 3
    assert clock.sleeps == pytest.approx([0.2, 0.2])  # 2 messages per call at 10/s


def test_only_retryable_messages_are_resent():
    connector = Scripted(["sent", "throttled", "sent"])
    clock = Clock()
    report = send_batch(
        connector, messages(4), sleep=clock.sleep, clock=clock, policy=RetryPolicy(base_delay=0)
    )
    assert connector.calls == [["d0", "d1"], ["d2", "d3"], ["d2", "d3"]]
    assert [r.status for r in report.results] == [Status.SENT] * 4


def test_ambiguous_results_are_never_retried_for_at_most_once_channels():
    connector = Scripted(["ambiguous"])
    report = send_batch(connector, messages(1), sleep=lambda s: None, policy=RetryPolicy(attempts_per_send=5))
    assert connector.calls == [["d0"]]
    [result] = report.results
    assert result.status is Status.UNKNOWN and result.ambiguous
    assert "not resent (at most once)" in result.reason
    assert report.halted is None


def test_retry_ambiguous_is_no_longer_a_policy_knob():
    with pytest.raises(TypeError):
        RetryPolicy(retry_ambiguous=True)  # type: ignore[call-arg]


def test_duplicate_delivery_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        send_batch(Scripted([]), messages(1) * 2)


def test_revealed_secrets_are_redacted_from_library_logs(caplog):
    secret = SecretStr("sk-live-abcdef123456")
    value = reveal(secret)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("urllib3.connectionpool").debug("HEADERS: {'Authorization': 'Bearer %s'}", value)
    assert value not in caplog.text
    assert "**********" in caplog.text
