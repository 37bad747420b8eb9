"""The driver-level statements of a tick (``sequences.sql``) write and read exactly what SQLAlchemy does,
on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, timedelta

from journey_kit import T0, customer, delivery, seed_stores
from sqlalchemy import select

from profiles.db import session_scope
from profiles.ingest import ingest_payloads
from profiles.models import Delivery
from sequences.gate import DeliveryPolicy, load_contacts, recent_messages
from sequences.sql import Driver


def stored(engine) -> dict[str, dict]:
    table = Delivery.__table__
    with session_scope(engine) as session:
        return {r.dedupe_key: dict(r._mapping) for r in session.execute(select(table))}


def test_insert_ignore_and_update_many_round_trip(engine):
    seed_stores(engine)
    customer(engine, 1)
    later = T0 + timedelta(hours=3, microseconds=7)
    with session_scope(engine) as session:
        sql = Driver(session)
        rows = [delivery("a", 1), delivery("b", 1, marketing=False, next_attempt_at=None, error="x")]
        assert sql.insert_ignore(Delivery.__table__, rows) == 2
        # Rows violating a unique key are skipped, the others inserted.
        assert sql.insert_ignore(Delivery.__table__, [delivery("a", 1), delivery("c", 1)]) == 1
    found = stored(engine)
    assert sorted(found) == ["a", "b", "c"]
    assert found["a"]["next_attempt_at"] == T0 and found["a"]["next_attempt_at"].tzinfo is not None
    assert (found["b"]["marketing"], found["b"]["next_attempt_at"], found["b"]["error"]) == (False, None, "x")

    ids = {key: row["id"] for key, row in found.items()}
    with session_scope(engine) as session:
        Driver(session).update_many(
            Delivery.__table__,
            ("id", "attempts"),
            ("status", "sent_at", "attempts", "error"),
            [
                (ids["a"], 0, "sent", later, 1, None),
                (ids["b"], 5, "sent", later, 1, None),  # attempts do not match: unchanged
                (ids["c"], 0, "failed", None, 1, "boom"),  # excluded by ``where``
            ],
            where="marketing = true" if engine.dialect.name == "postgresql" else "marketing = 1",
        )
    after = stored(engine)
    assert (after["a"]["status"], after["a"]["sent_at"], after["a"]["attempts"]) == ("sent", later, 1)
    assert (after["b"]["status"], after["b"]["error"]) == ("pending", "x")
    assert after["c"]["status"] == "failed" and after["c"]["error"] == "boom"
    with session_scope(engine) as session:
        sql = Driver(session)
        among, params = sql.in_([ids["a"], ids["c"]])
        keys = sql.execute(f"SELECT dedupe_key FROM deliveries WHERE id {among} ORDER BY id", params).all()
    assert [k for (k,) in keys] == ["a", "c"]


def test_recent_messages_count_what_may_have_gone_out_in_the_window(engine):
    seed_stores(engine)
    customer(engine, 1)
    customer(engine, 2)
    now = T0 + timedelta(days=2)
    hour = timedelta(hours=1)
    rows = [
        delivery("sent", 1, status="sent", sent_at=now - hour),
        delivery("sending", 1, status="sending", updated_at=now - 2 * hour),
        delivery("unknown", 1, status="unknown", updated_at=now - 3 * hour),
        delivery("failed", 1, status="failed", updated_at=now - hour),
        delivery("skipped", 1, status="skipped", updated_at=now - hour),
        delivery("pending", 1, status="pending", updated_at=now - hour),
        delivery("old", 1, status="sent", sent_at=now - 25 * hour),
        delivery("ads", 1, status="sent", channel="ads", sent_at=now - hour),
        delivery("transactional", 1, status="sent", marketing=False, sent_at=now - hour),
        delivery("sms", 2, status="sent", channel="sms", sent_at=now - 4 * hour),
    ]
    with session_scope(engine) as session:
        Driver(session).insert_ignore(Delivery.__table__, rows)
        found = recent_messages(session, [1, 2, 3], now=now, window=DeliveryPolicy().frequency_window)
    assert sorted(found[1]) == [now - 3 * hour, now - 2 * hour, now - hour]
    assert found[2] == [now - 4 * hour] and found[2][0].tzinfo == UTC
    assert 3 not in found


def test_contacts_read_timezone_addresses_and_consents(engine):
    seed_stores(engine)
    customer(engine, 1, store="lis", sms=False)
    customer(engine, 2, timezone="Asia/Tokyo", email=False)
    ingest_payloads(  # opted in to push, but no device to push to
        engine,
        [{"type": "identify", "userId": "user-3", "messageId": "id-3", "traits": {"push_opt_in": True}}],
        now=T0,
    )
    with session_scope(engine) as session:
        contacts = load_contacts(session, [1, 2, 3, 99], ["email", "sms", "push", "ads", "webhook"], "UTC")
    assert set(contacts) == {1, 2, 3}
    ana, bob, cy = contacts[1], contacts[2], contacts[3]
    assert (ana.email, ana.phone, ana.first_name, ana.zone.key) == (
        "cust1@example.org",
        "+12125551001",
        "Cust1",
        "Europe/Lisbon",
    )
    assert ana.unreachable("sms").startswith("no sms consent") and ana.unreachable("push") is None
    assert ana.unreachable("ads") is None and ana.unreachable("webhook") is None
    assert bob.zone.key == "Asia/Tokyo" and bob.unreachable("email") == "no email address"
    assert cy.zone.key == "UTC" and cy.unreachable("push") == "no device token"
    assert cy.unreachable("ads") == "no email or phone to match" and cy.unreachable("webhook") is None
