"""Ingestion of Segment-spec payloads into the profile store.

How it batches and reads is :class:`IngestOptions` (the CLI and flows build it from the settings,
``OMNI_INGEST_*``). Input is streamed and handled in batches (``batch_size``, default 5,000 payloads), so
memory stays flat whatever the input size. Several batches share a transaction (``transaction_size``,
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

Step 1 needs no database, so it is split from the rest: :func:`prepare_batch` turns raw payloads into
:class:`PreparedBatch` (rows in the driver's form, the identities, rejections), :func:`store_prepared`
writes one. For JSON lines with more than one batch, the reader hands over raw lines and
``parse_workers`` processes (default 1) parse and prepare the next batches while this one
is written: the two halves cost about the same, and raw lines and prepared tuples are cheap to pass
between processes (parsed payload objects are not). Batches are stored in input order either way.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, NamedTuple

import orjson
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.clock import utcnow
from omni.core.collector import collect_now, collector_paused
from omni.core.settings import Settings
from profiles.bulk import (
    dialect_of,
    execute_sql,
    in_list,
    insert_new_rows,
    insert_values,
    json_text,
    list_param,
    read_json,
    read_timestamp,
    timestamp_param,
    update_rows,
)
from profiles.commerce import CARRIED_EVENTS, CommerceEvent, apply_commerce, plan_commerce
from profiles.consent import ConsentDecision, apply_consents
from profiles.db import refresh_statistics, session_scope, stale_statistics
from profiles.identity import (
    PROFILE_COLUMNS,
    Resolution,
    empty_profile,
    insert_customers,
    insert_identities,
    resolve_batch,
)
from profiles.models import Customer, Event, RejectedEvent
from profiles.reader import LineChunk, RawItem, iter_input, parse_chunk
from profiles.segment import (
    COMMERCE_EVENTS,
    DEFAULT_PHONE_REGION,
    Rejected,
    find_unstorable,
    validate_payload,
)

SAMPLE_REJECTIONS = 20
# Serialises ingestion batches across processes on PostgreSQL (SQLite's BEGIN IMMEDIATE does it there).
INGEST_LOCK_KEY = 0x0D1A6E57


class InputNotFound(FileNotFoundError):
    """An input path that does not exist or cannot be read."""


def _default(name: str) -> Any:
    """The default of the setting ``name`` (never the environment's value: the CLI and flows pass that)."""
    return Settings.model_fields[name].default


def _max_future(hours: float) -> timedelta | None:
    return timedelta(hours=hours) if hours > 0 else None


@dataclass(frozen=True, slots=True)
class IngestOptions:
    """How ingest batches, parses and validates its input; :meth:`of` reads them from the settings."""

    # Payloads validated, resolved and stored per batch (and raw lines read per chunk).
    batch_size: int = _default("ingest_batch_size")
    # Payloads per transaction (whole batches; at least one batch).
    transaction_size: int = _default("ingest_transaction_size")
    # Processes that parse JSON lines while the store is written; 0: in-process.
    parse_workers: int = _default("ingest_parse_workers")
    # ISO country for phone numbers written without a +country code.
    default_region: str = DEFAULT_PHONE_REGION
    # How far ahead of its time of receipt a payload's event time may be (None: no limit).
    max_future: timedelta | None = _max_future(_default("ingest_max_future_hours"))

    @classmethod
    def of(cls, settings: Settings) -> IngestOptions:
        return cls(
            batch_size=settings.ingest_batch_size,
            transaction_size=settings.ingest_transaction_size,
            parse_workers=settings.ingest_parse_workers,
            default_region=settings.default_phone_region,
            max_future=_max_future(settings.ingest_max_future_hours),
        )


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    # Payloads rejected by this run, including those rejected (and stored) by an earlier run of the same
    # input: rejected_events keeps each (source, raw text) once.
    rejected: int = 0
    # The first rejections (source, reason), for people; all of them are in rejected_events.
    samples: list[tuple[str, str]] = field(default_factory=list)
    # Rows written (at most) per table, for the statistics refresh at the end of a run.
    written: Counter[str] = field(default_factory=Counter)

    @property
    def read(self) -> int:
        return self.accepted + self.duplicates + self.rejected

    def as_dict(self) -> dict[str, int]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "rejected": self.rejected}

    def add(self, other: IngestResult) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.written.update(other.written)
        self.samples.extend(other.samples[: max(0, SAMPLE_REJECTIONS - len(self.samples))])


