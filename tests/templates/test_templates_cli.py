"""`omni templates` and `omni outbox` against a real store."""

from __future__ import annotations

import json

from template_kit import seed
from typer.testing import CliRunner

from omni.cli import app
from profiles.db import create_store_engine

runner = CliRunner()
NOW = "2026-06-02T10:00:00Z"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_list_render_test_send_and_outbox(database_url):
    engine = create_store_engine(database_url)
    seed(engine)
    engine.dispose()

    result = invoke("templates", "list", "--json")
    assert result.exit_code == 0
    assert [t["name"] for t in json.loads(result.stdout)][0] == "email/abandoned_cart"

    render_cart_email = (
        "templates",
        "render",
        "email/abandoned_cart",
        "--customer",
        "u-ana@example.org",
        "--database-url",
        database_url,
        "--now",
        NOW,
    )
    result = invoke(*render_cart_email, "--json")
    assert result.exit_code == 0, result.output
    rendered = json.loads(result.stdout)
    assert rendered["subject"] == "Ana, you left 3 items in your cart"
    assert rendered["recipients"] == ["u-ana@example.org"] and "Total: $44.00" in rendered["text"]
    human = invoke(*render_cart_email)
    # The preview is 80 columns wide here; the links are longer and must come out whole.
    assert human.exit_code == 0, human.output
    assert len(rendered["unsubscribe_url"]) > 80 and rendered["unsubscribe_url"] in human.stdout
    assert rendered["text"].strip() in human.stdout and rendered["html"].strip() in human.stdout

    result = invoke(
        "templates",
        "render",
        "sms/pickup_reminder",
        "--customer",
        "+1 415 555 0100",
        "--database-url",
        database_url,
        "--now",
        NOW,
    )
    assert result.exit_code == 0 and "ready for pickup at Omni SoHo" in result.stdout

    result = invoke(
        "templates",
        "test-send",
        "sms/pickup_reminder",
        "--customer",
        "u-ana",
        "--to",
        "+14155550123",
        "--database-url",
        database_url,
        "--now",
        NOW,
        "--json",
    )
    assert result.exit_code == 0, result.output
    sent = json.loads(result.stdout)
    assert sent["status"] == "sent" and sent["connector"] == "outbox" and sent["to"] == "+14155550123"

    result = invoke("outbox", "list", "--channel", "sms", "--json", "--database-url", database_url)
    [row] = json.loads(result.stdout)
    assert row["to"] == "+14155550123" and row["template"] == "sms/pickup_reminder"
    assert row["body"].startswith("Omni Shop: Ana, your order")


def test_errors_have_the_contract_exit_codes(database_url):
    engine = create_store_engine(database_url)
    seed(engine)
    engine.dispose()
    assert (
        invoke(
            "templates", "render", "email/nope", "--customer", "u-ana", "--database-url", database_url
        ).exit_code
        == 2
    )
    assert (
        invoke(
            "templates",
            "render",
            "email/abandoned_cart",
            "--customer",
            "nobody",
            "--database-url",
            database_url,
        ).exit_code
        == 2
    )
    assert invoke("outbox", "list", "--channel", "fax", "--database-url", database_url).exit_code == 2
    result = invoke(
        "templates",
        "test-send",
        "email/abandoned_cart",
        "--customer",
        "u-ana",
        "--to",
        "x@example.org",
        "--database-url",
        database_url,
        "--now",
        NOW,
    )
    assert result.exit_code == 0


def test_init_generates_the_unsubscribe_secret_once(tmp_path):
    from sqlalchemy import select

    from profiles.db import session_scope
    from profiles.models import StoreMetadata

    url = f"sqlite:///{tmp_path / 'omni.db'}"
    assert invoke("init", "--database-url", url).exit_code == 0
    engine = create_store_engine(url)
    with session_scope(engine) as session:
        first = session.execute(
            select(StoreMetadata.value).where(StoreMetadata.key == "unsubscribe_secret")
        ).scalar()
    assert first and len(first) >= 32
    assert invoke("init", "--database-url", url).exit_code == 0
    with session_scope(engine) as session:
        again = session.execute(
            select(StoreMetadata.value).where(StoreMetadata.key == "unsubscribe_secret")
        ).scalar()
    engine.dispose()
    assert again == first
