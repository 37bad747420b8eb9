"""What a tick does with a provider's answer, against a local server speaking SendGrid's contract: an answer
that may mean the email went out is recorded ``unknown`` and never resent; an answer that means the
connector cannot send at all (a revoked key, a provider down) fails the tick, marks nothing sent and leaves
the deliveries due for the first tick after the cause is fixed. On SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from journey_kit import T0, cart_campaign, customer, deliveries, seed_stores
from werkzeug import Response

from omni.core.settings import Settings
from sequences.enrollment import is_held_out
from sequences.reports import DeliveryHalted
from sequences.tick import run_tick

FLAGSHIP = ["abandoned_cart"]


@pytest.fixture
def sendgrid(engine, httpserver, monkeypatch):
    """The store with two cart abandoners, and email going to a fake SendGrid whose answers a test sets."""
    from omni.core.settings import get_settings

    seed_stores(engine)
    for n in (1, 2):
        assert not is_held_out(n, "abandoned_cart", 10.0)
        customer(engine, n)
    monkeypatch.setenv("OMNI_EMAIL_CONNECTOR", "sendgrid")
    monkeypatch.setenv("OMNI_SENDGRID_API_KEY", "SG.test-key")
    monkeypatch.setenv("OMNI_SENDGRID_BASE_URL", httpserver.url_for("/").rstrip("/"))
    monkeypatch.setenv("OMNI_EMAIL_FROM", "shop@example.org")
    get_settings.cache_clear()
    yield engine
    get_settings.cache_clear()


def _tick(engine, at):
    return run_tick(engine, now=at, names=FLAGSHIP, sleep=lambda _s: None, settings=Settings())


def _emails(engine):
    return sorted((d.customer_id, d.status, d.attempts) for d in deliveries(engine) if d.channel == "email")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_server_error_after_the_request_is_unknown_and_never_resent(sendgrid, httpserver, status):
    requests = []

    def accepted_then_error(request):
        requests.append(request.get_json())
        return Response('{"errors":[{"message":"internal"}]}', status=status)

    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_handler(accepted_then_error)
    report = _tick(sendgrid, T0)
    assert len(requests) == 1  # not retried within the call
    counts = report.sequences["abandoned_cart"].steps["cart_email"]
    assert (counts.unknown, counts.sent, counts.retrying) == (2, 0, 0)
    assert _emails(sendgrid) == [(1, "unknown", 1), (2, "unknown", 1)]
    assert all("not resent" in d.error or "may have" in d.error for d in deliveries(sendgrid))
    _tick(sendgrid, T0 + timedelta(hours=2))
    assert len(requests) == 1  # nor on a later tick
    # The journey goes on past an unknown email, as after a crash.
    report = _tick(sendgrid, T0 + timedelta(days=1, minutes=5))
    assert report.sequences["abandoned_cart"].steps["retarget"].added == 2


def test_a_dropped_connection_after_sending_is_unknown(sendgrid, httpserver):
    requests = []

    def hang_up(request):
        requests.append(1)
        raise ConnectionAbortedError("dropped")  # werkzeug closes the connection without an answer

    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_handler(hang_up)
    _tick(sendgrid, T0)
    _tick(sendgrid, T0 + timedelta(hours=2))
    assert len(requests) == 1
    assert [status for _, status, _ in _emails(sendgrid)] == ["unknown", "unknown"]


@pytest.mark.parametrize("status", [401, 403])
def test_a_revoked_key_fails_the_tick_and_leaves_the_emails_due(sendgrid, httpserver, status):
    answers = [
        Response('{"errors":[{"message":"The provided authorization grant is invalid"}]}', status=status)
    ]

    def handler(request):
        return answers[0]

    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_handler(handler)
    with pytest.raises(DeliveryHalted) as raised:
        _tick(sendgrid, T0)
    assert "email" in str(raised.value) and str(status) in str(raised.value)
    assert raised.value.report.halted.keys() == {"email"}
    assert _emails(sendgrid) == [(1, "pending", 0), (2, "pending", 0)]  # nothing sent, no attempt spent
    with pytest.raises(DeliveryHalted):  # still revoked: still failing, still nothing lost
        _tick(sendgrid, T0 + timedelta(minutes=5))
    answers[0] = Response("", status=202, headers={"X-Message-Id": "sg-1"})  # the key is fixed
    report = _tick(sendgrid, T0 + timedelta(minutes=10))
    assert report.sequences["abandoned_cart"].steps["cart_email"].sent == 2
    assert _emails(sendgrid) == [(1, "sent", 1), (2, "sent", 1)]


def test_a_provider_down_fails_the_tick_and_leaves_the_emails_due(sendgrid, monkeypatch):
    import socket

    from omni.core.settings import get_settings

    with socket.socket() as closed:  # a port nobody listens on: connection refused, nothing was sent
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("OMNI_SENDGRID_BASE_URL", f"http://127.0.0.1:{port}")
    get_settings.cache_clear()
    with pytest.raises(DeliveryHalted) as raised:
        _tick(sendgrid, T0)
    assert "email" in raised.value.report.halted
    assert _emails(sendgrid) == [(1, "pending", 0), (2, "pending", 0)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_run_sequences_flow_and_its_dispatch_task_end_failed_with_the_reason(
    prefect_harness, sendgrid, httpserver, database_url
):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.run_sequences import run_sequences

    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_response(
        Response('{"errors":[{"message":"access forbidden"}]}', status=403)
    )
    state = run_sequences(now=T0, names=FLAGSHIP, database_url=database_url, return_state=True)
    assert state.is_failed()
    assert "email" in state.message and "403" in state.message

    async def task_states():
        # The server records task runs from events, a little after the flow returns: poll, bounded.
        async with get_client() as client:
            for _ in range(120):
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                seen = {(run.name.rsplit("-", 1)[0], run.state_type and run.state_type.value) for run in runs}
                if ("dispatch-deliveries", "FAILED") in seen:
                    return seen
                await asyncio.sleep(0.25)
            return seen

    assert ("dispatch-deliveries", "FAILED") in asyncio.run(task_states())
    assert _emails(sendgrid) == [(1, "pending", 0), (2, "pending", 0)]


@pytest.mark.parametrize(
    "hostile",
    [
        "{% for i in range(10**9) %}x{% endfor %}",
        "{{ 2**100000 }}",
        "{{ 'x' * 10**9 }}",
        "{% for i in range(9999) %}{% for j in range(9999) %}{{ i }}{% endfor %}{% endfor %}",
    ],
)
def test_a_template_broken_for_everyone_fails_its_deliveries_once_and_the_tick_goes_on(
    engine, monkeypatch, tmp_path, hostile
):
    """The tick ends normally: the cart emails fail visibly with the reason, the other journey still
    sends, and a later tick does not try them again."""
    import shutil

    from journey_kit import outbox

    from omni.core.settings import get_settings
    from profiles.ingest import ingest_payloads
    from templates.rendering import templates_dir

    folder = tmp_path / "templates"
    shutil.copytree(templates_dir(), folder)
    (folder / "email" / "abandoned_cart.html.j2").write_text(hostile)
    monkeypatch.setenv("OMNI_TEMPLATES_DIR", str(folder))
    get_settings.cache_clear()
    seed_stores(engine)
    for n in (1, 2):
        customer(engine, n)
    ingest_payloads(  # customer 2's pickup order is ready: the other journey
        engine,
        [
            {
                "type": "track",
                "userId": "user-2",
                "event": "Order Completed",
                "messageId": "pickup-order",
                "timestamp": (T0 - timedelta(hours=3)).isoformat(),
                "properties": {"order_id": "P1", "total": 20, "fulfillment": "pickup", "store_id": "nyc"},
            },
            {
                "type": "track",
                "userId": "user-2",
                "event": "Order Updated",
                "messageId": "pickup-ready",
                "timestamp": (T0 - timedelta(hours=1)).isoformat(),
                "properties": {"order_id": "P1", "status": "ready_for_pickup"},
            },
        ],
        now=T0,
    )
    try:
        report = run_tick(
            engine,
            now=T0,
            settings=Settings(),
            names=["abandoned_cart", "pickup_ready"],
            sleep=lambda _s: None,
        )
        assert report.sequences["abandoned_cart"].steps["cart_email"].failed == 2
        assert report.sequences["pickup_ready"].steps["ready_email"].sent == 1
        failed = [d for d in deliveries(engine) if d.template == "email/abandoned_cart"]
        assert [d.status for d in failed] == ["failed", "failed"] and all(d.error for d in failed)
        assert [m.template for m in outbox(engine, "email")] == ["email/pickup_ready"]
        again = run_tick(
            engine,
            now=T0 + timedelta(hours=1),
            settings=Settings(),
            names=["abandoned_cart"],
            sleep=lambda _s: None,
        )
        assert again.sequences["abandoned_cart"].steps["cart_email"].failed == 0
    finally:
        get_settings.cache_clear()


def test_a_campaign_on_a_revoked_key_fails_the_command_and_keeps_its_deliveries_due(
    sendgrid, httpserver, database_url, tmp_path, monkeypatch
):
    import json

    from typer.testing import CliRunner

    from omni.cli import app

    cart_campaign(tmp_path, monkeypatch, "cart_nudge")
    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_response(
        Response('{"errors":[{"message":"The provided authorization grant is invalid"}]}', status=401)
    )
    args = ["campaigns", "send", "cart_nudge", "--database-url", database_url, "--now", T0.isoformat()]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert (body["created"], body["sent"], list(body["halted"])) == (2, 0, ["email"])
    assert "401" in result.stderr and "Traceback" not in result.output
    assert _emails(sendgrid) == [(1, "pending", 0), (2, "pending", 0)]
