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
  carts, orders and deliveries move to it; the others keep ``merged_into``. Per consent channel the
  decision that stands is the one ``profiles.consent`` ranks first (the newest; at the same time an
  opt-out); profile fields and traits come from the newest identify that has them.
- ``alias`` links ``previousId`` to ``userId``'s customer the same way.

Resolution is done a batch at a time: identities are loaded with one query per kind, the batch is
unified in memory (union-find), and merges and new rows are written with set-based statements.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.statuses import EnrollmentStatus
from profiles.bulk import (
    delete_in,
    dialect_of,
    execute_sql,
    in_list,
    insert_rows,
    insert_values,
    list_param,
    read_json,
    read_timestamp,
    timestamp_param,
    update_rows,
)
from profiles.consent import precedence_order_sql
from profiles.db import pg_array_literal
from profiles.models import (
    Customer,
    Identity,
    IdentityKind,
)
from profiles.segment import Payload

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
    sql = (
        f"SELECT i.value, i.customer_id FROM {_values(dialect, 'text')} CROSS JOIN identities AS i "
        "WHERE i.kind = ? AND i.value = v.value"
    )
    for kind, values in by_kind.items():
        for chunk in chunked(values, 10_000):
            for value, customer_id in execute_sql(session, sql, (list_param(chunk, dialect), kind)):
                found[(kind, value)] = customer_id
    return found


def _values(dialect: str, element: str) -> str:
    """A relation ``v(value)`` of the list bound (with :func:`profiles.bulk.list_param`) at this
    placeholder, for joins that look each value up by index.

    Why a join rather than ``IN`` / ``= ANY``: psycopg prepares a statement it has run five times, and
    PostgreSQL then plans it once for any parameter. Such a generic plan of ``kind = ? AND value =
    ANY(?)`` may read every identity of the kind and compare each with the whole list, which cannot be
    hashed when it is a parameter (measured: 0.9 s per lookup, 142 s of a 50,000-customer ingest). A join
    is planned as one index lookup per value or as a hash join, either way never the whole list against
    every row; on SQLite, CROSS JOIN keeps the list outside (one lookup per value)."""
    if dialect == "sqlite":
        return "(SELECT value FROM json_each(?)) AS v"
    return f"unnest(?::{element}[]) AS v(value)"


@dataclass(slots=True)
class Resolution:
    """What :func:`resolve_batch` decided for a batch, with the writes it leaves to the caller (who writes
    each customer's profile once, merged and updated by the batch together)."""

    # The customer of each payload, in order.
    customer_ids: list[int]
    # Customers that absorbed a merge (their derived carts and orders must be rebuilt).
    merged: set[int]
    # The survivors' merged profiles (rows for update_rows, with ``created_at``), not written yet.
    profiles: dict[int, dict[str, Any]]
    # Ids reserved for the batch's new customers (ascending), not inserted yet: see insert_customers.
    created: list[int]
    # The batch's new identities (kind, value, customer id), not inserted yet: see insert_identities.
    identities: list[tuple[str, str, int]]


def resolve_customers(
    session: Session, payloads: Sequence[Payload], *, now: datetime
) -> tuple[list[int], set[int]]:
    """Assign each payload its customer id, creating customers, identities and merges as needed.

    Returns:
        the customer id of each payload (in order), and the ids of customers that absorbed a merge
        (whose derived carts and orders must be rebuilt).
    """
    resolution = resolve_batch(session, payloads, now=now)
    insert_customers(session, [empty_profile(customer_id, now) for customer_id in resolution.created])
    update_rows(session, Customer.__table__, "id", list(resolution.profiles.values()))
    insert_identities(session, resolution.identities, now=now)
    return resolution.customer_ids, resolution.merged