# The columns of an event row, in the order prepared rows hold them (customer_id and received_at are
# added when the row is stored).
EVENT_COLUMNS = (
    "message_id",
    "customer_id",
    "type",
    "name",
    "channel",
    "properties",
    "context",
    "user_id",
    "anonymous_id",
    "occurred_at",
    "received_at",
)


class ProfileUpdate(NamedTuple):
    """What a payload changes on its customer's profile besides the event itself."""

    occurred_at: datetime
    traits: dict | None  # identify: its traits (else None)
    profile: dict[str, Any]  # identify: the normalised profile fields
    consents: tuple[tuple[str, str, str], ...]  # (channel, status, source)
    context_timezone: str | None


class PreparedEvent(NamedTuple):
    """A valid payload, ready to store: identities to resolve, and its event row in driver form."""

    message_id: str
    type: str
    name: str | None
    identities: list[tuple[str, str]]
    previous_id: str | None
    # message_id, type, name, channel, properties, context, user_id, anonymous_id, occurred_at
    row: tuple
    change: ProfileUpdate | None


class PreparedBatch(NamedTuple):
    events: list[PreparedEvent]
    rejected: list[tuple[str, str, str]]  # (source, raw text, reason)
    duplicates: int  # repeated message ids within the batch


def _prepare_one(
    item: RawItem,
    *,
    now: datetime,
    default_region: str,
    timestamp: Callable,
    future: timedelta | None,
    correct_clock_skew: bool = False,
) -> PreparedEvent:
    p = validate_payload(
        item.value,
        size=item.size,
        received_at=now,
        default_region=default_region,
        raw=item.text,
        max_future=future,
        correct_clock_skew=correct_clock_skew,
    )
    change = None
    if p.type == "identify" or p.consents or p.context_timezone:
        change = ProfileUpdate(
            p.occurred_at,
            p.traits,
            p.profile,
            tuple((c.channel, c.status, c.source) for c in p.consents),
            p.context_timezone,
        )
    row = (
        p.message_id,
        p.type,
        p.name,
        p.channel,
        json_text(p.properties),
        json_text(p.context),
        p.user_id,
        p.anonymous_id,
        timestamp(p.occurred_at),
    )
    return PreparedEvent(p.message_id, p.type, p.name, p.identities, p.previous_id, row, change)


