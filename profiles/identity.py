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

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from profiles.bulk import (
    delete_in,
    dialect_of,
    execute_sql,
    in_list,
    insert_rows,
    list_param,
    timestamp_param,
)
from profiles.models import (
    Consent,
    Customer,
    Identity,
    IdentityKind,
)
from profiles.segment import DEFAULT_PHONE_REGION, Payload, normalize_email, normalize_phone

PROFILE_COLUMNS = ("email", "phone", "first_name", "last_name", "locale", "timezone", "home_store_id")


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
    merging = [sorted(m for m in members if m >= 0) for members in groups.values()]
    known = _known_customers(session, [c for existing in merging if len(existing) > 1 for c in existing])
    merges: list[tuple[int, list[int]]] = []
    for members, existing in zip(groups.values(), merging, strict=True):
        if len(existing) > 1:
            # The customer with a user_id identity (the known one), else the oldest.
            survivor = min((c for c in existing if c in known), default=existing[0])
            merges.append((survivor, [c for c in existing if c != survivor]))
            for member in members:
                final[member] = survivor
        elif existing:
            for member in members:
                final[member] = existing[0]
    merge_many(session, merges, now=now)
    merged_survivors = {survivor for survivor, _ in merges}
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
    # Identities of merged-away customers were moved by merge_many already.
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


def _known_customers(session: Session, customer_ids: Sequence[int]) -> set[int]:
    """Those of ``customer_ids`` with a user_id identity."""
    if not customer_ids:
        return set()
    dialect = dialect_of(session)
    sql = f"SELECT DISTINCT customer_id FROM identities WHERE kind = ? AND {in_list('customer_id', dialect)}"
    return {
        row[0]
        for row in execute_sql(session, sql, (IdentityKind.USER_ID.value, list_param(customer_ids, dialect)))
    }


def _mapping(dialect: str) -> str:
    """A (loser, survivor) relation ``m`` from the parameters :func:`_mapping_params` makes."""
    if dialect == "sqlite":
        return "(SELECT value ->> 0 AS loser, value ->> 1 AS survivor FROM json_each(?)) AS m"
    return "unnest(?::bigint[], ?::bigint[]) AS m(loser, survivor)"


def _mapping_params(pairs: Sequence[tuple[int, int]], dialect: str) -> tuple:
    if dialect == "sqlite":
        return (list_param([list(pair) for pair in pairs], dialect),)
    return ([loser for loser, _ in pairs], [survivor for _, survivor in pairs])


def merge_many(session: Session, merges: Sequence[tuple[int, Sequence[int]]], *, now: datetime) -> None:
    """Merge each ``(survivor, losers)``: everything of the losers moves to their survivor, and the losers
    (and customers merged into them before) keep ``merged_into``. All merges of a batch move in one
    statement per table.

    Derived carts of the losers are dropped: the caller rebuilds the survivor's from the events that
    moved.
    """
    merges = [(survivor, [c for c in losers if c != survivor]) for survivor, losers in merges]
    pairs = [(loser, survivor) for survivor, losers in merges for loser in losers]
    if not pairs:
        return
    dialect = dialect_of(session)
    mapping, params = _mapping(dialect), _mapping_params(pairs, dialect)
    for table in ("identities", "events", "deliveries", "orders"):
        execute_sql(
            session,
            f"UPDATE {table} SET customer_id = m.survivor FROM {mapping} WHERE {table}.customer_id = m.loser",
            params,
        )
    delete_in(session, "carts", "customer_id", [loser for loser, _ in pairs])
    for survivor, group in merges:
        if group:
            _merge_consents(session, survivor=survivor, losers=group)
            _merge_profiles(session, survivor=survivor, losers=group, now=now)
    updated = timestamp_param(dialect)(now)
    for column in ("merged_into", "id"):  # customers merged into a loser before, then the losers
        execute_sql(
            session,
            f"UPDATE customers SET merged_into = m.survivor, updated_at = ? FROM {mapping} "
            f"WHERE customers.{column} = m.loser",
            (updated, *params),
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


def resolve_customer_key(
    session: Session, key: str, *, default_region: str = DEFAULT_PHONE_REGION
) -> int | None:
    """A customer id from a key a person types: a customer id, an email, a phone or any identity value.

    Merged-away customers resolve to their survivor.
    """
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
