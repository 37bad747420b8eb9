"""Reading input: JSON lines vs one JSON document, told apart by content; every payload has a source."""

from __future__ import annotations

import io
import json

from profiles.reader import iter_raw_items


def read(text: str | bytes, name: str = "in.json"):
    data = text.encode() if isinstance(text, str) else text
    return list(iter_raw_items(io.BytesIO(data), name))


def values(items):
    return [item.value if item.parsed else ("ERROR", item.error) for item in items]


def test_json_lines_one_payload_per_line_with_line_numbers():
    items = read('{"a": 1}\n\n{"b": 2}\n')
    assert values(items) == [{"a": 1}, {"b": 2}]
    assert [i.source for i in items] == ["in.json:1", "in.json:3"]


def test_json_lines_bad_line_array_line_and_number_line_are_one_rejection_each():
    items = read('{"a": 1}\nnot json\n[1, 2]\n42\n{"b": 2}\n')
    assert [i.parsed for i in items] == [True, False, False, True, True]
    assert items[1].error.startswith("invalid JSON")
    assert items[1].text == "not json"
    assert "got an array" in items[2].error
    assert items[3].value == 42  # a number parses; validation rejects it as not an object
    assert items[4].value == {"b": 2}


def test_pretty_printed_array_is_one_document_streamed_item_by_item():
    payloads = [{"type": "track", "n": i} for i in range(3)]
    items = read(json.dumps(payloads, indent=2))
    assert values(items) == payloads
    assert items[0].source.endswith("[item 0]")
    assert items[0].source.startswith("in.json:2")


def test_single_line_array_is_a_document_not_a_rejected_line():
    items = read('[{"a": 1}, {"b": 2}]')
    assert values(items) == [{"a": 1}, {"b": 2}]


def test_first_line_array_followed_by_more_lines_is_json_lines():
    items = read('[1]\n{"a": 1}\n')
    assert items[0].error is not None and "array" in items[0].error
    assert items[1].value == {"a": 1}


def test_batch_envelope_document_merges_context_and_integrations_into_items():
    doc = {
        "batch": [
            {"type": "identify", "userId": "u1", "context": {"ip": "1.2.3.4"}},
            {"type": "track", "userId": "u1", "event": "X", "integrations": {"All": True}},
        ],
        "context": {"library": {"name": "backend"}, "ip": "9.9.9.9"},
        "integrations": {"All": False, "Mixpanel": True},
    }
    items = read(json.dumps(doc, indent=2))
    assert len(items) == 2
    assert items[0].value["context"] == {"library": {"name": "backend"}, "ip": "1.2.3.4"}
    assert items[1].value["integrations"] == {"All": True, "Mixpanel": True}
    assert items[1].value["context"] == {"library": {"name": "backend"}, "ip": "9.9.9.9"}
    assert "[batch item 1]" in items[1].source


def test_batch_envelope_on_a_json_lines_line_is_expanded():
    line = json.dumps({"batch": [{"type": "track"}, {"type": "page"}]})
    items = read(f'{{"type": "identify"}}\n{line}\n')
    assert [i.value["type"] for i in items] == ["identify", "track", "page"]


def test_truncated_array_keeps_the_rest_as_one_rejection():
    items = read('[\n{"a": 1},\n{"b": \n')
    assert items[0].value == {"a": 1}
    assert not items[1].parsed
    assert "invalid JSON" in items[1].error
    assert '{"b":' in items[1].text


def test_garbage_after_document_is_rejected_not_ignored():
    items = read('[\n{"a": 1}\n]\ntrailing')
    assert items[0].value == {"a": 1}
    assert items[1].error == "unexpected content after the JSON array"


def test_large_array_streams_across_chunks():
    payloads = [{"type": "track", "event": "E", "n": i, "pad": "x" * 50} for i in range(5000)]
    items = read(json.dumps(payloads, indent=1))
    assert [i.value["n"] for i in items] == list(range(5000))


def test_byte_order_mark_and_invalid_utf8():
    items = read(b'\xef\xbb\xbf{"a": 1}\n{"b": "\xff"}\n')
    assert items[0].value == {"a": 1}
    assert not items[1].parsed


def test_empty_input_yields_nothing():
    assert read("") == []
    assert read("\n\n  \n") == []