def prepare_batch(
    items: Iterable[RawItem],
    *,
    now: datetime,
    default_region: str,
    dialect: str,
    future: timedelta | None,
    correct_clock_skew: bool = False,
) -> PreparedBatch:
    """Validate a batch of raw payloads (no database involved); the first of a repeated messageId wins.
    ``correct_clock_skew``: payloads straight from their senders (the tracking API, see
    :func:`profiles.segment.validate_payload`); never for files, whose time of receipt is not when they
    were sent.

    Whatever goes wrong with one payload rejects that payload with the reason, never the batch: an
    unexpected error while validating it is a rejection too ("cannot be validated: ...").
    """
    events: list[PreparedEvent] = []
    rejected: list[tuple[str, str, str]] = []
    duplicates = 0
    seen: set[str] = set()
    timestamp = timestamp_param(dialect)
    for item in items:
        if item.error is not None:
            rejected.append((item.source, item.text, item.error))
            continue
        try:
            event = _prepare_one(
                item,
                now=now,
                default_region=default_region,
                timestamp=timestamp,
                future=future,
                correct_clock_skew=correct_clock_skew,
            )
        except Rejected as exc:
            rejected.append((item.source, item.text, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one payload never stops the batch
            rejected.append((item.source, item.text, f"cannot be validated: {type(exc).__name__}: {exc}"))
            continue
        if event.message_id in seen:
            duplicates += 1
            continue
        seen.add(event.message_id)
        events.append(event)
    return PreparedBatch(events, rejected, duplicates)


def prepare_chunk(
    chunk: LineChunk,
    now: datetime,
    default_region: str,
    dialect: str,
    future: timedelta | None,
) -> PreparedBatch:
    """:func:`prepare_batch` of a chunk of raw JSON lines: what a parse worker process runs."""
    return prepare_batch(
        parse_chunk(chunk), now=now, default_region=default_region, dialect=dialect, future=future
    )


def _jobs(units: Iterable[RawItem | LineChunk], size: int) -> Iterator[list[RawItem] | LineChunk]:
    """Group the reader's output into batches: parsed items by ``size``, chunks of lines as they are."""
    batch: list[RawItem] = []
    for unit in units:
        if isinstance(unit, LineChunk):
            if batch:
                yield batch
                batch = []
            yield unit
            continue
        batch.append(unit)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepared_batches(
    units: Iterable[RawItem | LineChunk],
    *,
    size: int,
    now: datetime,
    default_region: str,
    dialect: str,
    workers: int,
    future: timedelta | None,
) -> Iterator[PreparedBatch]:
    """Prepared batches in input order; chunks of lines after the first go to ``workers`` processes.

    At most ``workers + 1`` chunks are read ahead of the batch being stored, so memory stays flat.
    The first chunk is prepared here: a small input never pays for starting a process.
    """
    pool: ProcessPoolExecutor | None = None
    pending: deque[Future | Callable[[], PreparedBatch]] = deque()
    chunks = 0
    try:
        for job in _jobs(units, size):
            if isinstance(job, LineChunk):
                chunks += 1
                if workers > 0 and chunks > 1:
                    if pool is None:
                        # spawn, not fork: the caller may hold threads (Prefect) and open connections.
                        pool = ProcessPoolExecutor(
                            workers,
                            mp_context=multiprocessing.get_context("spawn"),
                            initializer=gc.disable,  # a worker's objects die with each chunk
                        )
                    pending.append(pool.submit(prepare_chunk, job, now, default_region, dialect, future))
                else:
                    pending.append(lambda job=job: prepare_chunk(job, now, default_region, dialect, future))
            else:
                pending.append(
                    lambda job=job: prepare_batch(
                        job, now=now, default_region=default_region, dialect=dialect, future=future
                    )
                )
            if workers > 0 and chunks == 1 and isinstance(job, LineChunk):
                # The first chunk waits for the next job to be read: when that is a chunk too, the worker
                # starts (a new interpreter: about a second) and prepares it while this one is stored.
                continue
            # Only work in a process is worth reading ahead for; the rest is prepared when its turn comes.
            while pending and (not isinstance(pending[0], Future) or len(pending) > workers + 1):
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _result(job: Future | Callable[[], PreparedBatch]) -> PreparedBatch:
    return job.result() if isinstance(job, Future) else job()


def ingest_items(
    engine: Engine,
    items: Iterable[RawItem | LineChunk],
    *,
    options: IngestOptions = IngestOptions(),
    now: datetime | None = None,
    on_batch: Callable[[IngestResult], None] | None = None,
) -> IngestResult:
    """Store a stream of raw payloads (or chunks of raw JSON lines). ``now`` is the receive time."""
    per_transaction = max(options.batch_size, options.transaction_size)
    received_at = now or utcnow()
    total = IngestResult()
    # Rows written per table since its statistics were last refreshed (by this run).
    unrefreshed: Counter[str] = Counter()
    # When the statistics are next checked mid-run: after the first transaction, then each time the
    # payloads read have doubled (see _refresh_statistics).
    next_check = per_transaction
    batches = prepared_batches(
        items,
        size=options.batch_size,
        now=received_at,
        default_region=options.default_region,
        dialect=engine.dialect.name,
        workers=options.parse_workers,
        future=options.max_future,
    )
    try:
        with collector_paused():
            batch = next(batches, None)
            while batch is not None:
                in_transaction = 0
                with session_scope(engine) as session:
                    while batch is not None and in_transaction < per_transaction:
                        result = store_prepared(session, batch, now=received_at)
                        in_transaction += result.read
                        total.add(result)
                        unrefreshed.update(result.written)
                        if on_batch:
                            on_batch(result)
                        batch = next(batches, None)
                collect_now()
                if batch is not None and total.read >= next_check:
                    _refresh_statistics(engine, unrefreshed)
                    next_check = 2 * total.read
    except BaseException:
        # What was committed before the failure changed the tables as much (best effort: the
        # failure may be the database's).
        with suppress(Exception):
            _refresh_statistics(engine, unrefreshed)
        raise
    finally:
        batches.close()  # stops the parse workers at once when storing failed
    _refresh_statistics(engine, unrefreshed)
    return total


def _refresh_statistics(engine: Engine, unrefreshed: Counter[str]) -> None:
    """ANALYZE the tables this run changed substantially since their last refresh (see
    :func:`profiles.db.stale_statistics`), and forget their writes. PostgreSQL's autovacuum may be off
    or late; SQLite has no such thing.

    At the end of a run, so that the next audience build or tick is planned from what the store now
    holds. Mid-run too, between transactions, because ingest's own lookups plan on them: on a store
    without statistics PostgreSQL reads ``customer_id = ANY(5,000 ids)`` as most of ``events`` and
    looks a batch's customers' commerce up by scanning every commerce event stored (measured: 2.2 s a
    batch at 200,000 events, 0.14 s once analyzed, so each batch cost more than the last). The checks
    are spaced out (after the first transaction, then each time the payloads read double) so a long run
    pays for a handful of ANALYZEs, each of which samples a fixed number of rows.
    """
    changed = {table: rows for table, rows in unrefreshed.items() if rows > 0}
    if not changed:
        return
    stale = stale_statistics(engine, changed)
    if stale:
        refresh_statistics(engine, stale)
    for table in stale:
        del unrefreshed[table]


def ingest_payloads(
    engine: Engine,
    payloads: Iterable[Any],
    *,
    options: IngestOptions = IngestOptions(),
    source: str = "api",
    now: datetime | None = None,
) -> IngestResult:
    """Store already-parsed payloads (dicts, or batch envelopes), e.g. from a flow or a webhook."""
    from profiles.reader import expand_value

    def items() -> Iterator[RawItem]:
        for index, value in enumerate(payloads):
            item_source = f"{source} [item {index}]"
            # Objects handed over in Python may hold what no JSON text does (NaN, lone surrogates,
            # integers beyond 64 bits): checked here, as orjson checks JSON text read from files.
            problem = find_unstorable(value)
            try:
                text_value = orjson.dumps(value, default=str).decode()
            except (orjson.JSONEncodeError, TypeError) as exc:
                text_value, problem = repr(value), problem or f"cannot be written as JSON: {exc}"
            if problem:
                yield RawItem(
                    item_source, text_value, len(text_value.encode("utf-8", "replace")), error=problem
                )
                continue
            yield from expand_value(value, item_source, text_value, len(text_value.encode()))

    return ingest_items(engine, items(), options=options, now=now)


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
    options: IngestOptions = IngestOptions(),
    now: datetime | None = None,
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
                ingest_items(
                    engine,
                    iter_input(stream, name, on_bytes, chunk_lines=options.batch_size),
                    options=options,
                    now=now,
                )
            )
        finally:
            if path != "-":
                stream.close()
    return total


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INGEST_LOCK_KEY})


