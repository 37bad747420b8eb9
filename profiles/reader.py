"""Streaming reader of Segment input: JSON lines, or one JSON document (an array of payloads or a
``batch`` envelope), told apart by content, never by file name.

Every payload comes out as a :class:`RawItem` carrying its source (``file:line``), its raw text and the
parsed value, or the reason it could not be parsed. Memory stays flat for JSON lines and for JSON
arrays of any size; a ``batch`` envelope is read whole (Segment caps one at 500 KB).

How the two are told apart: when the first line is a complete JSON value and more content follows,
the input is JSON lines; when the first line is not complete JSON on its own, the input is one JSON
document spread over lines; a single line holding an array or a batch envelope is that document.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

FIRST_LINE_LIMIT = 1 << 20  # a first line longer than this is not a JSON-lines payload
CHUNK = 1 << 16
MAX_ELEMENT_BYTES = 1 << 20  # an array element that does not parse within this many bytes is malformed

_UNPARSED = object()


@dataclass(slots=True)
class RawItem:
    source: str  # "orders.jsonl:12", "export.json:3 [item 7]"
    text: str  # the payload as received (re-serialised for items of a document)
    size: int  # bytes, for the 32 KB limit
    value: Any = _UNPARSED
    error: str | None = None  # why it could not be parsed

    @property
    def parsed(self) -> bool:
        return self.value is not _UNPARSED


ProgressCallback = Callable[[int], None]

CHUNK_LINES = 5000
CHUNK_BYTES = 8 << 20  # a chunk of lines never holds more than this much raw input


@dataclass(slots=True)
class LineChunk:
    """Consecutive non-blank lines of a JSON-lines input, not parsed yet: ``(line number, bytes)``.

    Raw bytes cost next to nothing to hand to another process, so parsing and validation of a chunk
    can run beside the process that writes the store (``profiles.ingest``).
    """

    name: str
    lines: list[tuple[int, bytes]]


def parse_chunk(chunk: LineChunk) -> Iterator[RawItem]:
    for line_no, line in chunk.lines:
        yield from _parse_line(line, f"{chunk.name}:{line_no}")


def _describe_orjson_error(exc: Exception) -> str:
    return f"invalid JSON: {exc}"


def _is_batch(value: Any) -> bool:
    return isinstance(value, dict) and "batch" in value and value.get("type") in (None, "batch")


def expand_value(value: Any, source: str, text: str, size: int) -> Iterator[RawItem]:
    """One parsed top-level value into payload items: a batch envelope into its items (outer
    ``context`` and ``integrations`` merged into each), anything else into itself."""
    if not _is_batch(value):
        yield RawItem(source, text, size, value)
        return
    items = value.get("batch")
    if not isinstance(items, list):
        yield RawItem(source, text, size, error="batch envelope whose 'batch' is not an array")
        return
    outer_context = value.get("context")
    outer_integrations = value.get("integrations")
    for index, item in enumerate(items):
        item_source = f"{source} [batch item {index}]"
        if isinstance(item, dict):
            if isinstance(outer_context, dict):
                inner = item.get("context")
                item = {**item, "context": {**outer_context, **(inner if isinstance(inner, dict) else {})}}
            if isinstance(outer_integrations, dict):
                inner = item.get("integrations")
                item = {
                    **item,
                    "integrations": {**outer_integrations, **(inner if isinstance(inner, dict) else {})},
                }
        try:
            item_text = orjson.dumps(item).decode()
        except orjson.JSONEncodeError as exc:  # a value the JSON text it came from could not hold
            yield RawItem(item_source, repr(item), 0, error=f"cannot be written as JSON: {exc}")
            continue
        yield RawItem(item_source, item_text, len(item_text.encode()), item)


def _parse_line(line: bytes, source: str) -> Iterator[RawItem]:
    stripped = line.strip()
    try:
        value = orjson.loads(stripped)
    except orjson.JSONDecodeError as exc:
        yield RawItem(
            source, stripped.decode("utf-8", "replace"), len(stripped), error=_describe_orjson_error(exc)
        )
        return
    text = stripped.decode("utf-8", "replace")
    if isinstance(value, list):
        yield RawItem(
            source, text, len(stripped), error="a JSON-lines line must be one JSON object, got an array"
        )
        return
    yield from expand_value(value, source, text, len(stripped))


class _Input:
    """A binary stream with a push-back buffer of lines already read."""

    def __init__(self, stream: IO[bytes], on_bytes: ProgressCallback | None) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.on_bytes = on_bytes or (lambda n: None)

    def readline(self) -> bytes:
        if self.pending:
            return self.pending.pop(0)
        line = self.stream.readline()
        self.on_bytes(len(line))
        return line

    def read(self, n: int) -> bytes:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            return data
        data = self.stream.read(n)
        self.on_bytes(len(data))
        return data


def iter_raw_items(
    stream: IO[bytes], name: str, on_bytes: ProgressCallback | None = None
) -> Iterator[RawItem]:
    """Yield every payload in ``stream`` (binary) as a RawItem, in order; ``name`` prefixes sources."""
    for unit in iter_input(stream, name, on_bytes):
        if isinstance(unit, LineChunk):
            yield from parse_chunk(unit)
        else:
            yield unit


def iter_input(
    stream: IO[bytes],
    name: str,
    on_bytes: ProgressCallback | None = None,
    *,
    chunk_lines: int = CHUNK_LINES,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[RawItem | LineChunk]:
    """Everything in ``stream``, in order: JSON lines as :class:`LineChunk` s of at most ``chunk_lines``
    lines (and about ``chunk_bytes``), the payloads of a JSON document as parsed :class:`RawItem` s."""
    source = _Input(stream, on_bytes)
    line_no = 0
    first = b""
    # Skip leading blank lines (and a UTF-8 byte-order mark).
    while True:
        first = source.readline()
        line_no += 1
        if not first:
            return
        if line_no == 1 and first.startswith(codecs.BOM_UTF8):
            first = first[len(codecs.BOM_UTF8) :]
        if first.strip():
            break
    first_line_no = line_no
    head = first.lstrip()[:1]
    if head in (b"[", b"{") and len(first) <= FIRST_LINE_LIMIT:
        try:
            first_value = orjson.loads(first.strip())
        except orjson.JSONDecodeError:
            first_value = _UNPARSED
        if first_value is _UNPARSED:
            # Not complete on its own line: one JSON document spread over lines.
            source.pending.append(first)
            yield from _iter_document(source, name, first_line_no)
            return
        # Look ahead for more content: if there is any, this is JSON lines.
        lookahead: list[bytes] = []
        while True:
            nxt = source.readline()
            if not nxt:
                break
            lookahead.append(nxt)
            if nxt.strip():
                break
        if not any(chunk.strip() for chunk in lookahead):
            # The whole input is this one line: a document (array, batch envelope or one payload).
            text = first.strip().decode("utf-8", "replace")
            if isinstance(first_value, list):
                for index, element in enumerate(first_value):
                    element_text = orjson.dumps(element).decode()  # parsed by orjson: it round-trips
                    yield from expand_value(
                        element,
                        f"{name}:{first_line_no} [item {index}]",
                        element_text,
                        len(element_text.encode()),
                    )
            else:
                yield from expand_value(first_value, f"{name}:{first_line_no}", text, len(first.strip()))
            return
        source.pending.extend(lookahead)
    lines: list[tuple[int, bytes]] = [(first_line_no, first)]
    size = len(first)
    while True:
        line = source.readline()
        if not line:
            break
        line_no += 1
        if line.strip():
            lines.append((line_no, line))
            size += len(line)
            if len(lines) >= chunk_lines or size >= chunk_bytes:
                yield LineChunk(name, lines)
                lines, size = [], 0
    if lines:
        yield LineChunk(name, lines)


def _document_value(value: Any, text: str, source: str) -> Iterator[RawItem]:
    """A value the stdlib decoder read from a document, held to what orjson reads from JSON lines, so
    that both forms of input accept the same payloads: the stdlib accepts ``NaN``, ``Infinity``, numbers
    beyond a double (``1e400``) and lone surrogates (``"\\ud800"``), which orjson (and the store) refuse."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        yield RawItem(
            source, text, len(text.encode("utf-8", "surrogatepass")), error=_describe_orjson_error(exc)
        )
        return
    yield from expand_value(value, source, text, len(text.encode()))


