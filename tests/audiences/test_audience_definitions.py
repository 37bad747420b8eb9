"""Loading definitions: the built-ins load, and invalid ones fail naming the file, the path inside it
and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from audience_testkit import NOW

from audiences import DefinitionError, compile_condition, load_audiences, parse_condition, parse_duration
from audiences.definitions import builtin_directory


def test_builtins_load():
    definitions = load_audiences(builtin_directory())
    assert set(definitions) == {"cart_abandoners", "pickup_ready", "omnichannel_engaged", "lapsed_buyers"}
    assert all(d.description for d in definitions.values())


def test_durations():
    assert parse_duration("90d").days == 90
    assert parse_duration("1h").total_seconds() == 3600
    assert parse_duration("2w").days == 14
    assert parse_duration("15m").total_seconds() == 900
    for bad in ("7", "7x", "d7", "", "-1d", 7):
        with pytest.raises(ValueError, match="bad duration"):
            parse_duration(bad)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


INVALID = [
    (
        "name: a\nwhere:\n  all:\n    - trait: x\n      eq: 1\n    - colour: red\n",
        "where.all[1]",
        "unknown condition",
    ),
    ("name: a\nwhere:\n  event: Viewed\n  within: 7x\n", "where.within", "bad duration '7x'"),
    ("name: a\nwhere: {event: {name: Viewed, between: [7d]}}\n", "where.event.between", "two durations"),
    ("name: a\nwhere: {cart: {status: opn}}\n", "where.cart.status[0]", "'opn' is not allowed"),
    ("name: a\nwhere: {cart: {idle_for: soon}}\n", "where.cart.idle_for", "bad duration"),
    ("name: a\nwhere: {order: {count: {gte: -1}}}\n", "where.order.count.gte", "greater than or equal to 0"),
    ("name: a\nwhere: {trait: tier, equals: gold}\n", "where.equals", "unknown option"),
    ("name: a\nwhere: {trait: tier}\n", "where", "no operator"),
    ("name: a\nwhere: {trait: email, gt: 5}\n", "where", "email is text"),
    ("name: a\nwhere: {reachable: fax}\n", "where.reachable", "'fax' is not allowed"),
    ("name: a\nwhere: {not: [{trait: x, eq: 1}]}\n", "where.not", "must be a mapping"),
    ("name: a\nwhere: {all: []}\n", "where.all", "non-empty list"),
    ("name: a\nwhere: {trait: x, eq: 1, event: Y}\n", "where", "one condition per mapping"),
    ("name: a\nwhere: {sql: 'SELECT id FROM customers'}\n", "where.reviewed_by", "Field required"),
    ("name: a\nwhere: {sql: 'DELETE FROM customers', reviewed_by: me}\n", "where.sql", "must be a SELECT"),
    ("name: a\nwhere: {audience: nobody}\n", "where.audience", "unknown audience 'nobody'"),
    ("name: b\nwhere: {trait: x, eq: 1}\n", "name", "must match the file name"),
    ("name: a\nwhen: {trait: x, eq: 1}\n", "when", "unknown key"),
    ("name: a\n", "where", "missing"),
    ("name: a\nwhere: [unclosed\n", "line", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "path", "reason"), INVALID, ids=[i[2] for i in INVALID])
def test_invalid_definitions_name_file_path_and_reason(tmp_path, text, path, reason):
    file = _write(tmp_path, "a", text)
    with pytest.raises(DefinitionError) as caught:
        load_audiences(tmp_path)
    error = caught.value
    assert error.file == str(file)
    assert error.path.startswith(path), str(error)
    assert reason in error.reason, str(error)
    assert str(file) in str(error)


def test_cycle_between_audiences(tmp_path):
    _write(tmp_path, "a", "name: a\nwhere: {all: [{audience: b}, {trait: x, eq: 1}]}\n")
    _write(tmp_path, "b", "name: b\nwhere: {any: [{trait: y, eq: 1}, {audience: c}]}\n")
    _write(tmp_path, "c", "where: {audience: a}\n")  # the name defaults to the file's
    with pytest.raises(DefinitionError, match=r"cycle between audiences: a -> b -> c -> a") as caught:
        load_audiences(tmp_path)
    assert caught.value.file == str(tmp_path / "c.yaml") and caught.value.path == "where.audience"


def test_compile_condition_takes_plain_mappings():
    with pytest.raises(DefinitionError, match="unknown audience 'nobody'"):
        compile_condition({"audience": "nobody"}, now=NOW, definitions={})
    with pytest.raises(ValueError, match="naive"):
        compile_condition({"trait": "x", "eq": 1}, now=NOW.replace(tzinfo=None))
    condition = parse_condition({"event": "Viewed", "count": {"eq": 0}})
    assert compile_condition(condition, now=NOW) is not None


def test_audiences_share_the_one_definitions_loader(tmp_path):
    import omni.core.definitions as core

    assert (DefinitionError, parse_duration) == (core.DefinitionError, core.parse_duration)
    file = _write(tmp_path, "a", "- name: a\n")
    with pytest.raises(DefinitionError) as caught:
        load_audiences(tmp_path)
    assert (caught.value.file, caught.value.path, caught.value.reason) == (
        str(file),
        "",
        "expected a mapping, got list",
    )