def store_prepared(session: Session, batch: PreparedBatch, *, now: datetime) -> IngestResult:
    """Dedupe against the store, resolve and store one prepared batch inside the caller's transaction."""
    _lock(session)
    result = IngestResult(duplicates=batch.duplicates)
    result.samples = [(source, reason) for source, _, reason in batch.rejected[:SAMPLE_REJECTIONS]]
    events = batch.events
    stored = _existing_message_ids(session, [e.message_id for e in events])
    if stored:
        result.duplicates += sum(1 for e in events if e.message_id in stored)
        events = [e for e in events if e.message_id not in stored]

    if events:
        resolution = resolve_batch(session, events, now=now)
        customer_ids = resolution.customer_ids
        _count_writes(result.written, events, customer_ids)
        changes = [
            (customer_id, e.change)
            for e, customer_id in zip(events, customer_ids, strict=True)
            if e.change is not None
        ]
        # Every profile the batch changes is written once: new customers inserted with theirs, merge
        # survivors and the other customers it identifies updated.
        _write_profiles(session, changes, resolution, now=now)
        insert_identities(session, resolution.identities, now=now)
        commerce = plan_commerce(session, *_commerce_events(events, customer_ids, resolution.merged))
        received = timestamp_param(dialect_of(session))(now)
        insert_values(
            session,
            Event.__table__,
            EVENT_COLUMNS,
            [
                (e.row[0], customer_id, *e.row[1:], received)
                for e, customer_id in zip(events, customer_ids, strict=True)
            ],
        )
        # A feed's consent decision counts from its event time, but never from later than Omni
        # received it: a payload cannot claim a decision from the future (see profiles.consent).
        apply_consents(
            session,
            (
                ConsentDecision(customer_id, channel, status, source, min(change.occurred_at, now))
                for customer_id, change in changes
                for channel, status, source in change.consents
            ),
            now=now,
        )
        apply_commerce(session, commerce)
    result.written["rejected_events"] += store_rejections(session, batch.rejected, now=now)
    result.accepted = len(events)
    result.rejected = len(batch.rejected)
    return result


