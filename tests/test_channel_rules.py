"""The one consent/reachability rule and the one timezone rule (``profiles.consent``,
``profiles.timezones``): their SQL and their Python forms agree, for every channel of
``omni.core.channels``, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select

from audiences import compile_condition
from omni.core.channels import CHANNELS, CONSENT_CHANNELS, Touchpoint
from omni.core.statuses import ConsentStatus
from profiles.consent import (
    consent_allowed_sql,
    has_address_sql,
    is_allowed,
    reachable_sql,
    unreachable_reason,
)
from profiles.db import session_scope
from profiles.models import (
    Consent,
    Customer,
    Fulfillment,
    Identity,
    IdentityKind,
    Order,
    OrderStatus,
    Store,
)
from profiles.timezones import customer_timezone_sql, customer_timezones, with_home_store

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
customers = Customer.__table__

EMAILS = (None, "", "ana@example.org")
PHONES = (None, "", "+14155550100")
TOKENS = (False, True)
# The consent a customer recorded on a channel; None: never asked.
STATES = (None, ConsentStatus.OPTED_IN.value, ConsentStatus.OPTED_OUT.value)


def _status(offset: int, channel: str) -> str | None:
    """Each customer's decisions differ by channel, and every channel sees every state for every
    combination of addresses (over the three offsets)."""
    return STATES[(offset + CONSENT_CHANNELS.index(channel)) % len(STATES)]


def _has_address(address: str, email: str | None, phone: str | None, token: bool) -> bool:
    """What each kind of address in ``omni.core.channels`` means, restated for the fixture's customers."""
    return {
        "email": bool(email),
        "phone": bool(phone),
        "device_token": token,
        "email_or_phone": bool(email) or bool(phone),
        "none": True,
    }[address]


