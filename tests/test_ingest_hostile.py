"""Hostile payloads among good ones: each is rejected with its reason before it reaches the database,
the rest of the batch is stored, and the outcome is the same on SQLite and PostgreSQL. Also: unexpected
errors while validating, re-runs that must not store rejections twice."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from profiles.db import session_scope
from profiles.ingest import IngestOptions, ingest_files, ingest_payloads
from profiles.models import Cart, Customer, Event, Identity, Order, RejectedEvent

NOW = datetime(2026, 6, 2, 12, 0, tzinfo=UTC)


def track(mid: str, event: str = "Page Viewed", **extra) -> dict:
    return {"type": "track", "userId": "u1", "event": event, "messageId": mid, **extra}


def identify(mid: str, **traits) -> dict:
    return {"type": "identify", "userId": f"user-{mid}", "messageId": mid, "traits": traits}


def line(payload: dict) -> str:
    return json.dumps(payload)


# (JSON text of one line, what its reason must contain). Written as text: some are no JSON that
# json.dumps writes (NaN, 1e400, lone surrogates).
HOSTILE: list[tuple[str, str]] = [
    # the edges of the calendar
    (line(track("t1", timestamp="0001-01-01T00:00:00+01:00")), "unparseable timestamp"),
    (line(track("t2", timestamp="9999-12-31T23:59:59-01:00")), "unparseable timestamp"),
    (line(track("t3", timestamp="10000-01-01T00:00:00Z")), "unparseable timestamp"),
    (line(track("t4", timestamp="0001-01-01T00:00:00Z")), "is before 1970-01-01"),
    (line(track("t5", sentAt="0001-01-01T00:30:00+01:00")), "unparseable sentAt"),
    (line(track("t6", timestamp="9999-12-31T23:59:59Z")), "after the time of receipt"),
    (line(track("t7", timestamp="2026-06-04T12:00:00Z")), "more than 24 hours after the time of receipt"),
    # non-finite and oversized numbers, as strings and as JSON numbers
    (
        line(track("n1", "Product Added", properties={"product_id": "p", "quantity": "Infinity"})),
        "properties.quantity must be a finite number",
    ),
    (
        line(track("n2", "Product Added", properties={"product_id": "p", "price": "NaN"})),
        "properties.price must be a finite number",
    ),
    (
        line(track("n3", "Order Completed", properties={"order_id": "o", "total": "-Infinity"})),
        "properties.total must be a finite number",
    ),
    (
        line(track("n4", "Order Completed", properties={"order_id": "o", "products": [{"price": "nan"}]})),
        "properties.products[0].price must be a finite number",
    ),
    (
        line(track("n5", "Product Added", properties={"product_id": "p", "price": 1e300})),
        "properties.price must be a finite number",
    ),
    (
        line(track("n6", "Order Completed", properties={"order_id": "o", "revenue": "1e400"})),
        "properties.revenue must be a finite number",
    ),
    (
        '{"type":"track","userId":"u1","event":"Order Completed","messageId":"n7",'
        '"properties":{"total":1e400}}',
        "invalid JSON",
    ),
    (
        '{"type":"track","userId":"u1","event":"Product Added","messageId":"n8","properties":{"price":NaN}}',
        "invalid JSON",
    ),
    # NUL anywhere: ids, traits, properties, context, keys, message id, event name
    (line(track("z1", userId="u\u0000x")), "contains a NUL character"),
    (line(identify("z2", first_name="A\u0000na")), "contains a NUL character"),
    (line(track("z3", properties={"note": "a\u0000b"})), "contains a NUL character"),
    (line(track("z4", properties={"k\u0000ey": 1})), "a key of payload.properties contains a NUL"),
    (line(track("z5", context={"page": {"url": "x\u0000"}})), "contains a NUL character"),
    (line(track("z6\u0000")), "contains a NUL character"),
    (line(track("z7", event="Viewed\u0000")), "contains a NUL character"),
    (line(identify("z8", email="ana\u0000@example.org")), "contains a NUL character"),
    # lone surrogates
    (
        '{"type":"track","userId":"u1","event":"X","messageId":"s1","properties":{"a":"\\ud800"}}',
        "invalid JSON",
    ),
    ('{"type":"identify","userId":"u\\udfff","messageId":"s2"}', "invalid JSON"),
    (
        '{"type":"track","userId":"u1","event":"X","messageId":"s3","properties":{"\\udc00":1}}',
        "invalid JSON",
    ),
    # longer than the column that would store it
    (line(track("l1", userId="u" * 513)), "userId is longer than 512"),
    (line(identify("l2", loyalty_id="L" * 513)), "traits.loyalty_id is longer than 512"),
    (line(track("l3", context={"device": {"token": "t" * 513}})), "context.device.token is longer than 512"),
    (
        line(track("l4", "Product Added", properties={"product_id": "p", "cart_id": "c" * 256})),
        "properties.cart_id is longer than 255",
    ),
    (
        line(track("l5", "Order Completed", properties={"order_id": "o", "store_id": "s" * 101})),
        "properties.store_id is longer than 100",
    ),
    (
        line(track("l6", "Order Updated", properties={"order_id": "o", "store_id": "s" * 101})),
        "properties.store_id is longer than 100",
    ),
    (line(track("l7", "Order Completed", properties={"order_id": "o" * 256})), "order_id is longer than 255"),
    (line(identify("l8", home_store_id="h" * 101)), "traits.home_store_id is longer than 100"),
    (line(identify("l9", first_name="A" * 201)), "traits.first_name is longer than 200"),
    (line(track("l10", event="E" * 256)), "event is longer than 255"),
    (line(track("l11", anonymousId="a" * 600)), "anonymousId is longer than 512"),
    (line(identify("l12", email=("a" * 320) + "@example.org")), "is not an email address"),
    # not an email address: no identity is made of it
    (line(identify("e1", email="ana silva@example.org")), "is not an email address"),
    (line(identify("e2", email="ana@b@example.org")), "is not an email address"),
    (line(identify("e3", email="ana\n@example.org")), "is not an email address"),
    (line(identify("e4", email="nobody")), "is not an email address"),
    (line(identify("e5", email="ana@example.org\r\nBcc: x@y.z")), "is not an email address"),
    (line(track("e6", context={"traits": {"email": "a\tb@example.org"}})), "context.traits.email"),
]

GOOD_COUNT = 102


def good_payloads() -> list[dict]:
    good: list[dict] = []
    for i in range(GOOD_COUNT):
        if i % 3 == 0:
            good.append(identify(f"g{i}", email=f"person{i}@example.org", first_name="Ana"))
        elif i % 3 == 1:
            good.append(
                track(
                    f"g{i}", "Product Added", properties={"product_id": f"p{i}", "price": 9.5, "quantity": 2}
                )
            )
        else:
            good.append(track(f"g{i}", timestamp="2026-06-02T20:00:00Z"))  # 8 h ahead: tolerated
    return good


def hostile_file(tmp_path, *, document: bool = False):
    """Good payloads with the hostile lines spread among them; returns (path, {source: reason})."""
    good = [line(p) for p in good_payloads()]
    lines: list[str] = []
    expected: dict[int, str] = {}
    for i, text in enumerate(good):
        lines.append(text)
        if i < len(HOSTILE):
            lines.append(HOSTILE[i][0])
            expected[len(lines)] = HOSTILE[i][1]
    assert len(HOSTILE) < len(good)
    path = tmp_path / ("hostile.json" if document else "hostile.jsonl")
    if document:
        # One JSON array over many lines: read by the streaming document reader.
        path.write_text("[\n" + ",\n".join(lines) + "\n]\n")
        return path, {f"{path}:{n + 1} [item {n - 1}]": reason for n, reason in expected.items()}
    path.write_text("\n".join(lines) + "\n")
    return path, {f"{path}:{n}": reason for n, reason in expected.items()}


def table_count(engine, model) -> int:
    with session_scope(engine) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def outcome(engine) -> dict:
    with session_scope(engine) as s:
        return {
            "events": sorted(s.execute(select(Event.message_id)).scalars()),
            "rejected": sorted(s.execute(select(RejectedEvent.source, RejectedEvent.reason)).all()),
            "identities": sorted(s.execute(select(Identity.kind, Identity.value)).all()),
            "carts": s.execute(select(func.count()).select_from(Cart)).scalar_one(),
            "orders": s.execute(select(func.count()).select_from(Order)).scalar_one(),
        }


@pytest.mark.parametrize("document", [False, True], ids=["json-lines", "json-document"])
def test_every_hostile_payload_is_rejected_with_its_reason_and_the_good_ones_are_stored(
    engine, tmp_path, document
):
    path, expected = hostile_file(tmp_path, document=document)
    result = ingest_files(engine, [str(path)], options=IngestOptions(batch_size=25), now=NOW)
    assert result.as_dict() == {"accepted": GOOD_COUNT, "duplicates": 0, "rejected": len(HOSTILE)}
    stored = outcome(engine)
    assert stored["events"] == sorted(f"g{i}" for i in range(GOOD_COUNT))
    reasons = dict(stored["rejected"])
    assert set(reasons) == set(expected)
    for source, reason in expected.items():
        assert reason in reasons[source], (source, reasons[source])
    # No identity was made of a value that is not an email address or too long for its column.
    assert all(
        "\n" not in value and " " not in value and len(value) <= 512 for _, value in stored["identities"]
    )
    assert {v for k, v in stored["identities"] if k == "email"} == {
        f"person{i}@example.org" for i in range(0, GOOD_COUNT, 3)
    }
    assert stored["carts"] == 1
    with session_scope(engine) as s:
        [value] = s.execute(select(Cart.value)).scalars()
        assert value == 9.5 * 2 * (GOOD_COUNT // 3)
        assert all(len(r.raw) > 0 for r in s.execute(select(RejectedEvent)).scalars())


def test_hostile_python_objects_handed_to_ingest_payloads_are_rejected(engine):
    """A flow or webhook hands over objects no JSON text holds: NaN, infinities, lone surrogates,
    integers beyond 64 bits, keys that are not strings."""
    hostile = [
        track("p1", "Product Added", properties={"product_id": "p", "price": float("nan")}),
        track("p2", properties={"score": float("inf")}),
        track("p3", properties={"note": "\ud800"}),
        track("p4", properties={"big": 10**30}),
        track("p5", properties={1: "x"}),
        identify("p6", first_name="\udcff"),
        track("p7", context={"traits": {"x": float("-inf")}}),
    ]
    good = [track(f"ok{i}") for i in range(5)]
    result = ingest_payloads(engine, [*good[:2], *hostile, *good[2:]], now=NOW)
    assert result.as_dict() == {"accepted": 5, "duplicates": 0, "rejected": len(hostile)}
    with session_scope(engine) as s:
        rejected = s.execute(select(RejectedEvent.source, RejectedEvent.reason, RejectedEvent.raw)).all()
    reasons = {source: reason for source, reason, _ in rejected}
    assert "not a finite number" in reasons["api [item 2]"]
    assert "not a finite number" in reasons["api [item 3]"]
    assert "lone surrogate" in reasons["api [item 4]"]
    assert "beyond 64 bits" in reasons["api [item 5]"]
    assert "not a string" in reasons["api [item 6]"]
    assert "lone surrogate" in reasons["api [item 7]"]
    assert "not a finite number" in reasons["api [item 8]"]
    assert all("\x00" not in raw and raw.encode() for _, _, raw in rejected)


def test_an_unexpected_error_while_validating_one_payload_rejects_it_and_the_batch_goes_on(
    engine, monkeypatch
):
    import profiles.ingest as ingest_module

    real = ingest_module.validate_payload

    def flaky(obj, **kwargs):
        if obj.get("messageId") == "boom":
            raise ZeroDivisionError("division by zero")
        return real(obj, **kwargs)

    monkeypatch.setattr(ingest_module, "validate_payload", flaky)
    result = ingest_payloads(engine, [track("a"), track("boom"), track("b")], now=NOW)
    assert result.as_dict() == {"accepted": 2, "duplicates": 0, "rejected": 1}
    with session_scope(engine) as s:
        [reason] = s.execute(select(RejectedEvent.reason)).scalars()
    assert reason == "cannot be validated: ZeroDivisionError: division by zero"


def test_rejections_with_nul_in_the_raw_text_are_kept_escaped(engine, tmp_path):
    path = tmp_path / "nul.jsonl"
    path.write_bytes(line(track("ok")).encode() + b'\n{"type":"track","userId":"u\x00","event":"X"}\n')
    result = ingest_files(engine, [str(path)], now=NOW)
    assert result.as_dict() == {"accepted": 1, "duplicates": 0, "rejected": 1}
    with session_scope(engine) as s:
        [raw] = s.execute(select(RejectedEvent.raw)).scalars()
    assert raw == '{"type":"track","userId":"u\\u0000","event":"X"}'


def test_running_the_same_file_again_stores_no_rejection_twice(engine, tmp_path):
    path, expected = hostile_file(tmp_path)
    first = ingest_files(engine, [str(path)], now=NOW)
    again = ingest_files(engine, [str(path)], now=NOW.replace(hour=13))
    # Re-rejections are reported as rejected (the payload still is), stored once.
    assert first.as_dict() == {"accepted": GOOD_COUNT, "duplicates": 0, "rejected": len(HOSTILE)}
    assert again.as_dict() == {"accepted": 0, "duplicates": GOOD_COUNT, "rejected": len(HOSTILE)}
    assert table_count(engine, RejectedEvent) == len(HOSTILE) == len(expected)
    with session_scope(engine) as s:
        assert set(s.execute(select(RejectedEvent.received_at)).scalars()) == {NOW}


def test_the_same_bad_payload_on_two_lines_is_kept_twice_but_once_per_line(engine):
    payloads = ["garbage", track("ok"), "garbage"]
    assert ingest_payloads(engine, payloads, now=NOW).rejected == 2
    assert ingest_payloads(engine, payloads, now=NOW).rejected == 2
    assert table_count(engine, RejectedEvent) == 2


def test_customers_are_not_made_of_rejected_payloads(engine, tmp_path):
    path, _ = hostile_file(tmp_path)
    ingest_files(engine, [str(path)], now=NOW)
    with session_scope(engine) as s:
        emails = set(s.execute(select(Customer.email).where(Customer.email.is_not(None))).scalars())
    assert emails == {f"person{i}@example.org" for i in range(0, GOOD_COUNT, 3)}