REJECTED_SOURCE_CHARS = RejectedEvent.__table__.c.source.type.length


def storable_text(value: str) -> str:
    """``value`` with what PostgreSQL cannot store in text escaped: NUL as ``\\u0000`` and lone
    surrogates as ``\\udXXX`` (the raw text of a rejection must be kept whatever it holds)."""
    if value.isascii() and "\x00" not in value:
        return value
    return value.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")


def rejection_hash(source: str, raw: str) -> str:
    """What makes a stored rejection unique: its source (``file:line``) and raw text, so that running
    the same input again stores nothing new, while the same bad payload on two lines is kept twice."""
    return hashlib.sha256(f"{source}\n{raw}".encode()).hexdigest()


def store_rejections(session: Session, rejected: Sequence[tuple[str, str, str]], *, now: datetime) -> int:
    """Keep rejected payloads (source, raw text, reason) in ``rejected_events``, each (source, raw text)
    once: one already stored (by an earlier run of the same input) is skipped. Returns the rows written
    at most."""
    if not rejected:
        return 0
    rows: dict[str, dict[str, Any]] = {}
    for source, raw, reason in rejected:
        source, raw = storable_text(source)[:REJECTED_SOURCE_CHARS], storable_text(raw)
        digest = rejection_hash(source, raw)
        rows.setdefault(
            digest,
            {
                "source": source,
                "raw": raw,
                "reason": storable_text(reason),
                "received_at": now,
                "raw_hash": digest,
            },
        )
    insert_new_rows(session, RejectedEvent.__table__, list(rows.values()), ("raw_hash",))
    return len(rows)


def _count_writes(
    written: Counter[str], events: Sequence[PreparedEvent], customer_ids: Sequence[int]
) -> None:
    """Upper bounds of the rows a batch writes per table (for the statistics refresh)."""
    written["events"] += len(events)
    written["customers"] += len(set(customer_ids))
    written["identities"] += sum(len(e.identities) + (e.previous_id is not None) for e in events)
    written["consents"] += sum(len(e.change.consents) for e in events if e.change is not None)
    commerce = sum(1 for e in events if e.type == "track" and e.name in COMMERCE_EVENTS)
    if commerce:
        written["carts"] += commerce
        written["orders"] += commerce


def _commerce_events(
    events: Sequence[PreparedEvent], customer_ids: Sequence[int], merged: set[int]
) -> tuple[dict[int, list[CommerceEvent]], set[int]]:
    """The batch's product and Order Completed events by customer, and the customers whose commerce
    must be re-derived whatever the store holds: those with an Order Updated in the batch, and merge
    survivors (see :func:`profiles.commerce.plan_commerce`)."""
    carried: dict[int, list[CommerceEvent]] = defaultdict(list)
    rebuild = set(merged)
    for event, customer_id in zip(events, customer_ids, strict=True):
        if event.type != "track" or event.name not in COMMERCE_EVENTS:
            continue
        if event.name in CARRIED_EVENTS:
            # Read back from the prepared row: a batch prepared in a parse worker arrives as driver
            # values only, since passing parsed dicts between processes cost more than this.
            row = event.row  # message_id, type, name, channel, properties, context, ..., occurred_at
            carried[customer_id].append(
                CommerceEvent(event.name, row[3], row[0], orjson.loads(row[4]) or {}, read_timestamp(row[8]))
            )
        else:
            rebuild.add(customer_id)
    return carried, rebuild


