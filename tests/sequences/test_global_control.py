"""The global control group (``profiles.control``): deterministic, rotatable, recorded, and never
messaged by a sequence or a campaign; a service journey (``global_control: false``) still reaches it.
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from journey_kit import T0, customer, deliveries, enrollments, no_sleep, outbox, seed_stores
from sqlalchemy import BigInteger, literal, select

from omni.core.settings import Settings
from profiles.control import (
    GLOBAL_CONTROL,
    GlobalControl,
    control_bucket,
    control_bucket_sql,
    control_members_sql,
    is_in_control,
    record_control,
)
from profiles.db import session_scope
from profiles.models import GlobalControlMember
from sequences.campaigns import send_campaign
from sequences.definitions import load_sequences, parse_campaign
from sequences.enrollment import is_held_out
from sequences.tick import run_tick

CUSTOMERS = 40
SHARE, SALT = 0.25, "2026-h1"


def settings(share: float = SHARE, salt: str = SALT) -> Settings:
    return Settings().model_copy(update={"global_control_share": share, "global_control_salt": salt})


def control_ids(share: float = SHARE, salt: str = SALT, upto: int = CUSTOMERS) -> set[int]:
    rule = GlobalControl(share, salt)
    return {i for i in range(1, upto + 1) if is_in_control(i, rule)}


def recorded(engine) -> list:
    table = GlobalControlMember.__table__
    with session_scope(engine) as session:
        return session.execute(select(table).order_by(table.c.id)).all()


@pytest.fixture
def store(engine):
    seed_stores(engine)
    for n in range(1, CUSTOMERS + 1):  # customer ids are 1..40, each with an abandoned cart
        customer(engine, n)
    return engine


def test_the_bucket_is_the_same_in_sql_and_python(engine):
    ids = [1, 2, 3, 999, 10_000, 2_147_483_646, 2_147_483_647, 2_147_483_648, 9_000_000_000_123]
    with session_scope(engine) as session:
        for salt in ("", "2026-h1", "rotated ✓"):
            in_sql = [
                session.execute(select(control_bucket_sql(literal(i, BigInteger()), salt))).scalar_one()
                for i in ids
            ]
            assert in_sql == [control_bucket(i, salt) for i in ids]


def test_the_share_is_kept_and_a_new_salt_draws_an_independent_group():
    ids = range(1, 20_001)
    first = {i for i in ids if is_in_control(i, GlobalControl(0.1, "a"))}
    assert 1_850 <= len(first) <= 2_150  # 10 % of 20,000, within ~3.5 standard deviations
    assert first == {i for i in ids if is_in_control(i, GlobalControl(0.1, "a"))}  # deterministic
    rotated = {i for i in ids if is_in_control(i, GlobalControl(0.1, "b"))}
    assert 100 <= len(first & rotated) <= 300  # independent draws overlap by about 10 % of 10 %
    larger = {i for i in ids if is_in_control(i, GlobalControl(0.2, "a"))}
    assert first < larger  # a larger share keeps everyone already in
    assert not any(is_in_control(i, GlobalControl(0.0, "a")) for i in ids)  # 0: off
    with pytest.raises(ValueError, match="fraction"):
        GlobalControl(1.5, "a")


def test_members_are_held_out_of_every_marketing_journey_and_recorded(store):
    control = control_ids()
    assert 4 <= len(control) <= 16
    report = run_tick(store, now=T0, settings=settings(), names=["abandoned_cart"], sleep=no_sleep)
    rows = {e.customer_id: e for e in enrollments(store)}
    assert set(rows) == set(range(1, CUSTOMERS + 1))
    for customer_id, row in rows.items():
        if customer_id in control:
            assert (row.status, row.exit_reason) == ("holdout", GLOBAL_CONTROL)
        elif is_held_out(customer_id, "abandoned_cart", 10.0):
            assert (row.status, row.exit_reason) == ("holdout", None)
        else:
            assert row.status == "active"
    journey_holdout = {i for i in range(1, CUSTOMERS + 1) if is_held_out(i, "abandoned_cart", 10.0)}
    counts = report.sequences["abandoned_cart"]
    assert counts.held_out == len(control | journey_holdout)
    assert counts.enrolled == CUSTOMERS - len(control | journey_holdout)
    for day in (1, 3, 5):
        run_tick(
            store, now=T0 + timedelta(days=day), settings=settings(), names=["abandoned_cart"], sleep=no_sleep
        )
    messaged = {m.customer_id for m in outbox(store)}
    assert messaged == set(range(1, CUSTOMERS + 1)) - control - journey_holdout
    # The record: exactly the members, entered at the first tick, still in.
    members = recorded(store)
    assert {(m.customer_id, m.salt, m.share, m.entered_at, m.exited_at) for m in members} == {
        (i, SALT, SHARE, T0, None) for i in control
    }


def test_a_service_journey_reaches_the_control_group(store):
    flagship = load_sequences()["abandoned_cart"]
    service = flagship.model_copy(
        update={"name": "cart_service", "global_control": False, "holdout_percent": 0}
    )
    run_tick(
        store,
        now=T0,
        settings=settings(),
        names=["cart_service"],
        sequences={"cart_service": service},
        sleep=no_sleep,
    )
    assert {e.status for e in enrollments(store)} == {"active"}
    assert {m.customer_id for m in outbox(store, "email")} == set(range(1, CUSTOMERS + 1))


def test_rotating_the_salt_or_switching_off_is_recorded(store):
    first, second = control_ids(salt="a"), control_ids(salt="b")
    assert first != second
    with session_scope(store) as session:
        assert record_control(session, GlobalControl(SHARE, "a"), now=T0) == (len(first), 0)
        assert record_control(session, GlobalControl(SHARE, "a"), now=T0 + timedelta(hours=1)) == (0, 0)
    later = T0 + timedelta(days=30)
    with session_scope(store) as session:
        assert record_control(session, GlobalControl(SHARE, "b"), now=later) == (len(second), len(first))
    rows = recorded(store)
    assert {(r.customer_id, r.salt, r.exited_at) for r in rows} == {(i, "a", later) for i in first} | {
        (i, "b", None) for i in second
    }
    # The report reads who was in the group at any time in a period from the record.
    with session_scope(store) as session:
        in_june = set(session.execute(control_members_sql(T0, T0 + timedelta(days=10))).scalars())
        both = set(session.execute(control_members_sql(T0, later + timedelta(days=1))).scalars())
        july = set(session.execute(control_members_sql(later, later + timedelta(days=1))).scalars())
    assert (in_june, both, july) == (first, first | second, second)
    end = later + timedelta(days=1)
    with session_scope(store) as session:
        assert record_control(session, GlobalControl(0.0, "b"), now=end) == (0, len(second))
    assert all(r.exited_at is not None for r in recorded(store))


def test_a_campaign_skips_the_control_group_and_records_why(store):
    campaigns = {
        "cart_push": parse_campaign(
            {
                "name": "cart_push",
                "audience": "cart_abandoners",
                "channel": "email",
                "template": "email/abandoned_cart",
            },
            file="cart_push.yaml",
        )
    }
    control = control_ids()
    created, report = send_campaign(
        store, "cart_push", now=T0, settings=settings(), campaigns=campaigns, sleep=no_sleep
    )
    assert created == CUSTOMERS - len(control)
    assert report.campaigns["cart_push"].sent == CUSTOMERS - len(control)
    assert {m.customer_id for m in outbox(store, "email")} == set(range(1, CUSTOMERS + 1)) - control
    skipped = [d for d in deliveries(store) if d.status == "skipped"]
    assert {(d.customer_id, d.error) for d in skipped} == {(i, GLOBAL_CONTROL) for i in control}
    assert {m.customer_id for m in recorded(store)} == control
    # Off (the default): everyone is sent the next campaign.
    campaigns["second"] = campaigns["cart_push"].model_copy(update={"name": "second"})
    created, _ = send_campaign(
        store,
        "second",
        now=T0 + timedelta(days=2),
        settings=Settings(),
        campaigns=campaigns,
        sleep=no_sleep,
    )
    assert created == CUSTOMERS
