"""The live intake of ``omni serve``: a durable queue in the profile store, and the processor that
ingests it through the same code as files.

Accepting (the tracking API, ``omni.server.tracking``): :func:`append` checks the requests' write keys
and inserts each accepted request's JSON body as one row of ``intake``, in the caller's transaction;
the server answers 200 only once that transaction has committed. So a 200 means the payload is on disk
in the store, whatever happens to the server the next instant.

Processing (:func:`process_once`, run in a loop by :class:`IntakeProcessor`): take the oldest rows (at
most ``claim_rows`` rows and about ``claim_bytes`` of bodies), expand each into payloads as a file's
lines are (``profiles.reader.expand_value``: batch envelopes into items), validate them with
:func:`profiles.ingest.prepare_batch` and store them with :func:`profiles.ingest.store_prepared` (one
pipeline: identities, merges, traits, consents, carts and orders, rejections, duplicates by
``messageId``), and delete the rows **in the same transaction**. A row is therefore ingested exactly
once: if the process dies mid-way the transaction rolls back and the row is still there for the next
processor; nothing is ever marked "claimed" on disk, so there is nothing to recover by hand.

- PostgreSQL: rows are claimed with ``FOR UPDATE SKIP LOCKED``, so several server processes (``omni
  serve --workers N``, several hosts) share the queue without waiting on each other; the store itself
  is written one batch at a time (ingest's advisory lock).
- SQLite (one writer at a time): the rows are read and validated outside the write lock, then the write
  transaction deletes them (checking that no other process got there first) and stores their events,
  so the tracking API's inserts wait only for the store's writes, not for parsing.

As Segment's HTTP API does: a batch takes at most 2,500 events (the rest are rejected with that reason;
the request was answered 200), and an event's time is corrected for the sender's clock when it says
when it was sent: ``received_at - (sentAt - timestamp)`` (an envelope's ``sentAt`` applies to its
items; see ``profiles.segment.validate_payload``; files are not corrected).

Each event records the write key's source (``web``, ``pos-lisbon`` ...) as ``context.omni.source``
(events have no column for it; the key's source replaces whatever a client put there). A rejected
payload keeps the raw text the client sent (without ``writeKey``) and the source
``"<source> request <id>"``, plus ``[batch item N]`` for items of a batch.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Connection, Engine, delete, func, insert, select
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from omni.core.settings import Settings
from profiles.bulk import read_timestamp
from profiles.db import refresh_statistics, session_scope, stale_statistics
from profiles.ingest import (
    IngestOptions,
    IngestResult,
    PreparedBatch,
    PreparedEvent,
    prepare_batch,
    store_prepared,
    store_rejections,
)
from profiles.models import ApiKey, IntakeRequest
from profiles.reader import RawItem, expand_value

log = logging.getLogger("omni.intake")

# The calls of the tracking API (besides batch), as its paths and payload types name them.
CALLS = ("identify", "track", "page", "screen", "group", "alias")
BATCH = "batch"
# Segment takes at most 2,500 events per batch request: the rest are rejected (the request still gets 200).
MAX_BATCH_ITEMS = 2500

INTAKE = IntakeRequest.__table__
KEYS = ApiKey.__table__

# The processor measures its capacity over this much time busy.
CAPACITY_WINDOW_SECONDS = 1.0

# Written rows (all tables) between two checks of the planner statistics (see profiles.ingest).
STATISTICS_CHECK_ROWS = 5000


class Accepted(NamedTuple):
    """A request the tracking API parsed and checked, to be appended to the queue."""

    key_hash: str  # sha256 of the write key (profiles.apikeys.key_hash)
    kind: str  # identify ... alias, or batch
    body: str  # the JSON body, without writeKey
    size: int  # its size in bytes
    received_at: datetime


def append(conn: Connection, requests: Sequence[Accepted]) -> list[str | None]:
    """Authenticate ``requests`` by their write keys and insert the accepted ones, in the caller's
    transaction. Returns, per request, the source of its key, or None for a missing, unknown or revoked
    key (nothing stored). The caller commits before answering 200."""
    if not requests:
        return []
    hashes = sorted({r.key_hash for r in requests})
    sources: dict[str, str] = {}
    for stored_hash, source in conn.execute(
        select(KEYS.c.key_hash, KEYS.c.source).where(
            KEYS.c.key_hash.in_(hashes), KEYS.c.scope == "write", KEYS.c.revoked_at.is_(None)
        )
    ):
        sources[stored_hash] = source
    answer: list[str | None] = []
    rows: list[dict[str, Any]] = []
    for request in requests:
        source = next(
            (s for h, s in sources.items() if hmac.compare_digest(h, request.key_hash)),
            None,
        )
        answer.append(source)
        if source is not None:
            rows.append(
                {
                    "received_at": request.received_at,
                    "source": source,
                    "kind": request.kind,
                    "size": request.size,
                    "body": request.body,
                }
            )
    if rows:
        conn.execute(insert(INTAKE), rows)
    return answer


def backlog(conn: Connection) -> int:
    """Requests accepted and not ingested yet."""
    return conn.execute(select(func.count()).select_from(INTAKE)).scalar_one()


class QueueState(NamedTuple):
    requests: int  # accepted and not ingested yet
    bytes: int  # the size of their bodies
    oldest: datetime | None  # when the oldest of them was received


def queue_state(conn: Connection) -> QueueState:
    """What waits in the queue."""
    count, size, oldest = conn.execute(
        select(func.count(), func.coalesce(func.sum(INTAKE.c.size), 0), func.min(INTAKE.c.received_at))
    ).one()
    return QueueState(count, int(size), read_timestamp(oldest))


@dataclass(frozen=True, slots=True)
class IntakeOptions:
    """How the processor takes work from the queue."""

    # Validation and storage options, as for files (phone region, future limit).
    ingest: IngestOptions = field(default_factory=IngestOptions)
    # At most this many requests per transaction ...
    claim_rows: int = 1000
    # ... and about this many bytes of bodies (at least one request): bounds the processor's memory and,
    # on SQLite, how long the tracking API's inserts may wait for a transaction of the processor.
    claim_bytes: int = 1 << 20
    # How often a processor looks for rows other processes accepted (its own wake it at once).
    poll_seconds: float = 0.2

    @classmethod
    def of(cls, settings: Settings, dialect: str, ingest: IngestOptions | None = None) -> IntakeOptions:
        """The options of the settings for a store of ``dialect``."""
        claim_bytes = settings.intake_claim_kb * 1024
        if dialect == "postgresql":
            claim_bytes = settings.intake_claim_kb_postgresql * 1024
        return cls(
            ingest=ingest or IngestOptions.of(settings),
            claim_rows=settings.intake_claim_rows,
            claim_bytes=claim_bytes,
        )


class _Row(NamedTuple):
    id: int
    received_at: datetime
    source: str
    kind: str
    size: int
    body: str


@dataclass
class IntakeResult:
    """What one :func:`process_once` did."""

    requests: int = 0
    ingest: IngestResult = field(default_factory=IngestResult)
    bytes: int = 0  # the size of the requests' bodies


class _Taken(Exception):
    """Another processor ingested some of the rows this one read (SQLite): start again."""


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes | str) -> Any:
    """Parse a request body. orjson first; what only it refuses (a lone surrogate escape such as
    ``"\\ud800"``, an integer beyond 64 bits) is read by the standard library instead, so that one such
    item of a batch is rejected on its own when the batch is ingested, not the whole request. NaN and
    Infinity stay refused. Raises ``ValueError`` (orjson's error) for what is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(body, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise exc from None


def dump_json(value: Any) -> bytes:
    """JSON text of a parsed body (the standard library's, escaped, for what orjson cannot write)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def with_source(value: dict, source: str) -> dict:
    """``value`` with ``context.omni.source`` set to the key's ``source`` (a copy; the client's own
    ``context.omni.source``, if any, is replaced: a payload cannot claim another source)."""
    context = value.get("context")
    if context is None:
        context = {}
    elif not isinstance(context, dict):
        return value  # rejected by validation ("context must be an object")
    omni = context.get("omni")
    omni = {**(omni if isinstance(omni, dict) else {}), "source": source}
    return {**value, "context": {**context, "omni": omni}}


def request_items(row: _Row) -> Iterator[RawItem]:
    """The payloads of one queued request, as the file reader makes them."""
    label = f"{row.source} request {row.id}"
    try:
        value = parse_json(row.body)
    except ValueError as exc:  # never accepted so; kept rather than lost
        yield RawItem(label, row.body, row.size, error=f"invalid JSON: {exc}")
        return
    text = row.body
    extra: list[Any] = []
    if row.kind == BATCH:
        if isinstance(value, dict):
            value = {key: item for key, item in value.items() if key != "type"}  # the path says "batch"
            value, extra = _batch_items(value)
    elif isinstance(value, dict):
        if value.get("type") != row.kind:  # the path names the call, as in Segment's HTTP API
            value = {**value, "type": row.kind}
            text = dump_json(value).decode()
    for item in expand_value(value, label, text, row.size):
        if item.parsed and isinstance(item.value, dict):
            item = RawItem(item.source, item.text, item.size, with_source(item.value, row.source))
        yield item
    for index, item in enumerate(extra, start=MAX_BATCH_ITEMS):
        item_text = dump_json(item).decode()
        yield RawItem(
            f"{label} [batch item {index}]",
            item_text,
            len(item_text.encode()),
            error=f"over Segment's limit of {MAX_BATCH_ITEMS:,} events per batch",
        )


def _batch_items(value: dict) -> tuple[dict, list[Any]]:
    """A batch as the tracking API takes it: the envelope's ``sentAt`` (the SDKs put it there) on each
    item without one, and the items beyond :data:`MAX_BATCH_ITEMS`, returned apart to be rejected."""
    items = value.get("batch")
    if not isinstance(items, list):
        return value, []
    items, extra = items[:MAX_BATCH_ITEMS], items[MAX_BATCH_ITEMS:]
    sent_at = value.get("sentAt")
    if sent_at not in (None, ""):
        items = [
            {**item, "sentAt": sent_at} if isinstance(item, dict) and "sentAt" not in item else item
            for item in items
        ]
    return {**value, "batch": items}, extra


def prepare_rows(rows: Sequence[_Row], options: IngestOptions, dialect: str) -> PreparedBatch:
    """Validate the payloads of ``rows`` (each with its own time of receipt); a ``messageId`` repeated
    across requests (a client's retry) counts as a duplicate, as within a file."""
    events: list[PreparedEvent] = []
    rejected: list[tuple[str, str, str]] = []
    duplicates = 0
    seen: set[str] = set()
    for row in rows:
        batch = prepare_batch(
            request_items(row),
            now=row.received_at,
            default_region=options.default_region,
            dialect=dialect,
            future=options.max_future,
            correct_clock_skew=True,
        )
        rejected.extend(batch.rejected)
        duplicates += batch.duplicates
        for event in batch.events:
            if event.message_id in seen:
                duplicates += 1
                continue
            seen.add(event.message_id)
            events.append(event)
    return PreparedBatch(events, rejected, duplicates)


def _within_budget(sizes: Sequence[tuple[int, int]], options: IntakeOptions) -> list[int]:
    """The ids of the first rows whose bodies fit ``claim_bytes`` (at least one)."""
    ids: list[int] = []
    total = 0
    for row_id, size in sizes:
        if ids and total + size > options.claim_bytes:
            break
        ids.append(row_id)
        total += size
    return ids


_COLUMNS = (INTAKE.c.id, INTAKE.c.received_at, INTAKE.c.source, INTAKE.c.kind, INTAKE.c.size, INTAKE.c.body)


def _read_rows(conn: Connection, ids: Sequence[int]) -> list[_Row]:
    rows = conn.execute(select(*_COLUMNS).where(INTAKE.c.id.in_(ids)).order_by(INTAKE.c.id))
    return [_Row(r[0], read_timestamp(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


def _store(session: Any, rows: Sequence[_Row], batch: PreparedBatch) -> IngestResult:
    """Delete ``rows`` from the queue and store their prepared payloads, in the session's transaction."""
    ids = [row.id for row in rows]
    deleted = session.execute(delete(INTAKE).where(INTAKE.c.id.in_(ids))).rowcount
    if deleted != len(ids):
        raise _Taken
    return store_prepared(session, batch, now=max(row.received_at for row in rows))


def process_once(
    engine: Engine, options: IntakeOptions = IntakeOptions(), *, rows: int | None = None
) -> IntakeResult:
    """Ingest the oldest queued requests (at most ``rows``, default ``options.claim_rows``) in one
    transaction; returns what was done (``requests == 0``: the queue was empty, or another processor
    took the rows first)."""
    limit = rows or options.claim_rows
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with session_scope(engine) as session:
            conn = session.connection()
            sizes = conn.execute(
                select(INTAKE.c.id, INTAKE.c.size)
                .order_by(INTAKE.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not sizes:
                return IntakeResult()
            taken = _read_rows(conn, _within_budget(sizes, options))
            batch = prepare_rows(taken, options.ingest, dialect)
            return IntakeResult(len(taken), _store(session, taken, batch), sum(r.size for r in taken))
    # SQLite: read and validate outside the write lock, then write. The engine begins every transaction
    # IMMEDIATE (taking the write lock); the driver's connection in autocommit reads without it.
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT id, size FROM intake ORDER BY id LIMIT ?", (limit,))
        sizes = cursor.fetchall()
        if not sizes:
            return IntakeResult()
        ids = _within_budget(sizes, options)
        cursor.execute(
            "SELECT id, received_at, source, kind, size, body FROM intake "
            "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
            (orjson.dumps(ids).decode(),),
        )
        taken = [_Row(r[0], read_timestamp(r[1]), r[2], r[3], r[4], r[5]) for r in cursor.fetchall()]
        cursor.close()
    finally:
        raw.close()
    if not taken:
        return IntakeResult()
    batch = prepare_rows(taken, options.ingest, dialect)
    try:
        with session_scope(engine) as session:
            return IntakeResult(len(taken), _store(session, taken, batch), sum(r.size for r in taken))
    except _Taken:
        return IntakeResult()


def quarantine(engine: Engine, options: IntakeOptions, error: BaseException) -> int:
    """Move the oldest queued request, which cannot be stored (``error``), to ``rejected_events`` (each
    payload with its raw text and the reason) and delete it, so one bad request never stops the queue.
    Returns the number of requests moved (0 or 1)."""
    reason = f"could not be stored: {type(error).__name__}: {' '.join(str(error).split())[:500]}"
    with session_scope(engine) as session:
        conn = session.connection()
        query = select(INTAKE.c.id).order_by(INTAKE.c.id).limit(1)
        if engine.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        first = conn.execute(query).scalar()
        if first is None:
            return 0
        (row,) = _read_rows(conn, [first])
        rejected = [(item.source, item.text, item.error or reason) for item in request_items(row)]
        store_rejections(session, rejected, now=row.received_at)
        session.execute(delete(INTAKE).where(INTAKE.c.id == row.id))
    log.error(
        "intake request %s (%s) could not be stored and was moved to rejected_events: %s",
        first,
        row.source,
        reason,
    )
    return 1


def _transient(error: BaseException) -> bool:
    """A failure of the store itself (connection, lock, disk), not of what a request holds."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


class IntakeProcessor:
    """Runs :func:`process_once` in a thread until stopped: at once when :meth:`wake` is called (the
    tracking API does so after each commit), else every ``poll_seconds`` for rows other processes
    accepted. A request that fails to store on its own is quarantined (:func:`quarantine`); a failing
    store is retried after a pause, never dropping anything."""

    def __init__(self, engine: Engine, options: IntakeOptions = IntakeOptions()) -> None:
        self.engine = engine
        self.options = options
        self.processed = 0  # requests ingested by this processor
        # Bytes of request bodies it ingests per second, measured over each second it was busy without
        # a pause (while it keeps up with small claims, this is at least the rate requests arrive at);
        # None until it has been busy for a second.
        self.capacity: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: Counter[str] = Counter()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="omni-intake", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        one_by_one = 0  # after a failure: take requests one at a time to find the bad one
        busy_since: float | None = None  # since when every pass found work (None: idle)
        busy_bytes = 0
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                result = process_once(self.engine, self.options, rows=1 if one_by_one else None)
            except Exception as exc:  # noqa: BLE001 - the processor must outlive any one failure
                busy_since = None
                if _transient(exc):
                    log.warning("intake: the store failed (%s: %s); retrying", type(exc).__name__, exc)
                    self._stop.wait(1.0)
                elif one_by_one:
                    try:
                        quarantine(self.engine, self.options, exc)
                    except Exception:  # noqa: BLE001
                        log.exception("intake: could not quarantine a request; retrying")
                        self._stop.wait(1.0)
                    one_by_one = 0
                else:
                    log.warning(
                        "intake: a batch failed (%s); retrying one request at a time", type(exc).__name__
                    )
                    one_by_one = self.options.claim_rows
                continue
            if result.requests:
                one_by_one = max(0, one_by_one - 1)
                self.processed += result.requests
                self._note_written(result.ingest)
                # Capacity: bytes ingested per second of wall time while there was always work.
                busy_since = started if busy_since is None else busy_since
                busy_bytes += result.bytes
                elapsed = time.perf_counter() - busy_since
                if elapsed >= CAPACITY_WINDOW_SECONDS:
                    rate = busy_bytes / elapsed
                    self.capacity = rate if self.capacity is None else (self.capacity + rate) / 2
                    busy_since, busy_bytes = time.perf_counter(), 0
                continue  # more may be waiting
            busy_since, busy_bytes = None, 0
            self._wake.wait(self.options.poll_seconds)
            self._wake.clear()

    def _note_written(self, result: IngestResult) -> None:
        """Refresh the planner statistics of tables the intake changed substantially (as file ingest
        does between transactions)."""
        self._written.update(result.written)
        if sum(self._written.values()) < STATISTICS_CHECK_ROWS:
            return
        try:
            stale = stale_statistics(self.engine, self._written)
            if stale:
                refresh_statistics(self.engine, stale)
        except Exception:  # noqa: BLE001 - statistics are an optimisation
            log.exception("intake: could not refresh statistics")
        self._written.clear()


def drain(engine: Engine, options: IntakeOptions = IntakeOptions()) -> int:
    """Process the queue until it is empty (tests, ``omni serve`` at shutdown); returns the requests
    ingested."""
    total = 0
    while True:
        result = process_once(engine, options)
        if not result.requests and not backlog_of(engine):
            return total
        total += result.requests


def backlog_of(engine: Engine) -> int:
    with engine.connect() as conn:
        return backlog(conn)


__all__ = [
    "BATCH",
    "CALLS",
    "Accepted",
    "IntakeOptions",
    "IntakeProcessor",
    "IntakeResult",
    "append",
    "backlog",
    "drain",
    "process_once",
    "QueueState",
    "queue_state",
    "quarantine",
]