def resolve_batch(session: Session, payloads: Sequence[Payload], *, now: datetime) -> Resolution:
    """:func:`resolve_customers` without its last writes: merges are done (everything of the losers
    moved, ``merged_into`` set) but the survivors' merged profiles are returned, and the new customers'
    ids reserved, and their identities listed, for the caller to write (customers first)."""
    wanted: list[tuple[str, str]] = []
    for payload in payloads:
        wanted.extend(payload.identities)
        if payload.previous_id:
            wanted.append((IdentityKind.USER_ID.value, payload.previous_id))
            wanted.append((IdentityKind.ANONYMOUS_ID.value, payload.previous_id))
    key_map: dict[tuple[str, str], int] = load_identities(session, wanted)
    existing_keys = set(key_map)

    uf = _UnionFind()
    find = uf.find
    next_temp = -1
    refs: list[int] = []
    for payload in payloads:
        keys = payload.identities
        if payload.previous_id:
            as_user = (IdentityKind.USER_ID.value, payload.previous_id)
            as_anonymous = (IdentityKind.ANONYMOUS_ID.value, payload.previous_id)
            keys = [*keys, as_user if as_user in key_map else as_anonymous]
        known = [key_map[k] for k in keys if k in key_map]
        if known:
            ref = known[0]
            for other in known[1:]:
                ref = uf.union(ref, other)
            ref = find(ref)
        else:
            ref = next_temp
            next_temp -= 1
            find(ref)
        for key in keys:
            key_map.setdefault(key, ref)
        refs.append(ref)

    # Groups of refs that ended up as one customer.
    groups: dict[int, list[int]] = defaultdict(list)
    for ref in list(uf.parent):
        groups[find(ref)].append(ref)

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
    profiles = _merge(session, merges, now=now)
    created = reserve_customer_ids(session, len(new_roots))
    for root, customer_id in zip(new_roots, created, strict=True):
        for member in groups[root]:
            final[member] = customer_id

    # Identities of merged-away customers were moved by the merge already.
    identities = [
        (kind, value, final[find(ref)])
        for (kind, value), ref in key_map.items()
        if (kind, value) not in existing_keys
    ]
    return Resolution(
        [final[find(ref)] for ref in refs],
        {survivor for survivor, _ in merges},
        {profile["id"]: profile for profile in profiles},
        created,
        identities,
    )


def reserve_customer_ids(session: Session, count: int) -> list[int]:
    """``count`` ids for new customers (ascending) that :func:`insert_customers` inserts later in the same
    transaction. PostgreSQL: from the ``customers`` id sequence. SQLite: the ids after the largest, which
    is what an INSERT would take (its rowid); the transaction holds the write lock (BEGIN IMMEDIATE), so
    nobody else takes them meanwhile."""
    if count <= 0:
        return []
    if dialect_of(session) == "sqlite":
        (last,) = execute_sql(session, "SELECT coalesce(max(id), 0) FROM customers")[0]
        return list(range(last + 1, last + count + 1))
    sql = "SELECT nextval(pg_get_serial_sequence('customers', 'id')) FROM generate_series(1, ?)"
    return sorted(row[0] for row in execute_sql(session, sql, (count,)))


def empty_profile(customer_id: int, now: datetime) -> dict[str, Any]:
    """The row of a new customer nothing is known about yet (keys as :func:`insert_customers` takes)."""
    return {
        "id": customer_id,
        **dict.fromkeys(PROFILE_COLUMNS),
        "traits": {},
        "traits_at": None,
        "context_timezone": None,
        "context_timezone_at": None,
        "created_at": now,
        "updated_at": now,
    }


