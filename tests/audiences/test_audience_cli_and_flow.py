"""`omni audiences` commands (on both databases) and the `build_audiences` flow (SQLite, one small run)."""

from __future__ import annotations

import json

import pytest
from audience_testkit import NOW, History, days, hours
from typer.testing import CliRunner

from audiences.definitions import builtin_directory
from omni.cli import app

runner = CliRunner()


def _history(engine) -> None:
    (
        History()
        .identify("ann", email="ann@x.com")
        .add_to_cart("ann", hours(2))
        .order("bob", days(100), "o-1", channel="store")
        .ingest(engine)
    )


def _omni(database_url: str, *args: str):
    return runner.invoke(app, [*args, "--database-url", database_url])


def test_cli_list_show_build_members(engine, database_url):
    _history(engine)
    result = _omni(database_url, "audiences", "list", "--json")
    assert result.exit_code == 0, result.output
    listed = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(listed) == {"cart_abandoners", "lapsed_buyers", "omnichannel_engaged", "pickup_ready"}
    assert listed["pickup_ready"]["size"] is None

    result = _omni(database_url, "audiences", "build", "--now", NOW.isoformat(), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "cart_abandoners": {"size": 1, "entered": 1, "exited": 0},
        "lapsed_buyers": {"size": 1, "entered": 1, "exited": 0},
        "omnichannel_engaged": {"size": 0, "entered": 0, "exited": 0},
        "pickup_ready": {"size": 0, "entered": 0, "exited": 0},
    }
    result = _omni(database_url, "audiences", "build", "lapsed_buyers", "--now", NOW.isoformat(), "--json")
    assert json.loads(result.stdout) == {"lapsed_buyers": {"size": 1, "entered": 0, "exited": 0}}

    result = _omni(database_url, "audiences", "members", "cart_abandoners", "--json")
    assert result.exit_code == 0, result.output
    [member] = json.loads(result.stdout)
    assert member["email"] == "ann@x.com" and member["entered_at"].startswith("2026-06-01T12:00:00")
    assert set(member) == {"customer_id", "email", "entered_at"}
    assert (
        json.loads(
            _omni(database_url, "audiences", "members", "cart_abandoners", "--offset", "1", "--json").stdout
        )
        == []
    )

    listed = {
        row["name"]: row for row in json.loads(_omni(database_url, "audiences", "list", "--json").stdout)
    }
    assert listed["cart_abandoners"]["size"] == 1 and listed["cart_abandoners"]["built_at"].startswith(
        "2026-06-01"
    )

    result = _omni(database_url, "audiences", "show", "cart_abandoners", "--now", NOW.isoformat(), "--json")
    shown = json.loads(result.stdout)
    dialect = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    assert (
        shown["dialect"] == dialect and "FROM carts" in shown["sql"] and "idle_for: 1h" in shown["definition"]
    )
    result = _omni(database_url, "audiences", "show", "lapsed_buyers")
    assert result.exit_code == 0 and "SELECT" in result.stdout

    for args in (
        ("show", "nobody"),
        ("members", "nobody"),
        ("build", "nobody"),
        ("build", "--now", "yesterday"),
    ):
        result = _omni(database_url, "audiences", *args)
        assert result.exit_code == 2, (args, result.output)
    # a build earlier than the last one replaces the history after it (the latest build in time wins)
    result = _omni(database_url, "audiences", "build", "--now", (NOW - days(1)).isoformat(), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cart_abandoners"] == {"size": 0, "entered": 0, "exited": 0}
    assert json.loads(_omni(database_url, "audiences", "members", "cart_abandoners", "--json").stdout) == []


def test_cli_reports_invalid_definitions(database_url, tmp_path, monkeypatch):
    from omni.core.settings import get_settings

    (tmp_path / "vip.yaml").write_text("name: vip\nwhere: {trait: tier, eq: gold, within: 7d}\n")
    monkeypatch.setenv("OMNI_AUDIENCES_DIR", str(tmp_path))
    get_settings.cache_clear()
    result = _omni(database_url, "audiences", "list")
    assert result.exit_code == 2
    assert (
        "vip.yaml" in result.output and "where.within" in result.output and "unknown option" in result.output
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_build_audiences_flow(prefect_harness, engine, database_url):
    from prefect.artifacts import Artifact

    from flows.build_audiences import build_audiences

    _history(engine)
    state = build_audiences(database_url=database_url, now=NOW, return_state=True)
    assert state.is_completed()
    assert state.result() == {
        "cart_abandoners": {"size": 1, "entered": 1, "exited": 0},
        "lapsed_buyers": {"size": 1, "entered": 1, "exited": 0},
        "omnichannel_engaged": {"size": 0, "entered": 0, "exited": 0},
        "pickup_ready": {"size": 0, "entered": 0, "exited": 0},
    }
    artifact = Artifact.get("audience-builds")
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [row["Audience"] for row in rows] == list(state.result())
    assert set(rows[0]) == {"Audience", "Members", "Entered", "Exited", "Build time (ms)"}
    assert "built at 2026-06-01 12:00 UTC:" in artifact.description  # no microseconds, no +00:00


def test_cli_show_prints_definition_and_sql_unbroken(database_url):
    # The console is 80 columns here; the definition has longer lines and the SQL too. Neither may be
    # wrapped or cut, so what a marketer copies from the terminal is the file and the query as they are.
    result = _omni(database_url, "audiences", "show", "cart_abandoners", "--now", NOW.isoformat())
    assert result.exit_code == 0, result.output
    definition = (builtin_directory() / "cart_abandoners.yaml").read_text()
    assert max(len(line) for line in definition.splitlines()) > 80
    assert definition.strip() in result.stdout
    shown = json.loads(
        _omni(database_url, "audiences", "show", "cart_abandoners", "--now", NOW.isoformat(), "--json").stdout
    )
    assert shown["sql"] in result.stdout
