"""Ingestion of Segment-spec payloads into the profile store.

Input is streamed and handled in batches (``OMNI_INGEST_BATCH_SIZE``, default 5,000 payloads), so memory
stays flat whatever the input size. Several batches share a transaction (``OMNI_INGEST_TRANSACTION_SIZE``,
default 50,000 payloads): the store's indexes are keyed by customer and message id, so every batch
touches pages all over them, and committing fewer, larger transactions writes each such page once
instead of once per batch (measured: 4x the insert rate at a million events on SQLite). For each batch:

1. every payload is validated (``profiles.segment``); a bad one goes to ``rejected_events`` with its
   raw text, its source (``file:line``) and the reason, and the batch goes on;
2. repeated ``messageId`` values, within the batch or already stored, are counted as duplicates;
3. identities are resolved to customers, merging customers a payload links (``profiles.identity``);
4. events are inserted, identify traits and consent applied, carts and orders of customers with new
   commerce events rebuilt (``profiles.commerce``).

``accepted + duplicates + rejected`` is always the number of payloads read.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Engine, bindparam, select, text, update
from sqlalchemy.orm import Session

from omni.settings import get_settings
from profiles.bulk import dialect_of, execute_sql, in_list, insert_rows, list_param
from profiles.commerce import rebuild_commerce
from profiles.consent import ConsentDecision, apply_consents
from profiles.db import session_scope, utcnow
from profiles.identity import PROFILE_COLUMNS, chunked, resolve_customers
from profiles.models import Customer, Event, RejectedEvent
from profiles.reader import RawItem, iter_raw_items
from profiles.segment import COMMERCE_EVENTS, Payload, Rejected, validate_payload

SAMPLE_REJECTIONS = 20
# Serialises ingestion batches across processes on PostgreSQL (SQLite's BEGIN IMMEDIATE does it there).
INGEST_LOCK_KEY = 0x0D1A6E57


class InputNotFound(FileNotFoundError):
    """An input path that does not exist or cannot be read."""


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    # The first rejections (source, reason), for people; all of them are in rejected_events.
    samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def read(self) -> int:
        return self.accepted + self.duplicates + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "rejected": self.rejected}

    def add(self, other: IngestResult) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.samples.extend(other.samples[: max(0, SAMPLE_REJECTIONS - len(self.samples))])


def _batches(items: Iterable[RawItem], size: int) -> Iterator[list[RawItem]]:
    batch: list[RawItem] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingest_items(
    engine: Engine,
    items: Iterable[RawItem],
    *,
    now: datetime | None = None,
    batch_size: int | None = None,
    default_region: str | None = None,
    on_batch: Callable[[IngestResult], None] | None = None,
) -> IngestResult:
    """Store a stream of raw payloads, a batch per transaction. ``now`` is the receive time."""
    settings = get_settings()
    size = batch_size or settings.ingest_batch_size
    per_transaction = max(size, settings.ingest_transaction_size)
    region = default_region or settings.default_phone_region
    received_at = now or utcnow()
    total = IngestResult()
    batches = _batches(items, size)
    batch = next(batches, None)
    while batch is not None:
        in_transaction = 0
        with session_scope(engine) as session:
            while batch is not None and in_transaction < per_transaction:
                result = store_batch(session, batch, now=received_at, default_region=region)
                in_transaction += len(batch)
                total.add(result)
                if on_batch:
                    on_batch(result)
                batch = next(batches, None)
    return total


def ingest_payloads(
    engine: Engine,
    payloads: Iterable[Any],
    *,
    source: str = "api",
    now: datetime | None = None,
    batch_size: int | None = None,
) -> IngestResult:
    """Store already-parsed payloads (dicts, or batch envelopes), e.g. from a flow or a webhook."""
    from profiles.reader import expand_value

    def items() -> Iterator[RawItem]:
        for index, value in enumerate(payloads):
            text_value = orjson.dumps(value, default=str).decode()
            yield from expand_value(value, f"{source} [item {index}]", text_value, len(text_value.encode()))

    return ingest_items(engine, items(), now=now, batch_size=batch_size)


def open_input(path: str, stdin: IO[bytes] | None = None) -> tuple[IO[bytes], str, int | None]:
    """(binary stream, display name, size in bytes if known) for a path or ``-``."""
    if path == "-":
        return (stdin or sys.stdin.buffer), "<stdin>", None
    file = Path(path)
    if not file.exists():
        raise InputNotFound(f"{path}: no such file")
    if file.is_dir():
        raise InputNotFound(f"{path}: is a directory, expected a file of JSON lines or a JSON document")
    try:
        return file.open("rb"), path, file.stat().st_size
    except OSError as exc:
        raise InputNotFound(f"{path}: cannot be read ({exc.strerror})") from exc


def ingest_files(
    engine: Engine,
    paths: Sequence[str],
    *,
    now: datetime | None = None,
    batch_size: int | None = None,
    stdin: IO[bytes] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_file: Callable[[str, int | None], None] | None = None,
) -> IngestResult:
    """Ingest files of JSON lines or JSON documents (``-`` reads standard input)."""
    for path in paths:  # fail before anything is stored when an input is missing
        if path != "-" and not Path(path).is_file():
            open_input(path)
    total = IngestResult()
    for path in paths:
        stream, name, size = open_input(path, stdin)
        if on_file:
            on_file(name, size)
        try:
            total.add(
                ingest_items(engine, iter_raw_items(stream, name, on_bytes), now=now, batch_size=batch_size)
            )
        finally:
            if path != "-":
                stream.close()
    return total


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INGEST_LOCK_KEY})


def store_batch(
    session: Session, items: Sequence[RawItem], *, now: datetime, default_region: str
) -> IngestResult:
    """Validate, dedupe, resolve and store one batch inside the caller's transaction."""
    _lock(session)
    result = IngestResult()
    rejected_rows: list[dict[str, Any]] = []

    def reject(item: RawItem, reason: str) -> None:
        rejected_rows.append(
            {"source": item.source[:1000], "raw": item.text, "reason": reason, "received_at": now}
        )
        if len(result.samples) < SAMPLE_REJECTIONS:
            result.samples.append((item.source, reason))

    payloads: list[Payload] = []
    seen: set[str] = set()
    for item in items:
        if item.error is not None:
            reject(item, item.error)
            continue
        try:
            payload = validate_payload(
                item.value, size=item.size, received_at=now, default_region=default_region
            )
        except Rejected as exc:
            reject(item, str(exc))
            continue
        if payload.message_id in seen:
            result.duplicates += 1
            continue
        seen.add(payload.message_id)
        payloads.append(payload)

    stored = _existing_message_ids(session, [p.message_id for p in payloads])
    if stored:
        result.duplicates += sum(1 for p in payloads if p.message_id in stored)
        payloads = [p for p in payloads if p.message_id not in stored]

    if payloads:
        customer_ids, merged = resolve_customers(session, payloads, now=now)
        insert_rows(
            session,
            Event.__table__,
            [
                {
                    "message_id": p.message_id,
                    "customer_id": customer_id,
                    "type": p.type,
                    "name": p.name,
                    "channel": p.channel,
                    "properties": p.properties,
                    "context": p.context,
                    "user_id": p.user_id,
                    "anonymous_id": p.anonymous_id,
                    "occurred_at": p.occurred_at,
                    "received_at": now,
                }
                for p, customer_id in zip(payloads, customer_ids, strict=True)
            ],
        )
        _apply_profiles(session, payloads, customer_ids, now=now)
        apply_consents(
            session,
            (
                ConsentDecision(customer_id, change.channel, change.status, change.source, p.occurred_at)
                for p, customer_id in zip(payloads, customer_ids, strict=True)
                for change in p.consents
            ),
        )
        commerce = {
            customer_id
            for p, customer_id in zip(payloads, customer_ids, strict=True)
            if p.type == "track" and p.name in COMMERCE_EVENTS
        }
        rebuild_commerce(session, commerce | merged)
    insert_rows(session, RejectedEvent.__table__, rejected_rows)
    result.accepted = len(payloads)
    result.rejected = len(rejected_rows)
    return result