def insert_customers(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert new customers (rows with the keys of :func:`empty_profile`, ids from
    :func:`reserve_customer_ids`)."""
    insert_rows(session, Customer.__table__, rows)


IDENTITY_COLUMNS = ("kind", "value", "customer_id", "created_at")


def insert_identities(session: Session, identities: Sequence[tuple[str, str, int]], *, now: datetime) -> None:
    """Insert new identities (kind, value, customer id), created ``now``."""
    created = timestamp_param(dialect_of(session))(now)
    insert_values(
        session,
        Identity.__table__,
        IDENTITY_COLUMNS,
        [(kind, value, customer_id, created) for kind, value, customer_id in identities],
    )


def create_customers(session: Session, count: int, *, now: datetime) -> list[int]:
    """``count`` new, empty customers; their ids, ascending."""
    created = reserve_customer_ids(session, count)
    insert_customers(session, [empty_profile(customer_id, now) for customer_id in created])
    return created


def _known_customers(session: Session, customer_ids: Sequence[int]) -> set[int]:
    """Those of ``customer_ids`` with a user_id identity."""
    if not customer_ids:
        return set()
    dialect = dialect_of(session)
    sql = (
        f"SELECT DISTINCT i.customer_id FROM {_values(dialect, 'bigint')} CROSS JOIN identities AS i "
        "WHERE i.customer_id = v.value AND i.kind = ?"
    )
    params = (list_param(customer_ids, dialect), IdentityKind.USER_ID.value)
    return {row[0] for row in execute_sql(session, sql, params)}


def _mapping(dialect: str, names: tuple[str, str] = ("loser", "survivor")) -> str:
    """A relation ``m`` of integer pairs (columns ``names``) from the parameters :func:`_mapping_params`
    makes: the whole list is one parameter, however many pairs."""
    first, second = names
    if dialect == "sqlite":
        return f"(SELECT value ->> 0 AS {first}, value ->> 1 AS {second} FROM json_each(?)) AS m"
    return f"unnest(?::bigint[], ?::bigint[]) AS m({first}, {second})"


def _mapping_params(pairs: Sequence[tuple[int, int]], dialect: str) -> tuple:
    if dialect == "sqlite":
        return (list_param([list(pair) for pair in pairs], dialect),)
    return (
        pg_array_literal([first for first, _ in pairs]),
        pg_array_literal([second for _, second in pairs]),
    )


# Tables whose rows belong to a customer and move to the survivor as they are (consents too, once the
# decisions that lose to a newer one are gone; carts are derived and rebuilt by the caller).
MOVED_TABLES = ("identities", "events", "deliveries", "orders", "consents")


def merge_many(session: Session, merges: Sequence[tuple[int, Sequence[int]]], *, now: datetime) -> None:
    """Merge each ``(survivor, losers)``: everything of the losers moves to their survivor, and the losers
    (and customers merged into them before) keep ``merged_into``.

    Every merge of the call is done together, in a fixed number of statements whatever their number (the
    pairs are bound as one parameter): one read of the customers merged, one statement per table moved,
    two for the enrollments (:func:`_move_enrollments`), one for the survivors' profiles, two for
    ``merged_into``. Merges that chain (a survivor that is
    another merge's loser) are followed to the last survivor. Losers and survivors must be live
    customers (not merged away), as :func:`resolve_customers` finds them.

    Derived carts of the losers are dropped: the caller rebuilds the survivor's from the events that
    moved.
    """
    update_rows(session, Customer.__table__, "id", _merge(session, merges, now=now))


def _merge(
    session: Session, merges: Sequence[tuple[int, Sequence[int]]], *, now: datetime
) -> list[dict[str, Any]]:
    """:func:`merge_many` but for the survivors' profiles, which it returns (rows for update_rows)."""
    groups = _merge_groups(merges)
    pairs = [(loser, survivor) for survivor, losers in groups.items() for loser in losers]
    if not pairs:
        return []
    dialect = dialect_of(session)
    mapping, params = _mapping(dialect), _mapping_params(pairs, dialect)
    profiles = _merged_profiles(session, groups, now=now)
    _drop_superseded_consents(session, groups)
    for table in MOVED_TABLES:
        execute_sql(
            session,
            f"UPDATE {table} SET customer_id = m.survivor FROM {mapping} WHERE {table}.customer_id = m.loser",
            params,
        )
    _move_enrollments(session, mapping, params)
    delete_in(session, "carts", "customer_id", [loser for loser, _ in pairs])
    # Customers merged into a loser before follow it to its survivor: merged_into stays one hop. The
    # mapping drives the lookup (CROSS JOIN fixes the join order on SQLite), so the plan does not depend
    # on statistics of merged_into, mostly NULL, which make SQLite scan customers once per pair.
    earlier = execute_sql(
        session,
        f"SELECT c.id, m.survivor FROM {mapping} CROSS JOIN customers AS c WHERE c.merged_into = m.loser",
        params,
    )
    merged = [*pairs, *((customer_id, survivor) for customer_id, survivor in earlier)]
    execute_sql(
        session,
        f"UPDATE customers SET merged_into = m.survivor, updated_at = ? FROM {_mapping(dialect)} "
        "WHERE customers.id = m.loser",
        (timestamp_param(dialect)(now), *_mapping_params(merged, dialect)),
    )
    return profiles


def _move_enrollments(session: Session, mapping: str, params: tuple) -> None:
    """Journeys follow the customer into the survivor.

    The losers' finished enrollments move (re-entry rules and reports see one history). Per sequence, the
    losers' earliest open enrollment moves too when the survivor has none open: the journey goes on where
    it was, with its holdout assignment, instead of starting again for the same person (a second
    abandoned-cart email). Open enrollments that do not move stay with their merged-away customer and
    exit at the next tick ("customer merged into another", ``sequences.exits``), which also skips their
    pending deliveries.

    On PostgreSQL a tick may enroll the survivor while this runs: the move then meets the one-open-
    enrollment index and is left out (those enrollments exit as above) rather than failing the ingest.
    """
    open_statuses = ", ".join(f"'{status}'" for status in EnrollmentStatus.open())
    execute_sql(
        session,
        f"UPDATE enrollments SET customer_id = m.survivor FROM {mapping} "
        f"WHERE enrollments.customer_id = m.loser AND enrollments.status NOT IN ({open_statuses})",
        params,
    )
    chosen = (
        "SELECT e.id AS id, m.survivor AS survivor, ROW_NUMBER() OVER (PARTITION BY m.survivor, e.sequence "
        "ORDER BY e.enrolled_at, e.id) AS standing "
        f"FROM {mapping} CROSS JOIN enrollments AS e WHERE e.customer_id = m.loser "
        f"AND e.status IN ({open_statuses}) AND NOT EXISTS (SELECT 1 FROM enrollments AS s "
        f"WHERE s.customer_id = m.survivor AND s.sequence = e.sequence AND s.status IN ({open_statuses}))"
    )
    move = (
        f"UPDATE enrollments SET customer_id = chosen.survivor FROM ({chosen}) AS chosen "
        "WHERE enrollments.id = chosen.id AND chosen.standing = 1"
    )
    if dialect_of(session) != "postgresql":  # SQLite: one writer, nothing can enroll meanwhile
        execute_sql(session, move, params)
        return
    execute_sql(session, "SAVEPOINT omni_move_enrollments")
    try:
        execute_sql(session, move, params)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != "23505":  # unique_violation: a tick enrolled the survivor
            raise
        execute_sql(session, "ROLLBACK TO SAVEPOINT omni_move_enrollments")
    else:
        execute_sql(session, "RELEASE SAVEPOINT omni_move_enrollments")


def _merge_groups(merges: Sequence[tuple[int, Sequence[int]]]) -> dict[int, list[int]]:
    """survivor -> its losers, each customer in one group: a survivor that is also another merge's loser
    hands its losers on to that merge's survivor (the chain is followed to its end)."""
    into: dict[int, int] = {}
    for survivor, losers in merges:
        for loser in losers:
            if loser == survivor:
                continue
            if into.setdefault(loser, survivor) != survivor:
                raise ValueError(f"customer {loser} cannot merge into both {into[loser]} and {survivor}")

    def last(customer: int) -> int:
        seen = {customer}
        while customer in into:
            customer = into[customer]
            if customer in seen:
                raise ValueError(f"merges into each other in a cycle: {sorted(seen)}")
            seen.add(customer)
        return customer

    groups: dict[int, list[int]] = defaultdict(list)
    for loser in into:
        groups[last(loser)].append(loser)
    return {survivor: sorted(losers) for survivor, losers in groups.items()}


def _drop_superseded_consents(session: Session, groups: dict[int, list[int]]) -> None:
    """Delete, per survivor and channel, every decision of the survivor and its losers but the one that
    stands, so that the rest can move: the precedence of ``profiles.consent`` (the newest decision wins;
    at the same time an opt-out wins), then the survivor's own, then the first recorded."""
    dialect = dialect_of(session)
    members = [
        (customer, survivor) for survivor, losers in groups.items() for customer in (survivor, *losers)
    ]
    ranked = (
        "SELECT c.id AS id, ROW_NUMBER() OVER (PARTITION BY m.survivor, c.channel "
        f"ORDER BY {precedence_order_sql('c')}, "
        "CASE WHEN c.customer_id = m.survivor THEN 0 ELSE 1 END, c.id) AS standing "
        f"FROM {_mapping(dialect, ('member', 'survivor'))} CROSS JOIN consents AS c "
        "WHERE c.customer_id = m.member"
    )
    execute_sql(
        session,
        f"DELETE FROM consents WHERE id IN (SELECT id FROM ({ranked}) AS ranked WHERE standing > 1)",
        _mapping_params(members, dialect),
    )


PROFILE_READ = (
    "id",
    "merged_into",
    "created_at",
    "traits",
    "traits_at",
    "context_timezone",
    "context_timezone_at",
    *PROFILE_COLUMNS,
)


def _merged_profiles(
    session: Session, groups: dict[int, list[int]], *, now: datetime
) -> list[dict[str, Any]]:
    """The survivors' profiles once merged (rows for :func:`profiles.bulk.update_rows`), from one read of
    every customer merged.

    Traits and profile fields: applied oldest identify first (customers never identified before them, by
    id), so that newer values overwrite older ones and a field none of them has stays empty; the context
    timezone seen last; the newest identify time; the oldest creation time.
    """
    dialect = dialect_of(session)
    members = [customer for survivor, losers in groups.items() for customer in (survivor, *losers)]
    sql = f"SELECT {', '.join(PROFILE_READ)} FROM customers WHERE {in_list('id', dialect)}"
    rows: dict[int, dict[str, Any]] = {}
    for row in execute_sql(session, sql, (list_param(members, dialect),)):
        profile = dict(zip(PROFILE_READ, row, strict=True))
        for name in ("created_at", "traits_at", "context_timezone_at"):
            profile[name] = read_timestamp(profile[name])
        rows[profile["id"]] = profile
    missing = sorted(set(members) - set(rows))
    gone = sorted(customer for customer, row in rows.items() if row["merged_into"] is not None)
    if missing or gone:
        raise ValueError(f"cannot merge customers that do not exist {missing} or were merged away {gone}")
    merged: list[dict[str, Any]] = []
    for survivor, losers in groups.items():
        group = sorted((rows[customer] for customer in (survivor, *losers)), key=lambda r: r["id"])
        values: dict[str, Any] = dict.fromkeys(PROFILE_COLUMNS)
        traits: dict[str, Any] = {}
        for row in sorted(group, key=lambda r: (r["traits_at"] is not None, r["traits_at"] or now)):
            traits.update(read_json(row["traits"]) or {})
            for column in PROFILE_COLUMNS:
                if row[column] is not None:
                    values[column] = row[column]
        zone = rows[survivor]
        with_zone = [r for r in group if r["context_timezone_at"] is not None]
        if with_zone:
            zone = max(with_zone, key=lambda r: r["context_timezone_at"])
        stamps = [r["traits_at"] for r in group if r["traits_at"] is not None]
        merged.append(
            {
                "id": survivor,
                **values,
                "traits": traits,
                "traits_at": max(stamps) if stamps else None,
                "context_timezone": zone["context_timezone"],
                "context_timezone_at": zone["context_timezone_at"],
                "created_at": min(r["created_at"] for r in group),
                "updated_at": now,
            }
        )
    return merged


def survivor_of(session: Session, customer_id: int) -> int:
    """``customer_id``, or the customer it was merged into (following ``merged_into`` to its end; merges
    flatten the chain, so this loops at most a few times)."""
    customers = Customer.__table__
    for _ in range(100):
        merged = session.execute(
            select(customers.c.merged_into).where(customers.c.id == customer_id)
        ).scalar()
        if merged is None:
            return customer_id
        customer_id = merged
    return customer_id
