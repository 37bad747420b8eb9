"""The Segment-compatible tracking API of ``omni serve``.

``POST /v1/identify|track|page|screen|group|alias|batch`` (``/v1/import`` = batch), and the short paths
analytics.js (``@segment/analytics-next``) posts to when its ``apiHost`` points here: ``/i /t /p /s /g /a``
(one event, its type's first letter) and ``/b`` (a batch), with ``text/plain`` JSON bodies.

- Auth as Segment's: the write key as the Basic-auth user name (empty password), or ``writeKey`` in the
  body. Missing, unknown, revoked (or a read key): 401. The key's source goes on every event
  (``context.omni.source``, see :mod:`profiles.intake`); ``writeKey`` is removed before anything is stored.
- Limits as Segment's: 32 KB per call, 500 KB per batch request (413), after gzip/deflate decoding
  (``Content-Encoding``; the decoder stops at the limit, so a compression bomb costs nothing); malformed
  JSON or a body that is not an object (or a batch without a ``batch`` array): 400. Bad payloads inside a
  batch do not fail the request: they go to ``rejected_events`` when the batch is ingested.
- 200 ``{"success": true}`` only once the request is committed to the store's queue (``intake``); the
  processor ingests it within a second through the same code as files. Requests are committed in groups
  by one writer thread per process (group commit): one transaction for all requests waiting at that
  moment, so the store sees a few transactions a second rather than one per request.
- Overload: more than ``max_inflight`` requests being received or committed in this process, more than
  ``max_backlog`` requests accepted but not yet ingested, more queued than the processor ingests in
  ``max_lag`` seconds (its capacity in bytes a second, which it measures and reports, against the bytes
  queued), or the oldest queued request waiting for more than twice ``max_lag``: 429 with
  ``Retry-After`` (and ``X-RateLimit-Reset``, which analytics.js reads), instead of queueing without
  bound. Clients retry; what is accepted is visible in profiles within about ``max_lag`` seconds plus
  one transaction of the processor.
- CORS: browsers may call from ``settings.cors_origins`` only; a request with any other ``Origin`` (the
  browser sends one on every cross-site request, preflighted or not) is refused with 403.

Errors are JSON: ``{"success": false, "code": ..., "message": ...}`` (``code`` and ``message`` are what
the Segment and RudderStack SDKs log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Engine

from omni.core.clock import utcnow
from omni.core.settings import Settings
from omni.server.deps import basic_user
from profiles.apikeys import key_hash
from profiles.intake import BATCH, CALLS, Accepted, append, dump_json, parse_json, queue_state
from profiles.segment import MAX_PAYLOAD_BYTES

log = logging.getLogger("omni.server.tracking")

MAX_BATCH_BYTES = 500 * 1024  # Segment: 500 KB per batch request
SHORT_PATHS = {call[0]: call for call in CALLS} | {"b": BATCH}  # analytics.js: /t, /i, ..., /b
ALLOWED_HEADERS = "Content-Type, Authorization, Content-Encoding"
SUCCESS = b'{"success":true}'

router = APIRouter(tags=["tracking"])


DEFAULT_MAX_INFLIGHT = 128
DEFAULT_MAX_BACKLOG = 10_000
DEFAULT_MAX_LAG = 0.5
# Bytes of requests a second the processor is assumed to ingest until it has measured it (about 4,000
# events a second: a small server with PostgreSQL).
ASSUMED_CAPACITY = 1 << 20


@dataclass(frozen=True, slots=True)
class TrackingLimits:
    """When the tracking API sheds load (429)."""

    # Requests being received or committed at once, per server process.
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    # Requests accepted and not yet ingested (the queue in the store), all processes together.
    max_backlog: int = DEFAULT_MAX_BACKLOG
    # Seconds the oldest queued request may have waited (0: no limit).
    max_lag: float = DEFAULT_MAX_LAG
    # Seconds a shed client is asked to wait.
    retry_after: int = 1

    @classmethod
    def of(cls, settings: Settings) -> TrackingLimits:
        return cls(
            max_inflight=settings.intake_max_inflight,
            max_backlog=settings.intake_max_backlog,
            max_lag=settings.intake_max_lag_seconds,
        )


class IntakeWriter:
    """Commits accepted requests to the queue from one thread, in groups: every request waiting when a
    commit starts goes into that commit, then each waiting handler is answered. Also keeps the count of
    queued requests (:attr:`backlog`) and when the oldest was received (:attr:`oldest`, epoch seconds) for
    the 429 rules: exact for its own inserts, re-read from the store every ``refresh_seconds`` (other
    processes insert; processors delete), with the processor's :attr:`capacity`."""

    def __init__(
        self,
        engine: Engine,
        *,
        on_commit: Callable[[], None] | None = None,
        capacity: Callable[[], float | None] | None = None,
        max_group: int = 1000,
        refresh_seconds: float = 0.25,
    ) -> None:
        self.engine = engine
        self.on_commit = on_commit
        self.read_capacity = capacity
        self.max_group = max_group
        self.refresh_seconds = refresh_seconds
        self.backlog = 0
        self.backlog_bytes = 0
        self.oldest: float | None = None
        # Bytes of requests per second the intake processor ingests (None: not measured yet).
        self.capacity: float | None = None
        self._pending: list[tuple[Accepted, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._refreshed = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._refresh_backlog()
        self._thread = threading.Thread(target=self._run, name="omni-intake-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, accepted: Accepted) -> asyncio.Future:
        """A future of the request's source (None: the key was refused), set once committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._pending.append((accepted, loop, future))
            self._cv.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._pending and not self._stopping:
                    self._cv.wait(self.refresh_seconds)
                group, self._pending = self._pending[: self.max_group], self._pending[self.max_group :]
                stopping = self._stopping
            if group:
                self._commit(group)
            elif stopping:
                return
            if time.monotonic() - self._refreshed >= self.refresh_seconds:
                self._refresh_backlog()

    def _commit(self, group: list[tuple[Accepted, asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
        outcome: list[str | None] | Exception
        try:
            with self.engine.begin() as conn:
                outcome = append(conn, [accepted for accepted, _, _ in group])
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure (503)
            log.error("tracking: could not commit %d requests: %s: %s", len(group), type(exc).__name__, exc)
            outcome = exc
        else:
            accepted = sum(source is not None for source in outcome)
            self.backlog += accepted
            self.backlog_bytes += sum(
                request.size for (request, _, _), source in zip(group, outcome, strict=True) if source
            )
            if accepted and self.oldest is None:
                self.oldest = group[0][0].received_at.timestamp()
            if self.on_commit is not None:
                self.on_commit()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = defaultdict(list)
        for index, (_, loop, future) in enumerate(group):
            by_loop[loop].append((future, outcome if isinstance(outcome, Exception) else outcome[index]))
        for loop, answers in by_loop.items():
            try:
                loop.call_soon_threadsafe(_answer, answers)
            except RuntimeError:  # the loop is closed: the server stopped, nobody is waiting
                pass

    def _refresh_backlog(self) -> None:
        try:
            with self.engine.connect() as conn:
                self.backlog, self.backlog_bytes, oldest = queue_state(conn)
            self.oldest = oldest.timestamp() if oldest is not None else None
            if self.read_capacity is not None:
                self.capacity = self.read_capacity()
        except Exception as exc:  # noqa: BLE001 - keep the last estimate; the commit will fail loudly
            log.warning("tracking: could not count the intake queue: %s", type(exc).__name__)
        self._refreshed = time.monotonic()


def _answer(answers: list[tuple[asyncio.Future, Any]]) -> None:
    for future, value in answers:
        if future.done():  # the client went away
            continue
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)


@dataclass
class Tracking:
    """The tracking API's state in one server process (``app.state.tracking``)."""

    writer: IntakeWriter
    limits: TrackingLimits
    cors_origins: frozenset[str]
    inflight: int = 0


def tracking_state(app: Any) -> Tracking:
    """The app's tracking state, made (and its writer started) on first use."""
    state = getattr(app.state, "tracking", None)
    if state is None:
        settings: Settings = app.state.settings
        # The app's lifespan sets ``wake`` and ``capacity``: what wakes the intake processor (a thread or
        # a process), and what it says it can ingest.
        writer = IntakeWriter(
            app.state.engine,
            on_commit=getattr(app.state, "wake", None),
            capacity=getattr(app.state, "capacity", None),
        )
        writer.start()
        state = Tracking(writer, TrackingLimits.of(settings), frozenset(settings.cors_origins))
        app.state.tracking = state
    return state


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps({"success": False, "code": code, "message": message})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _header(request: Request, name: bytes) -> str | None:
    """A request header (``name`` in lower case), read from the ASGI scope: Starlette's ``headers.get``
    costs an exception for each header a request lacks (most lack Origin), on every request."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _cors(request: Request, state: Tracking) -> dict[str, str] | None:
    """CORS headers for the request's ``Origin`` ({} without one), None when the origin is refused."""
    origin = _header(request, b"origin")
    if origin is None:
        return {}
    if origin in state.cors_origins or "*" in state.cors_origins:
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return None


def _decode(body: bytes, encoding: str, limit: int) -> bytes | Response:
    """The body decoded per ``Content-Encoding``, never more than ``limit`` bytes of output."""
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        # wbits 47: gzip or zlib header, detected; "deflate" as browsers send it is zlib-wrapped.
        decoder = zlib.decompressobj(47)
        try:
            decoded = decoder.decompress(body, limit + 1)
        except zlib.error as exc:
            return _error(400, "invalid_encoding", f"the body is not valid {encoding}: {exc}")
        if len(decoded) > limit or decoder.unconsumed_tail:
            return _error(413, "payload_too_large", f"the decoded body is over {limit} bytes")
        if not decoder.eof:
            return _error(400, "invalid_encoding", f"the {encoding} body is truncated")
        return decoded
    return _error(415, "unsupported_encoding", f"Content-Encoding {encoding!r} (send gzip, deflate or none)")


async def _read_body(request: Request, limit: int) -> bytes | Response:
    declared = _header(request, b"content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        return _error(413, "payload_too_large", f"the body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _error(413, "payload_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _strip_write_key(value: dict, kind: str) -> bool:
    """Remove ``writeKey`` from the body (and from a batch's items); True if there was one."""
    found = value.pop("writeKey", None) is not None
    if kind == BATCH:
        for item in value["batch"]:
            if isinstance(item, dict) and "writeKey" in item:
                del item["writeKey"]
                found = True
    return found


def _overloaded(state: Tracking) -> str | None:
    """Why a request must be shed now, or None."""
    limits, writer = state.limits, state.writer
    if state.inflight >= limits.max_inflight:
        return "too many requests at once"
    if writer.backlog >= limits.max_backlog:
        return "the queue is full"
    if not limits.max_lag:
        return None
    # What is queued would take the processor longer than max_lag: admitting more only makes events
    # wait longer (the wait, not the 429s, is what clients cannot see).
    capacity = writer.capacity or ASSUMED_CAPACITY
    if writer.backlog_bytes > capacity * limits.max_lag:
        return "the queue is behind"
    # Backstop (a processor that stopped, or slowed down since it measured itself): the oldest waits.
    oldest = writer.oldest
    if oldest is not None and time.time() - oldest > limits.max_lag * 2:
        return "the queue is behind"
    return None


async def accept(request: Request, kind: str) -> Response:
    """Receive one call (or a batch), commit it to the queue, answer 200."""
    state = tracking_state(request.app)
    cors = _cors(request, state)
    if cors is None:
        return _error(403, "origin_not_allowed", "this origin may not send events (OMNI_CORS_ORIGINS)")
    limits = state.limits
    busy = _overloaded(state)
    if busy:
        wait = str(limits.retry_after)
        return _error(
            429,
            "overloaded",
            f"{busy}; retry later",
            {**cors, "Retry-After": wait, "X-RateLimit-Reset": wait},
        )
    state.inflight += 1
    try:
        limit = MAX_BATCH_BYTES if kind == BATCH else MAX_PAYLOAD_BYTES
        body = await _read_body(request, limit)
        if isinstance(body, bytes):
            encoding = (_header(request, b"content-encoding") or "").strip().lower()
            body = _decode(body, encoding, limit)
        if isinstance(body, Response):
            body.headers.update(cors)
            return body
        try:
            value = parse_json(body)
        except ValueError as exc:
            return _error(400, "invalid_json", f"the body is not valid JSON: {exc}", cors)
        if not isinstance(value, dict):
            return _error(400, "invalid_payload", "the body must be a JSON object", cors)
        if kind == BATCH and not isinstance(value.get("batch"), list):
            return _error(400, "invalid_batch", "a batch must have a 'batch' array of payloads", cors)
        body_key = value.get("writeKey")
        key = basic_user(request) or (body_key if isinstance(body_key, str) else None)
        if not key:
            return _error(
                401, "unauthorized", "missing write key (Basic-auth user name, or writeKey in the body)", cors
            )
        if _strip_write_key(value, kind):
            body = dump_json(value)
        # orjson accepted the body: valid UTF-8.
        accepted = Accepted(key_hash(key), kind, body.decode("utf-8"), len(body), utcnow())
        try:
            source = await state.writer.submit(accepted)
        except Exception:  # noqa: BLE001 - the store failed: the client must retry
            return _error(
                503,
                "unavailable",
                "the store could not take the request; retry",
                {**cors, "Retry-After": "5"},
            )
        if source is None:
            return _error(401, "unauthorized", "unknown or revoked write key", cors)
        request.state.source = source
        return Response(SUCCESS, media_type="application/json", headers=cors)
    finally:
        state.inflight -= 1


async def preflight(request: Request) -> Response:
    """CORS preflight: allowed origins may POST JSON (or text/plain) with the usual headers."""
    state = tracking_state(request.app)
    cors = _cors(request, state)
    if not cors:
        return _error(403, "origin_not_allowed", "this origin may not send events (OMNI_CORS_ORIGINS)")
    return Response(
        status_code=204,
        headers={
            **cors,
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


def _endpoint(path: str, kind: str) -> Callable:
    async def endpoint(request: Request) -> Response:
        request.scope["omni.route"] = path  # for the access log (plain routes leave no "route" in scope)
        return await accept(request, kind)

    endpoint.__name__ = f"track_{kind}"
    return endpoint


def _preflight(path: str) -> Callable:
    async def endpoint(request: Request) -> Response:
        request.scope["omni.route"] = path
        return await preflight(request)

    return endpoint


PATHS: dict[str, str] = {f"/v1/{call}": call for call in (*CALLS, BATCH)}
PATHS["/v1/import"] = BATCH
PATHS.update({f"/{letter}": call for letter, call in SHORT_PATHS.items()})

# Plain Starlette routes (FastAPI's dependency machinery costs more than the rest of a request here).
for _path, _kind in PATHS.items():
    router.add_route(_path, _endpoint(_path, _kind), methods=["POST"], include_in_schema=False)
    router.add_route(_path, _preflight(_path), methods=["OPTIONS"], include_in_schema=False)


_CALL_SUMMARY = {
    "identify": "Who the user is, and their traits",
    "track": "An action the user took (`event`, `properties`)",
    "page": "A page the user viewed (web)",
    "screen": "A screen the user viewed (app)",
    "group": "The account or group the user belongs to",
    "alias": "Another id of the same user (`previousId`)",
    BATCH: "Several calls at once (`batch`: up to 2,500 payloads, 500 KB)",
}


def openapi_paths() -> dict[str, Any]:
    """The tracking API in OpenAPI terms, for ``/docs`` (its routes are plain ones: FastAPI does not
    describe them itself)."""
    errors = {
        "400": "Not JSON, not an object, or a batch without a `batch` array",
        "401": "Missing, unknown or revoked write key",
        "403": "A browser origin not in OMNI_CORS_ORIGINS",
        "413": "Over 32 KB (a call) or 500 KB (a batch), after decompression",
        "415": "A Content-Encoding other than gzip or deflate",
        "429": "Overloaded: retry after `Retry-After` seconds",
        "503": "The store could not take the request: retry",
    }
    paths: dict[str, Any] = {}
    for path, kind in PATHS.items():
        short = not path.startswith("/v1/")
        summary = _CALL_SUMMARY[kind] + (" (analytics.js short path)" if short else "")
        if path == "/v1/import":
            summary = "The same as /v1/batch"
        paths[path] = {
            "post": {
                "tags": ["tracking"],
                "summary": summary,
                "description": (
                    "Segment-compatible. The write key as the Basic-auth user name (empty password) or "
                    "`writeKey` in the body. 200 once the payload is committed; it is in the profile within "
                    "about a second."
                ),
                "security": [{"writeKey": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"type": "object"}},
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": {"description": 'Stored: `{"success": true}`'},
                    **{code: {"description": text} for code, text in errors.items()},
                },
            }
        }
    return paths
