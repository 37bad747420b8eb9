"""Identity resolution: which customer a payload belongs to, and merging customers that turn out to
be one person.

Rules:
- ``userId``, ``anonymousId``, ``traits.email`` (lower-cased, trimmed), ``traits.phone`` (E.164),
  ``traits.loyalty_id`` and ``context.device.token`` are identities; each (kind, value) belongs to one
  customer.
- A payload whose identities are all unknown creates a customer; unknown identities of a payload join
  the customer its known identities point to.
- A payload whose identities point at two or more customers merges them. The survivor is the one
  with a ``user_id`` identity (the known customer), else the oldest. Events, identities, consents,
  carts, orders and deliveries move to it; the others keep ``merged_into``.
- ``alias`` links ``previousId`` to ``userId``'s customer the same way.

Resolution is done a batch at a time: identities are loaded with one query per kind, the batch is
unified in memory (union-find), and merges and new rows are written with set-based statements.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from profiles.bulk import dialect_of, execute_sql, in_list, insert_rows, list_param, timestamp_param
from profiles.models import (
    Cart,
    Consent,
    Customer,
    Delivery,
    Event,
    Identity,
    IdentityKind,
    Order,
)
from profiles.segment import Payload

CHUNK = 1000

PROFILE_COLUMNS = ("email", "phone", "first_name", "last_name", "locale", "timezone", "home_store_id")


def chunked(values: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, ref: int) -> int:
        parent = self.parent.setdefault(ref, ref)
        if parent != ref:
            root = self.find(parent)
            self.parent[ref] = root
            return root
        return ref

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Keep existing customers (positive ids) as roots; new ones (negative refs) join them.
            if ra < 0 <= rb or (ra >= 0 and rb >= 0 and rb < ra):
                ra, rb = rb, ra
            self.parent[rb] = ra
        return ra


def load_identities(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Map (kind, value) -> customer id for the keys that exist, one query per kind and chunk."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for kind, value in set(keys):
        by_kind[kind].append(value)
    found: dict[tuple[str, str], int] = {}
    dialect = dialect_of(session)
    sql = f"SELECT value, customer_id FROM identities WHERE kind = ? AND {in_list('value', dialect)}"
    for kind, values in by_kind.items():
        for chunk in chunked(values, 10_000):
            for value, customer_id in execute_sql(session, sql, (kind, list_param(chunk, dialect))):
                found[(kind, value)] = customer_id
    return found


def resolve_customers(
    session: Session, payloads: Sequence[Payload], *, now: datetime
) -> tuple[list[int], set[int]]:
    """Assign each payload its customer id, creating customers, identities and merges as needed.

    Returns:
        the customer id of each payload (in order), and the ids of customers that absorbed a merge
        (whose derived carts and orders must be rebuilt).
    """
    wanted: list[tuple[str, str]] = []
    for payload in payloads:
        wanted.extend(payload.identities)
        if payload.previous_id:
            wanted.append((IdentityKind.USER_ID.value, payload.previous_id))
            wanted.append((IdentityKind.ANONYMOUS_ID.value, payload.previous_id))
    key_map: dict[tuple[str, str], int] = load_identities(session, wanted)
    existing_keys = set(key_map)

    uf = _UnionFind()
    next_temp = -1
    refs: list[int] = []
    for payload in payloads:
        keys = list(payload.identities)
        if payload.previous_id:
            as_user = (IdentityKind.USER_ID.value, payload.previous_id)
            as_anonymous = (IdentityKind.ANONYMOUS_ID.value, payload.previous_id)
            keys.append(as_user if as_user in key_map else as_anonymous)
        known = [key_map[k] for k in keys if k in key_map]
        if known:
            ref = known[0]
            for other in known[1:]:
                ref = uf.union(ref, other)
            ref = uf.find(ref)
        else:
            ref = next_temp
            next_temp -= 1
            uf.find(ref)
        for key in keys:
            key_map.setdefault(key, ref)
        refs.append(ref)

    # Groups of refs that ended up as one customer.
    groups: dict[int, list[int]] = defaultdict(list)
    for ref in list(uf.parent):
        groups[uf.find(ref)].append(ref)

    final: dict[int, int] = {}
    new_roots = [root for root in groups if root < 0]
    merged_survivors: set[int] = set()
    for members in groups.values():
        existing = sorted(m for m in members if m >= 0)
        if len(existing) > 1:
            survivor = choose_survivor(session, existing)
            merge_customers(
                session, survivor=survivor, losers=[c for c in existing if c != survivor], now=now
            )
            merged_survivors.add(survivor)
            for member in members:
                final[member] = survivor
        elif existing:
            for member in members:
                final[member] = existing[0]
    if new_roots:
        created = create_customers(session, len(new_roots), now=now)
        for root, customer_id in zip(new_roots, created, strict=True):
            for member in groups[root]:
                final[member] = customer_id

    new_identities = [
        {"kind": kind, "value": value, "customer_id": final[uf.find(ref)], "created_at": now}
        for (kind, value), ref in key_map.items()
        if (kind, value) not in existing_keys
    ]
    # Identities of merged-away customers were moved by merge_customers already.
    insert_rows(session, Identity.__table__, new_identities)
    return [final[uf.find(ref)] for ref in refs], merged_survivors


def create_customers(session: Session, count: int, *, now: datetime) -> list[int]:
    """``count`` new, empty customers in one statement; their ids, ascending."""
    if count <= 0:
        return []
    dialect = dialect_of(session)
    created = timestamp_param(dialect)(now)
    if dialect == "sqlite":
        rows = "json_each(?)"
        size: Any = list_param([0] * count, dialect)
        empty = "'{}'"
    else:
        rows, size, empty = "generate_series(1, ?)", count, "'{}'::jsonb"
    sql = f"INSERT INTO customers (traits, created_at, updated_at) SELECT {empty}, ?, ? FROM {rows}"
    sql += " RETURNING id"
    return sorted(row[0] for row in execute_sql(session, sql, (created, created, size)))


def choose_survivor(session: Session, customer_ids: Sequence[int]) -> int:
    """The customer with a user_id identity (the known one), else the oldest."""
    table = Identity.__table__
    known = session.execute(
        select(func.min(table.c.customer_id)).where(
            table.c.customer_id.in_(customer_ids), table.c.kind == IdentityKind.USER_ID.value
        )
    ).scalar()
    return known if known is not None else min(customer_ids)


def merge_customers(session: Session, *, survivor: int, losers: Sequence[int], now: datetime) -> None:
    """Move everything of ``losers`` to ``survivor``; the losers keep ``merged_into``.

    Derived carts and orders of the losers are dropped: the caller rebuilds the survivor's from the
    events that moved.
    """
    losers = [c for c in losers if c != survivor]
    if not losers:
        return
    for model in (Identity, Event, Delivery):
        table = model.__table__
        session.execute(update(table).where(table.c.customer_id.in_(losers)).values(customer_id=survivor))
    session.execute(delete(Cart.__table__).where(Cart.__table__.c.customer_id.in_(losers)))
    orders = Order.__table__
    session.execute(update(orders).where(orders.c.customer_id.in_(losers)).values(customer_id=survivor))
    _merge_consents(session, survivor=survivor, losers=losers)
    _merge_profiles(session, survivor=survivor, losers=losers, now=now)
    customers = Customer.__table__
    session.execute(
        update(customers)
        .where(or_(customers.c.id.in_(losers), customers.c.merged_into.in_(losers)))
        .values(merged_into=survivor, updated_at=now)
    )


def _merge_consents(session: Session, *, survivor: int, losers: Sequence[int]) -> None:
    table = Consent.__table__
    rows = session.execute(
        select(table.c.id, table.c.customer_id, table.c.channel, table.c.updated_at).where(
            table.c.customer_id.in_([survivor, *losers])
        )
    ).all()
    newest: dict[str, Any] = {}
    for row in rows:
        current = newest.get(row.channel)
        # The newest decision wins; on a tie, the survivor's.
        if (
            current is None
            or row.updated_at > current.updated_at
            or (row.updated_at == current.updated_at and row.customer_id == survivor)
        ):
            newest[row.channel] = row
    keep = {row.id for row in newest.values()}
    drop = [row.id for row in rows if row.id not in keep]
    if drop:
        session.execute(delete(table).where(table.c.id.in_(drop)))
    move = [row.id for row in newest.values() if row.customer_id != survivor]
    if move:
        session.execute(update(table).where(table.c.id.in_(move)).values(customer_id=survivor))


def _merge_profiles(session: Session, *, survivor: int, losers: Sequence[int], now: datetime) -> None:
    table = Customer.__table__
    rows = {row.id: row for row in session.execute(select(table).where(table.c.id.in_([survivor, *losers])))}
    base = rows[survivor]
    # Oldest identify first, so that newer values overwrite older ones.
    ordered = sorted(rows.values(), key=lambda r: (r.traits_at is not None, r.traits_at or now))
    values: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    for row in ordered:
        traits.update(row.traits or {})
        for column in PROFILE_COLUMNS:
            value = getattr(row, column)
            if value is not None:
                values[column] = value
    context_rows = [r for r in rows.values() if r.context_timezone_at is not None]
    if context_rows:
        latest = max(context_rows, key=lambda r: r.context_timezone_at)
        values["context_timezone"] = latest.context_timezone
        values["context_timezone_at"] = latest.context_timezone_at
    stamps = [r.traits_at for r in rows.values() if r.traits_at is not None]
    values.update(
        traits=traits,
        traits_at=max(stamps) if stamps else None,
        created_at=min(r.created_at for r in rows.values()),
        updated_at=now,
    )
    del base
    session.execute(update(table).where(table.c.id == survivor).values(**values))


def resolve_customer_key(session: Session, key: str, *, default_region: str = "US") -> int | None:
    """A customer id from a key a person types: a customer id, an email, a phone or any identity value.

    Merged-away customers resolve to their survivor.
    """
    from profiles.segment import normalize_email, normalize_phone

    key = key.strip()
    customers = Customer.__table__
    candidates: list[int] = []
    if key.isdigit():
        found = session.execute(select(customers.c.id).where(customers.c.id == int(key))).scalar()
        if found is not None:
            candidates.append(found)
    if not candidates:
        identities = Identity.__table__
        values = {key}
        email = normalize_email(key)
        if email:
            values.add(email)
        phone = normalize_phone(key, default_region) if any(ch.isdigit() for ch in key) else None
        if phone:
            values.add(phone)
        candidates = list(
            session.execute(
                select(identities.c.customer_id).where(identities.c.value.in_(values)).distinct()
            ).scalars()
        )
    if not candidates:
        return None
    customer_id = candidates[0]
    # Follow merged_into (merges flatten the chain, so this loops at most a few times).
    for _ in range(100):
        merged = session.execute(
            select(customers.c.merged_into).where(customers.c.id == customer_id)
        ).scalar()
        if merged is None:
            return customer_id
        customer_id = merged
    return customer_id
