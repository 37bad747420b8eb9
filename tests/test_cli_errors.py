"""No `omni` command ends in a raw traceback: known errors are one line on stderr with exit code 2 (bad
input) or 1 (runtime failure); unexpected ones say how to see the traceback (--debug, OMNI_DEBUG=1).
And a preview with --now in the future does not block builds at the real time."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import typer
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from omni.cli import app
from omni.cli.common import GuardedGroup, handle_errors

runner = CliRunner()


def _one_line_error(result) -> str:
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unexpected_error_is_one_line_with_how_to_see_the_traceback(database_url, monkeypatch):
    import audiences

    def boom(*_args, **_kwargs):
        raise RuntimeError("the disk\nis on fire")

    monkeypatch.setattr(audiences, "build_audience", boom)
    result = runner.invoke(app, ["audiences", "build", "--database-url", database_url])
    assert result.exit_code == 1
    line = _one_line_error(result)
    assert "unexpected RuntimeError: the disk is on fire" in line and "--debug" in line

    debug = runner.invoke(app, ["--debug", "audiences", "build", "--database-url", database_url])
    assert isinstance(debug.exception, RuntimeError)  # the traceback is there for whoever asked
    monkeypatch.setenv("OMNI_DEBUG", "1")
    assert isinstance(
        runner.invoke(app, ["audiences", "build", "--database-url", database_url]).exception, RuntimeError
    )
    monkeypatch.delenv("OMNI_DEBUG")
    assert runner.invoke(app, ["audiences", "build", "--database-url", database_url]).exit_code == 1


def _known_errors():
    from audiences.definitions import DefinitionError
    from connectors import ConnectorConfigError
    from profiles.db import SchemaNotReady
    from sequences.tick import UnknownSequence

    return [
        (ConnectorConfigError("OMNI_SENDGRID_API_KEY is not set"), 1, "OMNI_SENDGRID_API_KEY"),
        (UnknownSequence("nope", ["welcome"]), 2, "unknown sequence 'nope'"),
        (DefinitionError("a.yaml", "steps[0]", "bad"), 2, "a.yaml: steps[0]: bad"),
        (ValueError("quiet_hours_start: not a time"), 2, "not a time"),
        (FileNotFoundError(2, "No such file or directory", "x.jsonl"), 2, "x.jsonl"),
        (SchemaNotReady("run `omni init`"), 1, "omni init"),
        (OperationalError("SELECT 1", {}, Exception("server closed")), 1, "server closed"),
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_known_errors_of_a_command_are_one_line_and_the_contracts_exit_code(database_url, monkeypatch):
    import sequences.tick

    for error, code, text in _known_errors():

        def fail(*_args, _error=error, **_kwargs):
            raise _error

        monkeypatch.setattr(sequences.tick, "run_tick", fail)
        result = runner.invoke(app, ["sequences", "run", "--database-url", database_url])
        assert result.exit_code == code, (error, result.output, result.stderr)
        assert text in _one_line_error(result)


def test_the_top_level_guard_catches_what_a_command_does_not():
    """A command without @handle_errors (a new one, say) still ends in one line, not a traceback."""
    local = typer.Typer(cls=GuardedGroup)
    errors = {"value": ValueError("bad --at"), "bug": KeyError("x"), **{"decorated": ZeroDivisionError()}}

    @local.command()
    def run(what: str) -> None:
        raise errors[what]

    @local.command()
    @handle_errors
    def other() -> None:
        raise ZeroDivisionError

    result = runner.invoke(local, ["run", "value"])
    assert result.exit_code == 2 and "bad --at" in _one_line_error(result)
    result = runner.invoke(local, ["run", "bug"])
    assert result.exit_code == 1 and "unexpected KeyError" in _one_line_error(result)
    result = runner.invoke(local, ["other"])
    assert result.exit_code == 1 and "unexpected ZeroDivisionError" in _one_line_error(result)


def test_a_bad_now_is_bad_input():
    result = runner.invoke(app, ["audiences", "build", "--now", "tomorrow"])
    assert result.exit_code == 2 and "ISO-8601" in _one_line_error(result)


def test_a_future_preview_then_a_build_at_the_real_time(engine, database_url):
    """`omni audiences build --now <now+6h>`, then at the real time: it succeeds, and the members are
    those at the real time (on SQLite and PostgreSQL)."""
    from profiles.ingest import ingest_payloads

    now = datetime.now(UTC).replace(microsecond=0)
    added = (now - timedelta(minutes=30)).isoformat()  # idle for an hour only later: not yet abandoned
    payloads = [
        {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com"}, "timestamp": added},
        {"type": "track", "userId": "ann", "event": "Product Added", "messageId": "m1", "timestamp": added,
         "properties": {"cart_id": "c1", "product_id": "p1", "price": 20, "quantity": 1}},
    ]  # fmt: skip
    assert ingest_payloads(engine, payloads, now=now).rejected == 0

    def build(*args: str) -> dict:
        result = runner.invoke(
            app, ["audiences", "build", "cart_abandoners", "--database-url", database_url, "--json", *args]
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["cart_abandoners"]

    def members() -> list:
        result = runner.invoke(
            app, ["audiences", "members", "cart_abandoners", "--database-url", database_url, "--json"]
        )
        return json.loads(result.stdout)

    assert build("--now", (now + timedelta(hours=6)).isoformat()) == {"size": 1, "entered": 1, "exited": 0}
    # The real time, after the preview: not refused, and ann is not a member yet (as at the real time).
    assert build() == {"size": 0, "entered": 0, "exited": 0}
    assert members() == []
    later = now + timedelta(hours=2)
    assert build("--now", later.isoformat()) == {"size": 1, "entered": 1, "exited": 0}
    [member] = members()
    assert member["email"] == "ann@example.com" and datetime.fromisoformat(member["entered_at"]) == later

    human = runner.invoke(
        app,
        ["audiences", "build", "cart_abandoners", "--database-url", database_url, "--now", later.isoformat()],
    )
    assert human.exit_code == 0 and "cart_abandoners: 1 members" in human.stdout  # results on stdout
