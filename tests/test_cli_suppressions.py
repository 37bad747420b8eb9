"""``omni suppressions list | lift`` and ``omni feedback unmatched``: what the deliverability rules hold,
for a person to read and undo. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "server"))  # feedback_kit

from feedback_kit import NOW, PHONE, seed, sg_event  # noqa: E402

from omni.cli import app  # noqa: E402
from profiles.consent import reachability_of  # noqa: E402
from profiles.db import session_scope  # noqa: E402
from profiles.feedback import apply_sendgrid_events, apply_twilio_inbound  # noqa: E402
from profiles.suppression import suppress_address  # noqa: E402

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    """Tables as a wide terminal shows them (no folded cells)."""
    from omni.cli.common import console

    monkeypatch.setattr(console, "width", 200)


def omni(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def store(engine) -> tuple[str, int]:
    ana = seed(engine)
    with session_scope(engine) as session:
        suppress_address(
            session,
            "email",
            "ana@example.org",
            source="sendgrid:bounce",
            now=NOW - timedelta(hours=2),
            detail="550 5.1.1 user unknown",
        )
        suppress_address(session, "phone", PHONE, source="cli", now=NOW - timedelta(hours=1))
    return engine.url.render_as_string(hide_password=False), ana


def test_suppressions_list_newest_first(engine):
    url, _ana = store(engine)
    listed = omni("suppressions", "list", "--database-url", url, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["address"], r["kind"], r["reason"], r["source"]) for r in rows] == [
        (PHONE, "phone", "hard_bounce", "cli"),
        ("ana@example.org", "email", "hard_bounce", "sendgrid:bounce"),
    ]
    assert rows[1]["created_at"] == (NOW - timedelta(hours=2)).isoformat()
    assert rows[1]["detail"] == "550 5.1.1 user unknown"
    only = json.loads(omni("suppressions", "list", "--kind", "email", "--database-url", url, "--json").stdout)
    assert [r["address"] for r in only] == ["ana@example.org"]
    table = omni("suppressions", "list", "--database-url", url)
    assert table.exit_code == 0
    assert "ana@example.org" in table.stdout and "sendgrid:bounce" in table.stdout
    assert "2026-06-02 13:00:00" in table.stdout
    assert "2 shown" in table.stdout


def test_lift_makes_the_address_reachable_again(engine):
    url, ana = store(engine)
    with session_scope(engine) as session:
        assert reachability_of(session, ana)["email"] == "email address suppressed (hard bounce)"
    lifted = omni("suppressions", "lift", " Ana@Example.org ", "--database-url", url, "--json")
    assert lifted.exit_code == 0, lifted.output
    answer = json.loads(lifted.stdout)
    assert answer["customers"] == [ana]
    assert (answer["lifted"]["address"], answer["lifted"]["source"]) == ("ana@example.org", "sendgrid:bounce")
    with session_scope(engine) as session:
        assert reachability_of(session, ana)["email"] is None
    again = omni("suppressions", "lift", "ana@example.org", "--database-url", url)
    assert again.exit_code == 2 and "email ana@example.org is not suppressed" in again.stderr

    phone = omni("suppressions", "lift", "(415) 555-0100", "--database-url", url)  # national form
    assert phone.exit_code == 0, phone.output
    assert phone.stdout.startswith(f"Lifted the suppression of phone {PHONE} (hard_bounce from cli")
    assert f"Customers holding it: {ana}." in " ".join(phone.stdout.split())
    rows = json.loads(omni("suppressions", "list", "--database-url", url, "--json").stdout)
    assert rows == []


def test_feedback_unmatched_lists_what_could_not_be_matched(engine):
    url, _ana = store(engine)
    with session_scope(engine) as session:
        apply_sendgrid_events(
            session,
            [
                sg_event("open", "known"),  # matched: not listed
                sg_event("bounce", "gone", delivery="campaign:gone:7", type="bounce"),
                "not an event",
            ],
            now=NOW - timedelta(minutes=30),
        )
        apply_twilio_inbound(
            session, {"MessageSid": "SMstranger", "From": "+447700900123", "Body": "STOP"}, now=NOW
        )
    listed = omni("feedback", "unmatched", "--database-url", url, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["provider"], r["kind"], r["outcome"], r["delivery_id"], r["address"]) for r in rows] == [
        ("twilio", "inbound:stop", "unknown_number", None, "+447700900123"),
        ("sendgrid", "?", "invalid", None, None),
        ("sendgrid", "bounce", "unknown_delivery", "campaign:gone:7", "ana@example.org"),
    ]
    assert rows[0]["payload"]["Body"] == "STOP"
    twilio = json.loads(
        omni("feedback", "unmatched", "--provider", "twilio", "--database-url", url, "--json").stdout
    )
    assert [r["event_key"] for r in twilio] == ["twilio:SMstranger"]
    since = omni("feedback", "unmatched", "--since", "2026-06-02T14:45:00Z", "--database-url", url, "--json")
    assert [r["outcome"] for r in json.loads(since.stdout)] == ["unknown_number"]
    table = omni("feedback", "unmatched", "--database-url", url)
    assert table.exit_code == 0 and "campaign:gone:7" in table.stdout and "unknown_number" in table.stdout
    assert "3 shown" in table.stdout


def test_bad_input_exits_2_with_one_line(engine):
    url, _ana = store(engine)
    cases = [
        (("suppressions", "list", "--kind", "fax"), "unknown address kind 'fax'"),
        (("suppressions", "lift", "nobody", "--kind", "email"), "is not an email address"),
        (("suppressions", "lift", "12"), "is not a phone number"),
        (("feedback", "unmatched", "--provider", "mailgun"), "unknown provider 'mailgun'"),
        (("feedback", "unmatched", "--since", "yesterday"), "--since 'yesterday' is not an ISO-8601 time"),
    ]
    for args, message in cases:
        answer = omni(*args, "--database-url", url)
        assert answer.exit_code == 2, (args, answer.output)
        assert message in answer.stderr and len(answer.stderr.strip().splitlines()) == 1, answer.stderr
