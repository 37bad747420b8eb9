"""Many merges in one batch (``profiles.identity.merge_many``): the set-based statements give what merging
each (survivor, losers) one after the other gives, in a number of statements that does not grow with
the merges. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from profiles.db import session_scope
from profiles.identity import PROFILE_COLUMNS, merge_many
from profiles.ingest import IngestOptions, ingest_payloads
from profiles.models import Cart, Consent, Customer, Delivery, Event, Identity, Order, metadata

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 5, 1, tzinfo=UTC)
CHANNELS = ("email", "sms", "push", "ads")
MOVED = (Identity, Event, Delivery, Order)


# --- the reference: one (survivor, losers) at a time, row by row, as merges were done before #15 -------


def reference_merge(session: Session, survivor: int, losers: list[int], *, now: datetime) -> None:
    for model in MOVED:
        table = model.__table__
        session.execute(update(table).where(table.c.customer_id.in_(losers)).values(customer_id=survivor))
    session.execute(Cart.__table__.delete().where(Cart.__table__.c.customer_id.in_(losers)))
    _reference_consents(session, survivor, losers)
    _reference_profile(session, survivor, losers, now=now)
    customers = Customer.__table__
    for column in (customers.c.merged_into, customers.c.id):
        session.execute(
            update(customers).where(column.in_(losers)).values(merged_into=survivor, updated_at=now)
        )


def _reference_consents(session: Session, survivor: int, losers: list[int]) -> None:
    table = Consent.__table__
    rows = session.execute(select(table).where(table.c.customer_id.in_([survivor, *losers]))).all()
    standing = {}
    for row in rows:
        # The newest decision; at the same time an opt-out; then the survivor's; then the first recorded.
        key = (-row.updated_at.timestamp(), row.status != "opted_out", row.customer_id != survivor, row.id)
        if row.channel not in standing or key < standing[row.channel][0]:
            standing[row.channel] = (key, row)
    keep = {row.id for _, row in standing.values()}
    for row in rows:
        if row.id not in keep:
            session.execute(table.delete().where(table.c.id == row.id))
    for _, row in standing.values():
        session.execute(update(table).where(table.c.id == row.id).values(customer_id=survivor))


def _reference_profile(session: Session, survivor: int, losers: list[int], *, now: datetime) -> None:
    table = Customer.__table__
    rows = session.execute(
        select(table).where(table.c.id.in_([survivor, *losers])).order_by(table.c.id)
    ).all()
    values = dict.fromkeys(PROFILE_COLUMNS)
    traits = {}
    for row in sorted(rows, key=lambda r: (r.traits_at is not None, r.traits_at or now)):
        traits.update(row.traits or {})
        for column in PROFILE_COLUMNS:
            if getattr(row, column) is not None:
                values[column] = getattr(row, column)
    zone = next(r for r in rows if r.id == survivor)
    with_zone = [r for r in rows if r.context_timezone_at is not None]
    if with_zone:
        zone = max(with_zone, key=lambda r: r.context_timezone_at)
    stamps = [r.traits_at for r in rows if r.traits_at is not None]
    session.execute(
        update(table)
        .where(table.c.id == survivor)
        .values(
            **values,
            traits=traits,
            traits_at=max(stamps) if stamps else None,
            context_timezone=zone.context_timezone,
            context_timezone_at=zone.context_timezone_at,
            created_at=min(r.created_at for r in rows),
            updated_at=now,
        )
    )


# --- a store of random customers --------------------------------------------------------------------


def at(rng: random.Random) -> datetime:
    # Few distinct times, so that ties (between customers, between decisions) are common.
    return T0 + timedelta(hours=rng.randrange(4))


def maybe(rng: random.Random, value, share=0.5):
    return value if rng.random() < share else None


def populate(session: Session, rng: random.Random, count: int) -> list[int]:
    """``count`` customers with random profiles, consents, events, identities, carts, orders and
    deliveries; their ids."""
    ids = []
    for n in range(count):
        customer = Customer(
            email=maybe(rng, f"c{n}@x.org"),
            phone=maybe(rng, f"+1415555{n:04d}"),
            first_name=maybe(rng, rng.choice(["Ann", "Ben", "Chloe"])),
            last_name=maybe(rng, f"Last{n}", 0.3),
            locale=maybe(rng, rng.choice(["en-US", "pt-PT"]), 0.3),
            timezone=maybe(rng, "Europe/Lisbon", 0.2),
            home_store_id=maybe(rng, rng.choice(["s1", "s2"]), 0.3),
            # Keys shared between customers, values their own: which value survives is the rule.
            traits={
                key: f"{key}-{n}" for key in rng.sample(["plan", "size", "color", "pet"], rng.randrange(3))
            },
            traits_at=maybe(rng, at(rng), 0.7),
            context_timezone=None,
            created_at=T0 - timedelta(days=rng.randrange(3)),
            updated_at=T0,
        )
        if rng.random() < 0.5:
            customer.context_timezone = rng.choice(["America/New_York", "Asia/Tokyo"])
            customer.context_timezone_at = at(rng)
        session.add(customer)
        session.flush()
        ids.append(customer.id)
        cid = customer.id
        session.add(Identity(kind="anonymous_id", value=f"anon-{cid}", customer_id=cid, created_at=T0))
        for k in range(rng.randrange(3)):
            session.add(
                Event(
                    message_id=f"m-{cid}-{k}",
                    customer_id=cid,
                    type="track",
                    name="Viewed",
                    channel="web",
                    properties={},
                    context={},
                    occurred_at=at(rng),
                    received_at=T0,
                )
            )
        for channel in rng.sample(CHANNELS, rng.randrange(len(CHANNELS) + 1)):
            status = rng.choice(["opted_in", "opted_out"])
            session.add(
                Consent(
                    customer_id=cid, channel=channel, status=status, source=f"src-{cid}", updated_at=at(rng)
                )
            )
        if rng.random() < 0.3:
            session.add(
                Cart(customer_id=cid, status="open", items=[], started_at=T0, updated_at=T0, lines=[])
            )
        if rng.random() < 0.3:
            session.add(
                Order(
                    order_id=f"o-{cid}",
                    customer_id=cid,
                    channel="web",
                    fulfillment="ship",
                    status="placed",
                    items=[],
                    placed_at=T0,
                    updated_at=T0,
                )
            )
        if rng.random() < 0.2:
            session.add(
                Delivery(
                    dedupe_key=f"campaign:c:{cid}",
                    campaign="c",
                    step_id="s",
                    customer_id=cid,
                    channel="email",
                    connector="outbox",
                    status="sent",
                    created_at=T0,
                    updated_at=T0,
                )
            )
    session.flush()
    return ids


def random_merges(rng: random.Random, ids: list[int]) -> list[tuple[int, list[int]]]:
    """Disjoint groups of 2 to 4 customers, as resolve_customers makes them; some customers stay out."""
    pool = ids[:]
    rng.shuffle(pool)
    merges = []
    while len(pool) >= 4:
        size = rng.choice([0, 2, 2, 3, 4])
        if size == 0:
            pool.pop()
            continue
        group, pool = pool[:size], pool[size:]
        merges.append((group[0], group[1:]))
    return merges


def merge_earlier(session: Session, rng: random.Random, ids: list[int], count: int) -> None:
    """``count`` more customers, already merged into customers of ``ids`` (merges of earlier batches)."""
    for extra in populate(session, rng, count):
        reference_merge(session, rng.choice(ids), [extra], now=T0)
    session.flush()


def snapshot(session: Session) -> dict[str, list]:
    """Every table a merge writes, row by row (traits as dicts, timestamps as read)."""
    result = {}
    for model in (Customer, Identity, Event, Consent, Cart, Order, Delivery):
        table = model.__table__
        result[table.name] = sorted(
            (tuple(sorted(row._mapping.items())) for row in session.execute(select(table))), key=repr
        )
    return result


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_of_merges_equals_merging_each_group_one_after_the_other(engine, seed):
    rng = random.Random(seed)
    with session_scope(engine) as session:
        ids = populate(session, rng, 60)
        merge_earlier(session, rng, ids, 8)
    merges = random_merges(random.Random(seed + 100), ids)
    assert len(merges) > 5 and any(len(losers) > 1 for _, losers in merges)

    with Session(engine) as session:
        for survivor, losers in merges:
            reference_merge(session, survivor, losers, now=NOW)
        expected = snapshot(session)
        session.rollback()
    with Session(engine) as session:
        merge_many(session, merges, now=NOW)
        assert snapshot(session) == expected
        session.rollback()


def test_chained_merges_in_one_call_end_at_the_last_survivor(engine):
    rng = random.Random(1)
    with session_scope(engine) as session:
        a, b, c, d = populate(session, rng, 4)
    with Session(engine) as session:
        reference_merge(session, c, [a, b, d], now=NOW)
        expected = snapshot(session)
        session.rollback()
    with Session(engine) as session:
        # a into b, b into c, d into c: all of them into c.
        merge_many(session, [(b, [a]), (c, [b]), (c, [d])], now=NOW)
        assert snapshot(session) == expected
        session.rollback()


def test_merges_that_contradict_each_other_are_refused(engine):
    with session_scope(engine) as session:
        a, b, c = populate(session, random.Random(2), 3)
    with Session(engine) as session:
        with pytest.raises(ValueError, match="both"):
            merge_many(session, [(b, [a]), (c, [a])], now=NOW)
        with pytest.raises(ValueError, match="cycle"):
            merge_many(session, [(b, [a]), (a, [b])], now=NOW)


def test_a_customer_merged_away_already_cannot_merge_again(engine):
    with session_scope(engine) as session:
        a, b, c = populate(session, random.Random(3), 3)
        merge_many(session, [(b, [a])], now=NOW)
    with session_scope(engine) as session:
        with pytest.raises(ValueError, match="merged away"):
            merge_many(session, [(c, [a])], now=NOW)


class StatementCounter:
    """Counts what the session's connection hands its driver (execute, executemany, copy: one each)."""

    def __init__(self, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        fairy = session.connection().connection
        make_cursor = fairy.cursor

        def cursor(*args, **kwargs):
            return _CountingCursor(make_cursor(*args, **kwargs), self)

        monkeypatch.setattr(fairy, "cursor", cursor, raising=False)


class _CountingCursor:
    def __init__(self, cursor, counter: StatementCounter) -> None:
        self._cursor, self._counter = cursor, counter

    def execute(self, *args, **kwargs):
        self._counter.count += 1
        return self._cursor.execute(*args, **kwargs)

    def executemany(self, *args, **kwargs):
        self._counter.count += 1
        return self._cursor.executemany(*args, **kwargs)

    def copy(self, *args, **kwargs):
        self._counter.count += 1
        return self._cursor.copy(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._cursor, name)

    def __iter__(self):
        return iter(self._cursor)


def test_the_statements_of_a_batch_do_not_grow_with_its_merges(engine, monkeypatch):
    with session_scope(engine) as session:
        ids = populate(session, random.Random(4), 120)
    counts = []
    for groups in (3, 40):
        merges = [(ids[2 * n], [ids[2 * n + 1]]) for n in range(groups)]
        with Session(engine) as session:
            counter = StatementCounter(session, monkeypatch)
            merge_many(session, merges, now=NOW)
            counts.append(counter.count)
            assert (
                session.execute(select(func.count()).where(Customer.merged_into.is_not(None))).scalar()
                == groups
            )
            session.rollback()
    # 11 for the tables and profiles, 2 moving enrollments (and on PostgreSQL the move's savepoint, 2).
    assert counts[0] == counts[1] <= 15, counts


# --- through ingest: one batch of many merges equals the same payloads one batch each -----------------


def ts(hour: int, day: int = 2) -> str:
    return f"2026-06-{day:02d}T{hour:02d}:00:00Z"


def setup_batches() -> list[list[dict]]:
    """Customers to merge: U and V known, A, B, C, D anonymous, X merged into A already."""
    return [
        [
            {
                "type": "identify",
                "userId": "u1",
                "messageId": "s1",
                "timestamp": ts(1),
                "traits": {"first_name": "Ann", "plan": "gold"},
            },
            {
                "type": "track",
                "userId": "u1",
                "event": "Subscribed",
                "messageId": "s2",
                "timestamp": ts(2),
                "properties": {"channel": "email"},
            },
            {
                "type": "track",
                "userId": "u1",
                "event": "Order Completed",
                "messageId": "s3",
                "timestamp": ts(2),
                "properties": {"order_id": "o1", "total": 30.0},
            },
            {
                "type": "identify",
                "anonymousId": "a1",
                "messageId": "s4",
                "timestamp": ts(3),
                "traits": {"last_name": "Lee", "email": "a@x.org"},
            },
            {
                "type": "track",
                "anonymousId": "a1",
                "event": "Unsubscribed",
                "messageId": "s5",
                "timestamp": ts(4),
                "properties": {"channel": "email"},
            },
            {
                "type": "track",
                "anonymousId": "a1",
                "event": "Unsubscribed",
                "messageId": "s6",
                "timestamp": ts(5),
                "properties": {"channel": "sms"},
            },
            {
                "type": "track",
                "anonymousId": "a1",
                "event": "Product Added",
                "messageId": "s7",
                "timestamp": ts(5),
                "properties": {"product_id": "tee", "price": 10.0, "quantity": 2},
            },
            {
                "type": "track",
                "anonymousId": "b1",
                "event": "Subscribed",
                "messageId": "s8",
                "timestamp": ts(5),
                "properties": {"channel": "sms"},
            },
            {
                "type": "track",
                "anonymousId": "b1",
                "event": "Subscribed",
                "messageId": "s9",
                "timestamp": ts(6),
                "properties": {"channel": "push"},
            },
            {
                "type": "track",
                "anonymousId": "b1",
                "event": "Product Added",
                "messageId": "s10",
                "timestamp": ts(6),
                "properties": {"product_id": "cap", "price": 5.0},
            },
            {
                "type": "identify",
                "userId": "u2",
                "messageId": "s11",
                "timestamp": ts(1),
                "traits": {"first_name": "Vi"},
            },
            {
                "type": "identify",
                "anonymousId": "c1",
                "messageId": "s12",
                "timestamp": ts(2),
                "traits": {"email": "c@x.org", "color": "red"},
            },
            {
                "type": "track",
                "anonymousId": "c1",
                "event": "Subscribed",
                "messageId": "s13",
                "timestamp": ts(3),
                "properties": {"channel": "ads"},
            },
            {"type": "page", "anonymousId": "d1", "messageId": "s14", "timestamp": ts(3), "name": "Home"},
            {
                "type": "track",
                "anonymousId": "d1",
                "event": "Unsubscribed",
                "messageId": "s15",
                "timestamp": ts(3),
                "properties": {"channel": "ads"},
            },
            {"type": "page", "anonymousId": "x1", "messageId": "s16", "timestamp": ts(1), "name": "Home"},
        ],
        [
            # X shares A's email: X merges into A (the older; neither is known).
            {
                "type": "identify",
                "anonymousId": "x1",
                "messageId": "s17",
                "timestamp": ts(1),
                "traits": {"email": "a@x.org"},
            },
        ],
    ]


def merging_payloads() -> list[dict]:
    """A and B into U (two losers, conflicting consents, A with X merged into it before), and a chain:
    D into C through C's email, then C into V."""
    return [
        {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m1", "timestamp": ts(7)},
        {"type": "identify", "userId": "u1", "anonymousId": "b1", "messageId": "m2", "timestamp": ts(8)},
        {
            "type": "identify",
            "anonymousId": "d1",
            "messageId": "m3",
            "timestamp": ts(9),
            "traits": {"email": "c@x.org"},
        },
        {"type": "alias", "userId": "u2", "previousId": "c1", "messageId": "m4", "timestamp": ts(10)},
    ]


def store_state(engine) -> dict:
    """The store with customer ids replaced by their rank (ids differ between stores)."""
    with Session(engine) as session:
        rows = snapshot(session)
    rank = {row_id: n for n, row_id in enumerate(sorted(dict(r)["id"] for r in rows["customers"]))}
    state = {}
    for name, table_rows in rows.items():
        cleaned = []
        for row in table_rows:
            values = dict(row)
            if name != "orders":
                values.pop("id")
            for key in ("customer_id", "merged_into"):
                if values.get(key) is not None:
                    values[key] = rank[values[key]]
            if name == "customers":
                values["rank"] = rank[dict(row)["id"]]
                if values["merged_into"] is not None:
                    # A merged-away row keeps the profile it had when it was merged: in between, one
                    # payload at a time may have updated it as a survivor. Nothing reads it after.
                    values = {"rank": values["rank"], "merged_into": values["merged_into"]}
            cleaned.append(tuple(sorted(values.items())))
        state[name] = sorted(cleaned, key=repr)
    return state


def _empty(engine) -> None:
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.mark.parametrize("order", ["as written", "reversed"])
def test_many_merges_in_one_ingest_batch_equal_one_payload_per_batch(engine, order):
    merging = merging_payloads()
    if order == "reversed":
        merging.reverse()
    states = []
    for batch_size in (len(merging), 1):
        _empty(engine)
        for batch in setup_batches():
            ingest_payloads(engine, batch, now=NOW)
        result = ingest_payloads(engine, merging, options=IngestOptions(batch_size=batch_size), now=NOW)
        assert result.accepted == len(merging)
        states.append(store_state(engine))
    assert states[0] == states[1]

    with session_scope(engine) as session:
        owner = {i.value: i.customer_id for i in session.execute(select(Identity)).scalars()}
        u, v = owner["u1"], owner["u2"]
        assert {owner[k] for k in ("a1", "b1", "x1", "a@x.org")} == {u}
        assert {owner[k] for k in ("c1", "d1", "c@x.org")} == {v}
        live = session.execute(select(Customer).where(Customer.merged_into.is_(None))).scalars().all()
        assert sorted(c.id for c in live) == sorted([u, v])
        merged = session.execute(select(Customer.merged_into).where(Customer.merged_into.is_not(None))).all()
        assert sorted(m for (m,) in merged) == sorted([u, u, u, v, v])  # A, B and X; C and D
        consents = {(c.customer_id, c.channel): c.status for c in session.execute(select(Consent)).scalars()}
        assert consents == {
            (u, "email"): "opted_out",  # A's opt-out, newer than U's opt-in
            (u, "sms"): "opted_out",  # A's opt-out and B's opt-in at the same time: the opt-out
            (u, "push"): "opted_in",
            (v, "ads"): "opted_out",  # C's opt-in and D's opt-out at the same time
        }
        profile = session.get(Customer, u)
        assert (profile.first_name, profile.last_name, profile.email) == ("Ann", "Lee", "a@x.org")
        assert profile.traits["plan"] == "gold"
        assert session.get(Customer, v).traits["color"] == "red"
        [order_row] = session.execute(select(Order)).scalars().all()
        assert order_row.customer_id == u
        carts = session.execute(select(Cart).where(Cart.status == "open")).scalars().all()
        assert [(c.customer_id, c.item_count) for c in carts] == [(u, 3)]


# --- journeys follow the customer ----------------------------------------------------------------------


def test_enrollments_follow_the_survivor_without_two_open_journeys_in_one_sequence(engine):
    """Finished enrollments move; per sequence the losers' earliest open one moves when the survivor has
    none open; the others stay with their merged-away customer (the next tick exits them)."""
    from profiles.models import Enrollment

    with session_scope(engine) as session:
        survivor, a, b, c = populate(session, random.Random(5), 4)

        def enroll(customer: int, sequence: str, status: str, day: int) -> int:
            row = Enrollment(
                sequence=sequence,
                customer_id=customer,
                status=status,
                step_index=1,
                next_run_at=T0 + timedelta(days=day + 1) if status in ("active", "holdout") else None,
                enrolled_at=T0 + timedelta(days=day),
                updated_at=T0 + timedelta(days=day),
            )
            session.add(row)
            session.flush()
            return row.id

        ids = {
            # cart: no open journey of the survivor; a's and b's open ones: the earliest (b's) moves
            "a cart": enroll(a, "cart", "active", 2),
            "b cart": enroll(b, "cart", "holdout", 1),
            # pickup: the survivor's own open journey stands; a's stays behind
            "survivor pickup": enroll(survivor, "pickup", "active", 3),
            "a pickup": enroll(a, "pickup", "active", 1),
            # finished ones move whatever the survivor has
            "a cart done": enroll(a, "cart", "completed", 0),
            "c pickup exited": enroll(c, "pickup", "exited", 0),
        }
    with Session(engine) as session:
        merge_many(session, [(survivor, [a, b, c])], now=NOW)
        owners = dict(
            session.execute(
                select(Enrollment.__table__.c.id, Enrollment.__table__.c.customer_id).where(
                    Enrollment.__table__.c.id.in_(ids.values())
                )
            ).all()
        )
        session.commit()
    assert {name: owners[i] for name, i in ids.items()} == {
        "a cart": a,
        "b cart": survivor,  # with its holdout assignment: intention to treat
        "survivor pickup": survivor,
        "a pickup": a,
        "a cart done": survivor,
        "c pickup exited": survivor,
    }


@pytest.mark.postgresql
def test_a_tick_enrolling_the_survivor_meanwhile_leaves_the_losers_journey_to_exit(
    engine, wait_until_blocked
):
    """PostgreSQL, real parallel connections: a tick has enrolled the survivor and not committed when a
    merge moves the loser's open journey in the same sequence. The merge waits on the one-open-enrollment
    index, then leaves the loser's journey where it is (the next tick exits it) instead of failing."""
    import threading

    from sqlalchemy import text

    from profiles.models import Enrollment

    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite serializes writers: no tick can enroll while a merge writes")
    table = Enrollment.__table__
    row = {"sequence": "cart", "status": "active", "step_index": 0, "enrolled_at": T0, "updated_at": T0}
    with session_scope(engine) as session:
        survivor, loser = populate(session, random.Random(6), 2)
        session.execute(table.insert().values(customer_id=loser, **row))
    with Session(engine) as tick:
        tick.execute(table.insert().values(customer_id=survivor, **row))  # not committed yet
        errors: list[BaseException] = []
        with Session(engine) as merging:
            pid = merging.execute(text("SELECT pg_backend_pid()")).scalar()

            def merge() -> None:
                try:
                    merge_many(merging, [(survivor, [loser])], now=NOW)
                    merging.commit()
                except BaseException as exc:  # noqa: BLE001 - reported by the test
                    errors.append(exc)

            thread = threading.Thread(target=merge)
            thread.start()
            wait_until_blocked(engine, pid, "the merge")  # on the tick's uncommitted row
            tick.commit()
            thread.join(60)
    assert not thread.is_alive() and errors == []
    with session_scope(engine) as session:
        owners = sorted(session.execute(select(table.c.customer_id)).scalars())
        merged_into = session.execute(select(Customer.merged_into).where(Customer.id == loser)).scalar()
    assert owners == sorted([survivor, loser]) and merged_into == survivor
