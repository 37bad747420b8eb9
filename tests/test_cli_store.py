"""The `omni` CLI for the profile store: init, ingest, profile show, consent set, rejected, stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from omni.cli import app

runner = CliRunner()


def omni(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def events_file(tmp_path):
    lines = [
        {
            "type": "identify",
            "userId": "u1",
            "anonymousId": "a1",
            "messageId": "m1",
            "timestamp": "2026-06-01T09:00:00Z",
            "traits": {"email": "ana@example.org", "first_name": "Ana", "sms_opt_in": True},
        },
        {
            "type": "track",
            "anonymousId": "a1",
            "event": "Product Added",
            "messageId": "m2",
            "timestamp": "2026-06-01T09:05:00Z",
            "properties": {"product_id": "tee", "name": "Tee", "price": 20, "quantity": 2},
        },
        {
            "type": "track",
            "userId": "u1",
            "event": "Order Completed",
            "messageId": "m3",
            "timestamp": "2026-06-01T17:00:00Z",
            "context": {"channel": "store"},
            "properties": {"order_id": "pos-1", "total": 40},
        },
        {
            "type": "track",
            "userId": "u1",
            "event": "Chat Started",
            "messageId": "m4",
            "timestamp": "2026-06-02T10:00:00Z",
            "context": {"channel": "chat"},
        },
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    return path


def test_init_is_idempotent_and_reports_revision(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    first = omni("init", "--database-url", url, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["changed"] is True
    second = omni("init", "--database-url", url, "--json")
    assert json.loads(second.stdout) == {
        **json.loads(first.stdout),
        "previous_revision": json.loads(first.stdout)["revision"],
        "changed": False,
    }


def test_commands_on_a_store_without_schema_say_to_run_init(tmp_path, events_file):
    result = omni("ingest", events_file, "--database-url", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.exit_code == 1
    assert "omni init" in result.stderr


def test_ingest_json_counts_and_rejection_report(database_url, events_file):
    result = omni("ingest", events_file, "--database-url", database_url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"accepted": 4, "duplicates": 0, "rejected": 1}
    again = omni("ingest", events_file, "--database-url", database_url, "--no-progress")
    assert again.exit_code == 0
    assert "duplicates 4" in again.stdout
    assert f"{events_file}:5: invalid JSON" in again.stderr
    assert "omni rejected list" in again.stderr


def test_ingest_reads_stdin(database_url, events_file):
    result = omni("ingest", "-", "--database-url", database_url, "--json", input=events_file.read_text())
    assert json.loads(result.stdout)["accepted"] == 4


def test_ingest_missing_file_is_bad_input_and_stores_nothing(database_url, events_file, tmp_path):
    result = omni("ingest", events_file, tmp_path / "missing.jsonl", "--database-url", database_url)
    assert result.exit_code == 2
    assert "missing.jsonl: no such file" in result.stderr
    shown = omni("profile", "show", "u1", "--database-url", database_url)
    assert shown.exit_code == 2  # nothing was stored from the first file either


def test_ingest_bad_now_is_bad_input(database_url, events_file):
    result = omni("ingest", events_file, "--database-url", database_url, "--now", "tomorrow")
    assert result.exit_code == 2
    assert "--now 'tomorrow'" in result.stderr


def test_ingest_shows_progress_bar_when_asked(database_url, events_file):
    result = omni("ingest", events_file, "--database-url", database_url, "--progress")
    assert result.exit_code == 0


def test_profile_show_is_the_unified_timeline_across_channels(database_url, events_file):
    omni("ingest", events_file, "--database-url", database_url)
    result = omni("profile", "show", "ANA@example.org", "--database-url", database_url, "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["customer"]["first_name"] == "Ana"
    assert view["channels"] == ["chat", "store", "web"]
    assert [e["name"] for e in view["events"]] == ["Chat Started", "Order Completed", "Product Added", None]
    assert view["orders"][0]["order_id"] == "pos-1"
    assert view["carts"][0]["status"] == "converted"
    assert view["consents"]["sms"]["allowed"] is True
    assert view["consents"]["push"]["allowed"] is False
    human = omni("profile", "show", "a1", "--database-url", database_url)
    assert human.exit_code == 0
    assert "Ana" in human.stdout and "Order Completed" in human.stdout


def test_profile_show_gives_the_timezone_of_the_one_rule(database_url, tmp_path):
    """Own, else the latest context, else the home store's (profiles.timezones): here the home store's."""
    stores = tmp_path / "stores.json"
    stores.write_text(json.dumps([{"id": "s-1", "name": "Chiado", "timezone": "Europe/Lisbon"}]))
    assert omni("stores", "load", stores, "--database-url", database_url).exit_code == 0
    identify = {"type": "identify", "userId": "u9", "messageId": "m9", "traits": {"home_store_id": "s-1"}}
    omni("ingest", "-", "--database-url", database_url, input=json.dumps(identify) + "\n")
    result = omni("profile", "show", "u9", "--database-url", database_url, "--json")
    assert json.loads(result.stdout)["timezone"] == "Europe/Lisbon"
    human = omni("profile", "show", "u9", "--database-url", database_url)
    assert "timezone      Europe/Lisbon" in human.stdout


def test_profile_show_unknown_key_is_bad_input(database_url):
    result = omni("profile", "show", "nobody@example.org", "--database-url", database_url)
    assert result.exit_code == 2
    assert "no customer matches 'nobody@example.org'" in result.stderr


def test_consent_set_by_hand(database_url, events_file):
    omni("ingest", events_file, "--database-url", database_url)
    now = datetime(2026, 6, 3, 9, 0, tzinfo=UTC).isoformat()
    result = omni(
        "consent",
        "set",
        "ana@example.org",
        "sms",
        "opted_out",
        "--database-url",
        database_url,
        "--now",
        now,
        "--json",
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert (body["status"], body["allowed"], body["source"]) == ("opted_out", False, "cli:cli")
    assert body["updated_at"].startswith("2026-06-03T09:00:00")
    bad = omni("consent", "set", "ana@example.org", "fax", "opted_out", "--database-url", database_url)
    assert bad.exit_code == 2 and "unknown channel 'fax'" in bad.stderr
    bad = omni("consent", "set", "ana@example.org", "sms", "maybe", "--database-url", database_url)
    assert bad.exit_code == 2 and "unknown status 'maybe'" in bad.stderr


def test_rejected_list_shows_source_reason_and_raw(database_url, events_file):
    omni("ingest", events_file, "--database-url", database_url)
    result = omni("rejected", "list", "--database-url", database_url, "--json")
    body = json.loads(result.stdout)
    assert body["total"] == 1
    [item] = body["items"]
    assert item["source"] == f"{events_file}:5"
    assert item["raw"] == "not json"
    assert item["reason"].startswith("invalid JSON")


def test_stores_load_and_list(database_url, tmp_path):
    path = tmp_path / "stores.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": "s-1",
                    "name": "Lisbon Chiado",
                    "city": "Lisbon",
                    "timezone": "Europe/Lisbon",
                    "hours": {"mon": "09:00-20:00"},
                },
                {"id": 2, "name": "Porto"},
            ]
        )
    )
    result = omni("stores", "load", path, "--database-url", database_url, "--json")
    assert json.loads(result.stdout) == {"loaded": 2}
    listed = json.loads(omni("stores", "list", "--database-url", database_url, "--json").stdout)
    assert [s["id"] for s in listed] == ["2", "s-1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "s-3", "name": "X", "timezone": "Mars/Base"}]))
    result = omni("stores", "load", bad, "--database-url", database_url)
    assert result.exit_code == 2
    assert "[item 0]" in result.stderr and "Mars/Base" in result.stderr


@pytest.mark.parametrize(
    ("name", "properties", "summary"),
    [
        ("Product Added", {"name": "Tote", "quantity": 2, "price": 29}, "Tote x2 @ 29.00"),
        ("Product Added", {"sku": "T-1", "price": "12.5", "currency": "EUR"}, "T-1 x1 @ 12.50 EUR"),
        ("Product Removed", {"name": "Tote", "price": "n/a"}, "Tote x1 @ n/a"),
        ("Order Completed", {"order_id": "W1", "total": 129, "currency": "USD"}, "order W1 total 129.00 USD"),
        (
            "Order Completed",
            {"order_id": "S1", "revenue": 5.5, "store_id": "soho"},
            "order S1 total 5.50 at store soho",
        ),
    ],
)
def test_timeline_summaries_show_money_with_two_decimals_and_the_currency(name, properties, summary):
    from profiles.timeline import summarize_event

    assert summarize_event(name, "track", properties) == summary