def _existing_message_ids(session: Session, message_ids: Sequence[str]) -> set[str]:
    dialect = dialect_of(session)
    sql = f"SELECT message_id FROM events WHERE {in_list('message_id', dialect)}"
    found: set[str] = set()
    for chunk in chunked(message_ids, 10_000):
        found.update(row[0] for row in execute_sql(session, sql, (list_param(chunk, dialect),)))
    return found


def _apply_profiles(
    session: Session, payloads: Sequence[Payload], customer_ids: Sequence[int], *, now: datetime
) -> None:
    """Apply identify traits and context timezones to the customers they belong to.

    A newer identify overwrites; an older one (than the newest already applied) only fills what is
    missing, so the profile does not depend on arrival order.
    """
    identifies: dict[int, list[Payload]] = defaultdict(list)
    zones: dict[int, tuple[datetime, str]] = {}
    for payload, customer_id in zip(payloads, customer_ids, strict=True):
        if payload.type == "identify" and (payload.traits or payload.profile):
            identifies[customer_id].append(payload)
        if payload.context_timezone:
            current = zones.get(customer_id)
            if current is None or payload.occurred_at >= current[0]:
                zones[customer_id] = (payload.occurred_at, payload.context_timezone)
    touched = sorted(set(identifies) | set(zones))
    if not touched:
        return
    table = Customer.__table__
    columns = [
        table.c.id,
        table.c.traits,
        table.c.traits_at,
        table.c.context_timezone,
        table.c.context_timezone_at,
    ]
    columns += [table.c[name] for name in PROFILE_COLUMNS]
    updates: list[dict[str, Any]] = []
    for chunk in chunked(touched):
        for row in session.execute(select(*columns).where(table.c.id.in_(chunk))):
            values = {name: getattr(row, name) for name in PROFILE_COLUMNS}
            traits = dict(row.traits or {})
            traits_at = row.traits_at
            for payload in sorted(identifies.get(row.id, ()), key=lambda p: p.occurred_at):
                if traits_at is None or payload.occurred_at >= traits_at:
                    traits.update(payload.traits or {})
                    values.update(payload.profile)
                    traits_at = payload.occurred_at
                else:
                    for key, value in (payload.traits or {}).items():
                        traits.setdefault(key, value)
                    for key, value in payload.profile.items():
                        if values.get(key) is None:
                            values[key] = value
            zone, zone_at = row.context_timezone, row.context_timezone_at
            if row.id in zones:
                at, name = zones[row.id]
                if zone_at is None or at >= zone_at:
                    zone, zone_at = name, at
            updates.append(
                {
                    "b_id": row.id,
                    **values,
                    "traits": traits,
                    "traits_at": traits_at,
                    "context_timezone": zone,
                    "context_timezone_at": zone_at,
                    "updated_at": now,
                }
            )
    session.execute(update(table).where(table.c.id == bindparam("b_id")), updates)