def _iter_document(source: _Input, name: str, start_line: int) -> Iterator[RawItem]:
    """Stream one JSON document: array elements one at a time, anything else whole."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")
    buf = ""
    pos = 0
    eof = False
    line = start_line  # line number at ``pos``

    def refill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = source.read(CHUNK)
        if not data:
            eof = True
            buf = buf[pos:] + utf8.decode(b"", final=True)
        else:
            buf = buf[pos:] + utf8.decode(data)
        pos = 0
        return True

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buf) or not refill():
                return

    def fail(reason: str) -> Iterator[RawItem]:
        # Recovery inside malformed JSON is impossible: keep the rest of the document, bounded.
        rest = buf[pos:]
        while len(rest) < MAX_ELEMENT_BYTES and refill():
            rest = buf
        text = rest[:MAX_ELEMENT_BYTES]
        if len(rest) > MAX_ELEMENT_BYTES or not eof:
            reason += f" (the rest of the document, from line {line}, was not read; kept: first 1 MB)"
        yield RawItem(f"{name}:{line}", text, len(text.encode()), error=reason)

    def decode_value() -> tuple[Any, str] | None:
        """Decode one value at ``pos``, reading more input as needed."""
        nonlocal pos, line
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if len(buf) - pos > MAX_ELEMENT_BYTES or not refill():
                    return None
                continue
            # A number at the end of the buffer may continue in the next chunk.
            if end == len(buf) and not eof and refill():
                continue
            text = buf[pos:end]
            line += text.count("\n")
            pos = end
            return value, text

    skip_ws()
    if pos >= len(buf):
        return
    if buf[pos] != "[":
        item_line = line
        decoded = decode_value()
        if decoded is None:
            yield from fail("invalid JSON document")
            return
        value, text = decoded
        yield from _document_value(value, text, f"{name}:{item_line}")
        skip_ws()
        if pos < len(buf):
            yield from fail("unexpected content after the JSON document")
        return
    pos += 1
    index = 0
    skip_ws()
    if pos < len(buf) and buf[pos] == "]":
        pos += 1
        return
    while True:
        skip_ws()
        item_line = line
        decoded = decode_value()
        if decoded is None:
            yield from fail(f"invalid JSON in array item {index}")
            return
        value, text = decoded
        yield from _document_value(value, text, f"{name}:{item_line} [item {index}]")
        index += 1
        skip_ws()
        if pos >= len(buf):
            yield from fail("the JSON array is not closed with ']'")
            return
        if buf[pos] == ",":
            pos += 1
            continue
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                yield from fail("unexpected content after the JSON array")
            return
        yield from fail(f"expected ',' or ']' after array item {index - 1}")
        return
