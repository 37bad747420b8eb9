"""``omni report``: the terminal tables and the same numbers as JSON, on a small hand-built store."""

from __future__ import annotations

import json

import typer
from report_kit import day, enroll, identify, ingest, order
from typer.testing import CliRunner

from omni.cli import report as report_cli


def _app() -> typer.Typer:
    app = typer.Typer()
    report_cli.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "report" a subcommand
        pass

    return app


def _store(engine) -> None:
    ingest(engine, identify("u1", day(1, 0, month=4)), identify("u2", day(1, 0, month=4)))
    ingest(engine, order("u1", "o1", 80.0, day(11)), order("u2", "o2", 20.0, day(12), channel="store"))
    enroll(engine, "u1", "cart", day(10, 0))
    enroll(engine, "u2", "cart", day(10, 0), status="holdout")


def test_report_json_and_tables(engine, database_url):
    _store(engine)
    runner = CliRunner()
    args = ["report", "--database-url", database_url, "--now", "2026-06-01T00:00:00Z"]
    result = runner.invoke(_app(), [*args, "--since", "2026-05-01", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["since"] == "2026-05-01T00:00:00+00:00" and data["window_days"] == 7.0
    [cart] = data["journeys"]
    assert cart["sequence"] == "cart"
    assert (cart["messaged"]["customers"], cart["messaged"]["converted"], cart["messaged"]["revenue"]) == (
        1,
        1,
        80.0,
    )
    assert (cart["held_out"]["customers"], cart["held_out"]["converted"], cart["held_out"]["revenue"]) == (
        1,
        1,
        20.0,
    )
    assert cart["lift"]["low"] < 0 < cart["lift"]["high"] and cart["lift"]["verdict"] == "too few to tell"
    result = runner.invoke(_app(), [*args, "--window", "0.5"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Journey lift" in result.stdout and "cart" in result.stdout
    assert "too few to tell" in result.stdout and "Average order value" in result.stdout
    bad = runner.invoke(_app(), [*args, "--since", "2026-07-01"])
    assert bad.exit_code == 2 and "empty" in bad.output
