"""The sequence engine's guarantees, on SQLite and PostgreSQL, with explicit ``now`` (no sleeps)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from journey_kit import (
    T0,
    buy,
    customer,
    deliveries,
    enrollments,
    no_sleep,
    outbox,
    seed_stores,
    timeline,
)

from connectors import Connector
from omni.core.settings import Settings
from profiles.outbox import OutboxRecorder
from sequences.definitions import parse_sequence
from sequences.enrollment import holdout_bucket, is_held_out
from sequences.gate import DeliveryPolicy
from sequences.tick import run_tick

FLAGSHIP = ["abandoned_cart"]


def tick(engine, at, **kwargs):
    kwargs.setdefault("names", FLAGSHIP)
    kwargs.setdefault("settings", Settings())
    return run_tick(engine, now=at, sleep=no_sleep, **kwargs)


def held_out_number(percent: float = 10.0) -> tuple[int, int]:
    """(n, customer id) of a customer whose id falls in the holdout (ids are 1, 2, ... in order)."""
    for customer_id in range(1, 200):
        if is_held_out(customer_id, "abandoned_cart", percent):
            return customer_id, customer_id
    raise AssertionError("no held-out id")


def first_messaged_ids(count: int) -> list[int]:
    return [i for i in range(1, 100) if not is_held_out(i, "abandoned_cart", 10.0)][:count]


@pytest.fixture
def store(engine):
    seed_stores(engine)
    return engine


def make_customers(engine, ids: list[int], **kwargs) -> dict[int, str]:
    """Customers whose database ids are exactly ``ids`` (fillers in between get no cart and no email)."""
    users = {}
    for n in range(1, max(ids) + 1):
        if n in ids:
            users[n] = customer(engine, n, **kwargs)
        else:
            customer(engine, n, email=False, sms=False, push=False)
    return users


def test_flagship_journey_step_by_step(store):
    [n] = first_messaged_ids(1)
    make_customers(store, [n])

    first = tick(store, T0)
    assert first.sequences["abandoned_cart"].enrolled >= 1
    [email] = outbox(store, "email")
    assert (email.customer_id, email.recipient, email.template) == (
        n,
        f"cust{n}@example.org",
        "email/abandoned_cart",
    )
    assert "Black Tee" in (email.body or "")

    tick(store, T0 + timedelta(hours=12))  # waiting a day: nothing new
    assert len(outbox(store)) == 1

    tick(store, T0 + timedelta(days=1))
    [ad] = outbox(store, "ads")
    assert (ad.customer_id, ad.recipient, ad.body) == (n, "cart_retargeting", "add")

    tick(store, T0 + timedelta(days=3))
    [sms] = outbox(store, "sms")
    assert sms.recipient == f"+1212555{1000 + n}"
    assert "Omni SoHo" in sms.body  # names the customer's store
    [enrollment] = [e for e in enrollments(store) if e.customer_id == n]
    assert enrollment.status == "completed"
    sent_events = timeline(store, ("Email Sent", "Audience Synced", "SMS Sent"))
    assert [(e.name, e.channel) for e in sent_events] == [
        ("Email Sent", "email"),
        ("Audience Synced", "social"),
        ("SMS Sent", "sms"),
    ]
    # Nothing is sent twice, however often it ticks.
    tick(store, T0 + timedelta(days=3, minutes=5))
    tick(store, T0 + timedelta(days=10))
    assert len(outbox(store)) == 3


def test_in_store_purchase_between_steps_exits_and_removes_from_the_ad_audience(store):
    [n] = first_messaged_ids(1)
    users = make_customers(store, [n])
    tick(store, T0)
    tick(store, T0 + timedelta(days=1))
    assert [m.body for m in outbox(store, "ads")] == ["add"]

    buy(store, users[n], T0 + timedelta(days=1, hours=4), channel="store")  # at the till, no cart id
    report = tick(store, T0 + timedelta(days=1, hours=5))
    assert report.sequences["abandoned_cart"].exit_reasons == {"event: Order Completed": 1}
    [enrollment] = [e for e in enrollments(store) if e.customer_id == n]
    assert (enrollment.status, enrollment.exit_reason) == ("exited", "event: Order Completed")
    assert [m.body for m in outbox(store, "ads")] == ["add", "remove"]

    tick(store, T0 + timedelta(days=3))
    tick(store, T0 + timedelta(days=5))
    assert outbox(store, "sms") == [] and outbox(store, "push") == []


def test_holdout_is_recorded_counted_and_never_messaged(store):
    held_id, _ = held_out_number()
    make_customers(store, [held_id])
    report = tick(store, T0)
    assert report.sequences["abandoned_cart"].held_out == 1
    held = [e for e in enrollments(store) if e.customer_id == held_id]
    assert [e.status for e in held] == ["holdout"]
    for day in (1, 3, 5):
        tick(store, T0 + timedelta(days=day))
    assert [m for m in outbox(store) if m.customer_id == held_id] == []
    # Deterministic: the same customer is held out in any run, in SQL and in Python alike.
    assert holdout_bucket(held_id, "abandoned_cart") < 1000


def test_quiet_hours_postpone_to_the_customers_morning(store):
    [n] = first_messaged_ids(1)
    # 02:00 UTC is 22:00 in New York (quiet) but 03:00 in Lisbon... pick a Lisbon customer at 22:30 local.
    at = T0.replace(hour=21, minute=30)  # 22:30 in Lisbon (UTC+1 in June), 17:30 in New York
    make_customers(store, [n], store="lis", cart_at=at - timedelta(hours=2))
    report = tick(store, at)
    assert report.sequences["abandoned_cart"].steps["cart_email"].postponed == 1
    assert outbox(store) == []
    [delivery] = [d for d in deliveries(store) if d.customer_id == n]
    assert delivery.status == "pending"
    assert delivery.next_attempt_at == at.replace(hour=8, minute=0) + timedelta(days=1)  # 09:00 Lisbon
    tick(store, at + timedelta(hours=10))  # 08:30 Lisbon: still quiet
    assert outbox(store) == []
    tick(store, at + timedelta(hours=10, minutes=35))  # 09:05 Lisbon
    assert [m.customer_id for m in outbox(store, "email")] == [n]


def test_frequency_cap_counts_every_channel(store):
    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    tight = DeliveryPolicy(frequency_cap=1)
    tick(store, T0, policy=tight)
    assert len(outbox(store, "email")) == 1
    # An SMS campaign-like sequence that fires at once would be the second message within 24 h.
    sms_now = parse_sequence(
        {
            "name": "sms_now",
            "trigger": {"audience": "cart_abandoners"},
            "steps": [{"id": "text", "send": {"channel": "sms", "template": "sms/pickup_reminder"}}],
        },
        file="sms_now.yaml",
    )
    from sequences.definitions import load_sequences

    both = {**load_sequences(), "sms_now": sms_now}
    report = tick(store, T0 + timedelta(hours=1), policy=tight, sequences=both, names=["sms_now"])
    assert report.sequences["sms_now"].steps["text"].postponed == 1
    assert outbox(store, "sms") == []
    tick(store, T0 + timedelta(hours=24, minutes=1), policy=tight, sequences=both, names=["sms_now"])
    assert len(outbox(store, "sms")) == 1


def test_fallback_to_push_when_sms_is_not_allowed(store):
    [n] = first_messaged_ids(1)
    make_customers(store, [n], sms=False)
    for day in (0, 1, 3):
        tick(store, T0 + timedelta(days=day))
    assert outbox(store, "sms") == []
    [push] = outbox(store, "push")
    assert (push.customer_id, push.recipient) == (n, f"token-{n}")
    steps = {d.step_id: (d.status, d.error) for d in deliveries(store) if d.customer_id == n}
    assert steps["pickup_reminder"][0] == "skipped" and "sms consent" in steps["pickup_reminder"][1]
    assert steps["pickup_reminder/fallback"] == ("sent", None)


class CrashingConnector(Connector):
    """Stands for a process that dies after claiming, before the provider is called."""

    provider = "crashing"
    channel = "email"
    channels = ("email", "sms", "push", "ads")
    max_batch_size = 1000

    @classmethod
    def from_settings(cls, settings, **kwargs):
        return cls()

    def send(self, batch):
        raise SystemExit("killed")


def test_crash_between_claim_and_send_marks_unknown_and_never_resends(store):
    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    with pytest.raises(SystemExit):
        tick(store, T0, connectors={"email": CrashingConnector()})
    [claimed] = [d for d in deliveries(store) if d.customer_id == n]
    assert claimed.status == "sending"
    report = tick(store, T0 + timedelta(minutes=15))
    assert report.sequences["abandoned_cart"].steps["cart_email"].unknown == 1
    [after] = [d for d in deliveries(store) if d.customer_id == n]
    assert after.status == "unknown"
    assert outbox(store, "email") == []  # at most once: not resent
    tick(store, T0 + timedelta(days=1, minutes=15))  # the journey goes on, a day after the unknown email
    assert len(outbox(store, "ads")) == 1


class ReentrantOutbox(Connector):
    """Runs a second tick while the first one is sending: the claim must stop it from sending again."""

    provider = "reentrant"
    channel = "email"
    channels = ("email",)
    max_batch_size = 1000

    def __init__(self, engine, inner):
        self.engine, self.inner, self.nested = engine, inner, None

    @classmethod
    def from_settings(cls, settings, **kwargs):  # pragma: no cover - built directly
        raise NotImplementedError

    def send(self, batch):
        if self.nested is None:
            self.nested = tick(self.engine, T0)
        return self.inner.send(batch)


def test_two_ticks_at_once_never_double_send(store):
    from connectors.outbox import OutboxConnector

    ids = first_messaged_ids(3)
    make_customers(store, ids)
    connector = ReentrantOutbox(store, OutboxConnector(OutboxRecorder(store, clock=lambda: T0)))
    tick(store, T0, connectors={"email": connector})
    assert connector.nested is not None
    assert connector.nested.sequences["abandoned_cart"].steps["cart_email"].sent == 0
    assert sorted(m.customer_id for m in outbox(store, "email")) == sorted(ids)

    # And two real threads, on the next step.
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tick(store, T0 + timedelta(days=1)))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(m.customer_id for m in outbox(store, "ads")) == sorted(ids)


def test_provider_429_then_success_sends_once(store, httpserver):
    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    calls = []

    def handler(request):
        from werkzeug import Response

        calls.append(request.get_json())
        if len(calls) == 1:
            return Response(
                '{"errors":[{"message":"too many requests","field":null,"help":null}]}',
                status=429,
                headers={"Retry-After": "2", "Content-Type": "application/json"},
            )
        return Response("", status=202, headers={"X-Message-Id": "sg-123"})

    httpserver.expect_request("/v3/mail/send", method="POST").respond_with_handler(handler)
    settings = Settings(
        email_connector="sendgrid",
        sendgrid_api_key="SG.test-key",
        sendgrid_base_url=httpserver.url_for("/").rstrip("/"),
        email_from="shop@example.org",
    )
    waits = []
    report = run_tick(store, now=T0, names=FLAGSHIP, sleep=waits.append, settings=settings)
    assert len(calls) == 2  # the 429 was absorbed inside the tick
    assert waits and waits[0] >= 2  # Retry-After honoured
    assert report.sequences["abandoned_cart"].steps["cart_email"].sent == 1
    [delivery] = [d for d in deliveries(store) if d.customer_id == n]
    assert (delivery.status, delivery.provider_message_id, delivery.attempts) == ("sent", "sg-123", 1)
    run_tick(store, now=T0 + timedelta(minutes=5), names=FLAGSHIP, sleep=waits.append, settings=settings)
    assert len(calls) == 2


def test_messages_omni_sent_are_not_channels_the_customer_used(store):
    from sqlalchemy import select

    from audiences import compile_condition, load_audiences
    from profiles.db import session_scope

    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    for day in (0, 1, 3):
        tick(store, T0 + timedelta(days=day))
    assert {m.channel for m in outbox(store) if m.customer_id == n} == {"email", "ads", "sms"}
    # The shopper used one channel (web); Email Sent, Audience Synced and SMS Sent are Omni's touchpoints.
    engaged = compile_condition(
        {"channels_used": {"gte": 2, "within": "90d"}},
        now=T0 + timedelta(days=3),
        definitions=load_audiences(),
    )
    with session_scope(store) as session:
        assert n not in set(session.execute(select(engaged.subquery().c[0])).scalars())
        # `omni profile show` reads the customer's channels by the same rule.
        from profiles.timeline import customer_view

        assert customer_view(session, n)["channels"] == ["web"]


def test_a_guest_who_signs_in_keeps_the_journey_and_gets_no_second_cart_email(store):
    """A guest (anonymous, email given at checkout) abandons a cart and gets the cart email; then signs
    in as a known customer: the guest merges into them, the journey goes on under the survivor, and
    nothing of it starts again for the same person."""
    from profiles.ingest import ingest_payloads

    def ingest(at, *payloads):
        ingest_payloads(store, [{"timestamp": at.isoformat(), **p} for p in payloads], now=at)

    ingest(
        T0 - timedelta(days=10),
        {"type": "identify", "userId": "known-b", "messageId": "b1", "traits": {"first_name": "Bo"}},
    )
    ingest(
        T0 - timedelta(hours=3),
        {
            "type": "identify",
            "anonymousId": "guest-a",
            "messageId": "a1",
            "traits": {"email": "guest@example.org", "first_name": "Bo", "home_store_id": "nyc"},
        },
    )
    ingest(
        T0 - timedelta(hours=2),
        {
            "type": "track",
            "anonymousId": "guest-a",
            "event": "Product Added",
            "messageId": "a2",
            "properties": {"product_id": "tee", "name": "Black Tee", "price": 19.5, "quantity": 2},
        },
    )
    tick(store, T0)
    [email] = outbox(store, "email")
    guest = email.customer_id
    [journey] = [e for e in enrollments(store) if e.status == "active"]
    assert journey.customer_id == guest
    ingest(
        T0 + timedelta(hours=1),
        {"type": "identify", "userId": "known-b", "anonymousId": "guest-a", "messageId": "b2"},
    )
    tick(store, T0 + timedelta(days=1))
    assert len(outbox(store, "email")) == 1  # no second cart email
    [moved] = [e for e in enrollments(store) if e.status in ("active", "holdout")]
    assert moved.id == journey.id and moved.customer_id != guest  # the same journey, now the survivor's
    assert [m.customer_id for m in outbox(store, "ads")] == [moved.customer_id]  # and it went on
    assert len(enrollments(store)) == 1


def test_profile_show_names_the_journeys_and_the_last_message_of_each_channel(store):
    """What a call-centre agent reads in the terminal: the journey the customer is in and what Omni last
    sent on each channel (the same view the profile API answers with)."""
    from typer.testing import CliRunner

    from omni.cli import app

    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    tick(store, T0)
    tick(store, T0 + timedelta(days=1))
    url = store.url.render_as_string(hide_password=False)
    shown = CliRunner().invoke(app, ["profile", "show", str(n), "--database-url", url])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    [journey] = [line for line in lines if line.strip().startswith("journey")]
    assert "abandoned_cart: active at" in journey and "next 2026-" in journey
    assert "step " not in journey  # the step is named, as the profile API names it
    [email] = [line for line in lines if line.strip().startswith("last email")]
    assert "(abandoned_cart/cart_email), sent" in email
    [ads] = [line for line in lines if line.strip().startswith("last ads")]
    assert "cart_retargeting" in ads and "(abandoned_cart/retarget)" in ads
    assert not [line for line in lines if line.strip().startswith("last sms")]  # nothing sent there yet


def test_a_tick_sets_the_heap_aside_from_the_garbage_collector_and_puts_it_back(store):
    import gc

    [n] = first_messaged_ids(1)
    make_customers(store, [n])
    frozen = []

    def stage(name, fn):
        frozen.append(gc.get_freeze_count())
        return fn()

    assert gc.get_freeze_count() == 0
    tick(store, T0, stage=stage)
    assert min(frozen[1:]) > 0  # every stage after the audience build runs with the heap set aside
    assert gc.get_freeze_count() == 0
    with pytest.raises(SystemExit):
        tick(store, T0 + timedelta(days=1), connectors={"ads": CrashingConnector()})
    assert gc.get_freeze_count() == 0  # put back after a crash too
