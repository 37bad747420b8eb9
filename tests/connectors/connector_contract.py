"""The contract every connector's tests inherit (``class TestX(ConnectorContract)``).

A subclass says how to build its connector against a fake server and what a valid message, a
throttled answer and a permanent error look like; the suite checks the rest: masked secrets in
``repr`` / logs / reasons, batching at the limit, retryable vs permanent classification, 429 with
Retry-After, 500, timeouts, connection refused, the shared retry loop, and start-up configuration errors.
No test reaches the real network or sleeps: ``send_batch`` gets a recording ``sleep``.

Delivery semantics: for the at-most-once channels (email, SMS, push) every ambiguous answer (accepted
then 5xx, the connection dropped or reset after the request was read, an answer after the client's
timeout) reaches the provider exactly once and comes back ``unknown``; for the at-least-once channels
(ads, webhook) it is retried. A revoked credential halts at once; a provider that refuses connections
throughout halts after the bounded retries; no connector follows a redirect.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
from connector_fakes import RawServer, refused_url, silent_server

from connectors import REGISTRY, ConnectorConfigError, Message, RetryPolicy, Status, get_connector, send_batch
from omni.core.channels import at_most_once
from omni.core.settings import Settings


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


FAST = RetryPolicy(attempts_per_send=3, base_delay=0.0, max_inline_delay=5.0)


class ConnectorContract:
    provider: ClassVar[str]
    fake_class: ClassVar[type]
    batch_limit: ClassVar[int]
    channel: ClassVar[str]
    # (settings kwargs that select the provider but leave a secret out, the OMNI_ name expected)
    missing_setting: ClassVar[tuple[dict, str]]

    # --- what a subclass provides ---------------------------------------------------------------------

    def make_connector(self, fake: Any, base_url: str | None = None, timeout: float = 5.0):
        raise NotImplementedError

    def message(self, index: int) -> Message:
        raise NotImplementedError

    def secrets(self, fake: Any) -> list[str]:
        raise NotImplementedError

    def requests_for(self, count: int) -> int:
        """Provider requests needed for ``count`` valid messages."""
        return -(-count // self.batch_limit)

    def throttled(self, fake: Any, retry_after: int) -> None:
        fake.script(429, {"message": "too many requests"}, {"Retry-After": str(retry_after)})

    def permanent(self, fake: Any) -> None:
        raise NotImplementedError

    def provider_requests(self, fake: Any) -> list:
        return [r for r in fake.requests if r.path != "/token"]

    # --- fixtures -----------------------------------------------------------------------------------

    @pytest.fixture
    def fake(self, httpserver):
        return self.fake_class(httpserver)

    @pytest.fixture
    def connector(self, fake):
        connector = self.make_connector(fake)
        yield connector
        connector.close()

    # --- the contract -------------------------------------------------------------------------------

    def test_registered_under_its_provider(self):
        cls = REGISTRY[self.provider]
        assert cls.provider == self.provider
        assert self.channel in cls.channels
        assert cls.max_batch_size == self.batch_limit
        # Registry key = module name (sendgrid's module is sendgrid_email: `sendgrid` is the library).
        module = cls.__module__.rsplit(".", 1)[-1]
        assert module == {"sendgrid": "sendgrid_email"}.get(self.provider, self.provider)

    def test_missing_setting_fails_at_construction_naming_it(self):
        kwargs, name = self.missing_setting
        with pytest.raises(ConnectorConfigError, match=name):
            get_connector(self.channel, Settings(**kwargs))

    def test_sends_one_message(self, fake, connector):
        [result] = connector.send([self.message(0)])
        assert result.status is Status.SENT, result.reason
        assert result.delivery_id == self.message(0).delivery_id
        assert result.provider_id
        assert len(self.provider_requests(fake)) == 1

    def test_repr_and_str_mask_secrets(self, fake, connector):
        for text in (repr(connector), str(connector)):
            for secret in self.secrets(fake):
                assert secret not in text
        assert "**********" in repr(connector)

    def test_secrets_never_in_logs_or_reasons(self, fake, connector, caplog):
        caplog.set_level(logging.DEBUG)
        self.permanent(fake)
        results = connector.send([self.message(0)]) + connector.send([self.message(1)])
        text = caplog.text + repr(results)
        for secret in self.secrets(fake):
            assert secret not in text

    def test_batch_over_the_limit_is_refused(self, connector):
        messages = [self.message(i) for i in range(self.batch_limit + 1)]
        with pytest.raises(ValueError, match="max_batch_size"):
            connector.send(messages)

    def test_send_batch_splits_at_the_limit(self, fake, connector):
        count = self.batch_limit + 1 if self.batch_limit > 1 else 3
        messages = [self.message(i) for i in range(count)]
        report = send_batch(connector, messages, policy=FAST, sleep=Sleeps())
        assert [r.status for r in report.results] == [Status.SENT] * count
        assert [r.delivery_id for r in report.results] == [m.delivery_id for m in messages]
        assert len(self.provider_requests(fake)) == self.requests_for(count)

    def test_429_is_retryable_with_retry_after(self, fake, connector):
        self.throttled(fake, 7)
        [result] = connector.send([self.message(0)])
        assert result.status is Status.RETRYABLE
        assert result.retry_after == 7
        assert not result.ambiguous

    def test_500_is_retryable(self, fake, connector):
        fake.script(500, {"error": "internal"})
        [result] = connector.send([self.message(0)])
        assert result.status is Status.RETRYABLE

    def test_documented_permanent_error_is_failed(self, fake, connector):
        self.permanent(fake)
        [result] = connector.send([self.message(0)])
        assert result.status is Status.FAILED
        assert result.reason

    def test_connection_refused_is_retryable(self, fake):
        connector = self.make_connector(fake, base_url=refused_url())
        [result] = connector.send([self.message(0)])
        assert result.status is Status.RETRYABLE
        assert "refused" in result.reason

    def test_timeout_is_retryable_and_ambiguous(self, fake):
        with silent_server() as url:
            connector = self.make_connector(fake, base_url=url, timeout=0.05)
            [result] = connector.send([self.message(0)])
        assert result.status is Status.RETRYABLE
        assert result.ambiguous

    def test_shared_retry_loop_absorbs_a_short_throttle(self, fake, connector):
        self.throttled(fake, 2)
        sleeps = Sleeps()
        report = send_batch(connector, [self.message(0)], policy=FAST, sleep=sleeps)
        assert report.results[0].status is Status.SENT
        assert sleeps == [2.0]
        assert report.attempts == 2

    def test_long_throttle_is_left_for_a_later_tick(self, fake, connector):
        self.throttled(fake, 120)
        sleeps = Sleeps()
        report = send_batch(connector, [self.message(0)], policy=FAST, sleep=sleeps)
        assert report.results[0].status is Status.RETRYABLE
        assert report.results[0].retry_after == 120
        assert sleeps == []

    def test_retries_are_capped(self, fake, connector):
        for _ in range(5):
            self.throttled(fake, 1)
        sleeps = Sleeps()
        report = send_batch(connector, [self.message(0)], policy=FAST, sleep=sleeps)
        assert report.results[0].status is Status.RETRYABLE
        assert report.attempts == FAST.attempts_per_send
        assert len(self.provider_requests(fake)) == FAST.attempts_per_send
        assert report.halted is None  # a throttling provider is up: not halted

    # --- at most once vs at least once ----------------------------------------------------------------

    def revoked(self, fake: Any) -> None:
        """Queue the provider's answer to a revoked / invalid credential."""
        fake.script(401, {"error": "unauthorized"})

    def warm(self, connector: Any) -> None:
        """Anything to do before a tiny client timeout applies (FCM: fetch the OAuth token first)."""

    def expected_requests(self) -> int:
        return 1 if at_most_once(self.channel) else FAST.attempts_per_send

    def assert_once_or_retried(self, report, seen: int) -> None:
        [result] = report.results
        if at_most_once(self.channel):
            assert seen == 1, f"an ambiguous {self.channel} request was sent {seen} times"
            assert result.status is Status.UNKNOWN, result
            assert result.ambiguous
            assert "not resent (at most once)" in result.reason
            assert report.halted is None
        else:
            assert seen == FAST.attempts_per_send  # at least once: retried
            assert result.status is Status.RETRYABLE

    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    def test_accepted_then_5xx(self, fake, connector, status):
        for _ in range(FAST.attempts_per_send):
            fake.script(status, {"error": "internal"})
        report = send_batch(connector, [self.message(0)], policy=FAST, sleep=Sleeps())
        self.assert_once_or_retried(report, len(self.provider_requests(fake)))

    @pytest.mark.parametrize("mode", ["drop", "reset"])
    def test_connection_dropped_after_the_request_was_read(self, fake, mode):
        with RawServer(mode) as server:
            connector = self.make_connector(fake, base_url=server.url, timeout=2.0)
            report = send_batch(connector, [self.message(0)], policy=FAST, sleep=Sleeps())
            connector.close()
            self.assert_once_or_retried(report, server.seen(self.expected_requests()))

    def test_answer_after_the_clients_timeout(self, fake):
        with RawServer("late", delay=0.3) as server:
            connector = self.make_connector(fake, base_url=server.url, timeout=0.05)
            self.warm(connector)
            report = send_batch(connector, [self.message(0)], policy=FAST, sleep=Sleeps())
            connector.close()
            self.assert_once_or_retried(report, server.seen(self.expected_requests()))

    def test_unknown_is_never_resent_by_any_policy(self, fake, connector):
        fake.script(500, {"error": "internal"})
        fake.script(500, {"error": "internal"})
        policy = RetryPolicy(attempts_per_send=10, base_delay=0.0, max_inline_delay=60.0)
        report = send_batch(connector, [self.message(0)], policy=policy, sleep=Sleeps())
        if at_most_once(self.channel):
            assert len(self.provider_requests(fake)) == 1
            assert report.results[0].status is Status.UNKNOWN
        else:
            assert report.results[0].status is Status.SENT

    def test_429_then_sent(self, fake, connector):
        self.throttled(fake, 0)
        report = send_batch(connector, [self.message(0)], policy=FAST, sleep=Sleeps())
        assert report.results[0].status is Status.SENT
        assert len(self.provider_requests(fake)) == 2

    # --- halting --------------------------------------------------------------------------------------

    def test_revoked_credential_halts_at_once(self, fake, connector):
        self.revoked(fake)
        messages = [self.message(i) for i in range(5)]
        report = send_batch(connector, messages, policy=FAST, sleep=Sleeps())
        assert report.halted
        assert len(self.provider_requests(fake)) == 1  # not one request per message
        assert [r.status for r in report.results] == [Status.RETRYABLE] * 5
        assert all(r.reason == report.halted for r in report.results)
        assert not report.sent

    def test_connection_refused_throughout_halts_after_bounded_retries(self, fake):
        connector = self.make_connector(fake, base_url=refused_url())
        sleeps = Sleeps()
        policy = RetryPolicy(attempts_per_send=3, base_delay=0.5)
        messages = [self.message(i) for i in range(4)]
        report = send_batch(connector, messages, policy=policy, sleep=sleeps, rng=lambda: 1.0)
        assert report.halted and "refused" in report.halted
        assert report.calls == FAST.attempts_per_send  # the rest of the batch is not attempted
        assert [r.status for r in report.results] == [Status.RETRYABLE] * 4
        assert all(r.reason == report.halted for r in report.results)
        assert sleeps == [0.5, 1.0]  # exponential backoff between the bounded tries

    # --- redirects ------------------------------------------------------------------------------------

    def test_redirect_to_another_origin_is_never_followed(self, fake, connector):
        with RawServer("drop") as other:
            fake.script(302, b"", {"Location": other.url + "/steal"})
            report = send_batch(connector, [self.message(0)], policy=FAST, sleep=Sleeps())
            assert other.requests == []  # neither the credentials nor the request went there
        [result] = report.results
        assert result.status is Status.FAILED
        assert "redirect" in result.reason
        assert len(self.provider_requests(fake)) == 1