def _existing_message_ids(session: Session, message_ids: Sequence[str]) -> set[str]:
    dialect = dialect_of(session)
    sql = f"SELECT message_id FROM events WHERE {in_list('message_id', dialect)}"
    found: set[str] = set()
    for chunk in chunked(message_ids, 10_000):
        found.update(row[0] for row in execute_sql(session, sql, (list_param(chunk, dialect),)))
    return found


PROFILE_READ = (
    "traits",
    "traits_at",
    "context_timezone",
    "context_timezone_at",
    "created_at",
    *PROFILE_COLUMNS,
)


def _write_profiles(
    session: Session,
    changes: Sequence[tuple[int, ProfileUpdate]],
    resolution: Resolution,
    *,
    now: datetime,
) -> None:
    """Write the profile of every customer the batch makes or changes, each once: apply identify traits
    and context timezones to the profile each customer had before the batch (a new customer's is empty;
    a merge survivor's is the merged one), insert the new customers and update the others.

    A newer identify overwrites; an older one (than the newest already applied) only fills what is
    missing, so the profile does not depend on arrival order.
    """
    identifies: dict[int, list[ProfileUpdate]] = defaultdict(list)
    zones: dict[int, tuple[datetime, str]] = {}
    for customer_id, change in changes:
        if change.traits or change.profile:
            identifies[customer_id].append(change)
        if change.context_timezone:
            current = zones.get(customer_id)
            if current is None or change.occurred_at >= current[0]:
                zones[customer_id] = (change.occurred_at, change.context_timezone)
    created = resolution.created
    merged = resolution.profiles
    new = set(created)
    stored = {
        customer_id: profile
        for customer_id, profile in _stored_profiles(
            session, sorted((set(identifies) | set(zones)) - new - merged.keys())
        )
    }
    stored.update(merged)
    updates = [
        _changed_profile(stored[customer_id], identifies.get(customer_id, ()), zones.get(customer_id), now)
        for customer_id in sorted(stored)
    ]
    inserts = [
        _changed_profile(
            empty_profile(customer_id, now), identifies.get(customer_id, ()), zones.get(customer_id), now
        )
        if customer_id in identifies or customer_id in zones
        else empty_profile(customer_id, now)
        for customer_id in created
    ]
    insert_customers(session, inserts)
    update_rows(session, Customer.__table__, "id", updates)


def _stored_profiles(session: Session, customer_ids: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, profile) of customers as stored, in the form of :func:`profiles.identity.empty_profile`."""
    if not customer_ids:
        return
    dialect = dialect_of(session)
    sql = f"SELECT id, {', '.join(PROFILE_READ)} FROM customers WHERE {in_list('id', dialect)}"
    for chunk in chunked(customer_ids, 5000):
        for customer_id, traits, traits_at, zone, zone_at, created_at, *profile in execute_sql(
            session, sql, (list_param(chunk, dialect),)
        ):
            yield (
                customer_id,
                {
                    "id": customer_id,
                    **dict(zip(PROFILE_COLUMNS, profile, strict=True)),
                    "traits": read_json(traits) or {},
                    "traits_at": read_timestamp(traits_at),
                    "context_timezone": zone,
                    "context_timezone_at": read_timestamp(zone_at),
                    "created_at": read_timestamp(created_at),
                },
            )


def _changed_profile(
    profile: dict[str, Any],
    identifies: Sequence[ProfileUpdate],
    zone: tuple[datetime, str] | None,
    now: datetime,
) -> dict[str, Any]:
    """``profile`` (a row of :func:`_stored_profiles`) with a batch's identifies and latest context
    timezone applied, as the row to write (``updated_at`` now)."""
    values = {column: profile[column] for column in PROFILE_COLUMNS}
    traits = dict(profile["traits"])
    traits_at = profile["traits_at"]
    zone_name, zone_at = profile["context_timezone"], profile["context_timezone_at"]
    for payload in sorted(identifies, key=lambda u: u.occurred_at):
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
    if zone is not None:
        at, name = zone
        if zone_at is None or at >= zone_at:
            zone_name, zone_at = name, at
    return {
        "id": profile["id"],
        **values,
        "traits": traits,
        "traits_at": traits_at,
        "context_timezone": zone_name,
        "context_timezone_at": zone_at,
        "created_at": profile["created_at"],
        "updated_at": now,
    }