@pytest.fixture
def people(engine) -> dict[int, tuple[str | None, str | None, bool, int]]:
    """customer id -> (email, phone, has a device token, consent offset): every combination."""
    combos = list(itertools.product(EMAILS, PHONES, TOKENS, range(len(STATES))))
    people = {number: combo for number, combo in enumerate(combos, 1)}
    with session_scope(engine) as session:
        session.execute(
            insert(customers),
            [
                {
                    "id": number,
                    "email": email,
                    "phone": phone,
                    "traits": {},
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for number, (email, phone, _token, _offset) in people.items()
            ],
        )
        identities = [
            {
                "kind": IdentityKind.USER_ID.value,
                "value": f"u{number}",
                "customer_id": number,
                "created_at": NOW,
            }
            for number in people
        ]
        identities += [
            {"kind": IdentityKind.DEVICE_TOKEN.value, "value": f"t{n}", "customer_id": n, "created_at": NOW}
            for n, (_email, _phone, token, _offset) in people.items()
            if token
        ]
        session.execute(insert(Identity.__table__), identities)
        consents = [
            {
                "customer_id": number,
                "channel": channel,
                "status": _status(offset, channel),
                "source": "test",
                "updated_at": NOW,
            }
            for number, (_email, _phone, _token, offset) in people.items()
            for channel in CONSENT_CHANNELS
            if _status(offset, channel) is not None
        ]
        session.execute(insert(Consent.__table__), consents)
    return people


@pytest.mark.parametrize("channel", [c.value for c in CHANNELS])
def test_reachability_in_sql_is_the_python_rule(engine, people, channel):
    facts = CHANNELS[channel]
    statement = select(
        customers.c.id,
        has_address_sql(channel, customers).label("address"),
        has_address_sql(channel, customers, per_customer=True).label("address_per_customer"),
        consent_allowed_sql(channel, customers.c.id).label("allowed"),
        reachable_sql(channel, customers).label("reachable"),
    )
    with session_scope(engine) as session:
        rows = {row.id: row for row in session.execute(statement)}
    assert set(rows) == set(people)
    seen = set()
    for number, (email, phone, token, offset) in people.items():
        status = _status(offset, channel) if facts.consent else None
        has_address = _has_address(facts.address, email, phone, token)
        allowed = is_allowed(channel, status)
        reason = unreachable_reason(channel, has_address=has_address, consent_status=status)
        row = rows[number]
        who = (channel, email, phone, token, status)
        assert bool(row.address) == has_address, who
        assert bool(row.address_per_customer) == has_address, who
        assert bool(row.allowed) == allowed, who
        assert bool(row.reachable) == (reason is None), (who, reason)
        seen.add((has_address, allowed))
    # The fixture reaches every case of the rule on every channel.
    assert {allowed for _, allowed in seen} == ({True, False} if facts.consent else {True})
    assert {address for address, _ in seen} == ({True, False} if facts.address != "none" else {True})


@pytest.mark.parametrize("channel", CONSENT_CHANNELS)
def test_audience_conditions_read_the_same_rule(engine, people, channel):
    with session_scope(engine) as session:
        reachable = set(session.execute(compile_condition({"reachable": channel}, now=NOW)).scalars())
        consent = set(session.execute(compile_condition({"consent": channel}, now=NOW)).scalars())
    facts = CHANNELS[channel]
    assert reachable == {
        number
        for number, (email, phone, token, offset) in people.items()
        if unreachable_reason(
            channel,
            has_address=_has_address(facts.address, email, phone, token),
            consent_status=_status(offset, channel),
        )
        is None
    }
    assert consent == {
        number for number, (*_, offset) in people.items() if is_allowed(channel, _status(offset, channel))
    }


def test_python_rule_per_channel():
    for channel, facts in CHANNELS.items():
        assert is_allowed(channel, ConsentStatus.OPTED_IN.value)
        assert is_allowed(channel, ConsentStatus.OPTED_OUT.value) is not facts.consent
        assert is_allowed(channel, None) is not facts.opt_in_required
        assert (
            unreachable_reason(channel, has_address=True, consent_status=ConsentStatus.OPTED_IN.value) is None
        )
        if facts.address != "none":
            assert unreachable_reason(channel, has_address=False, consent_status=None) == facts.no_address


# --- the customer's timezone: own, else the latest context, else the home store's, else the default ----

DEFAULT = "America/Chicago"
TIMEZONE_CASES = {
    # customer id: (own, context, home store, expected)
    1: ("America/New_York", "Europe/Paris", "tokyo", "America/New_York"),
    2: (None, "Europe/Paris", "tokyo", "Europe/Paris"),
    3: (None, None, "tokyo", "Asia/Tokyo"),
    4: (None, None, "no-zone", None),  # a home store without a timezone
    5: (None, None, "unknown", None),  # a home store that is not loaded
    6: (None, None, None, None),
    # A pickup store (PICKUPS) is not where the customer lives: the home store is, else the default.
    7: (None, None, "tokyo", "Asia/Tokyo"),
    8: (None, None, None, None),
}
PICKUPS = {7: "sydney", 8: "sydney"}


@pytest.fixture
def zoned(engine) -> None:
    with session_scope(engine) as session:
        stores = (("tokyo", "Asia/Tokyo"), ("sydney", "Australia/Sydney"), ("no-zone", None))
        session.execute(
            insert(Store.__table__),
            [
                {"id": i, "name": i, "timezone": zone, "hours": {}, "created_at": NOW, "updated_at": NOW}
                for i, zone in stores
            ],
        )
        session.execute(
            insert(customers),
            [
                {
                    "id": number,
                    "timezone": own,
                    "context_timezone": context,
                    "context_timezone_at": NOW if context else None,
                    "home_store_id": home,
                    "traits": {},
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for number, (own, context, home, _) in TIMEZONE_CASES.items()
            ],
        )
        session.execute(
            insert(Order.__table__),
            [
                {
                    "order_id": f"o{number}",
                    "customer_id": number,
                    "channel": Touchpoint.STORE.value,
                    "total": 10.0,
                    "fulfillment": Fulfillment.PICKUP.value,
                    "store_id": store,
                    "status": OrderStatus.READY_FOR_PICKUP.value,
                    "items": [],
                    "placed_at": NOW,
                    "updated_at": NOW,
                }
                for number, store in PICKUPS.items()
            ],
        )


def test_the_timezone_sql_follows_own_context_home_store(engine, zoned):
    statement = select(customers.c.id, customer_timezone_sql(customers)).select_from(
        with_home_store(customers)
    )
    with session_scope(engine) as session:
        found = dict(session.execute(statement).all())
    assert found == {number: case[3] for number, case in TIMEZONE_CASES.items()}


def test_customer_timezones_fall_back_to_the_default(engine, zoned):
    with session_scope(engine) as session:
        zones = customer_timezones(session, [*TIMEZONE_CASES, 99], DEFAULT)
    assert zones == {number: case[3] or DEFAULT for number, case in TIMEZONE_CASES.items()}
