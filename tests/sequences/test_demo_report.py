"""`omni demo` ends with each journey's lift in one sentence with its interval and writes the HTML report
beside its store; its simulated shoppers buy more when messaged, and its service desk answers calls and
chats, so every metric has numbers. SQLite only: the demo's default store."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select
from typer.testing import CliRunner

from omni.cli import app
from omni.cli.demo_data import BUY_IF_HELD_OUT, BUY_IF_MESSAGED, SUPPORT_CONTACT, SUPPORT_RESOLVED
from profiles.db import create_store_engine, session_scope
from profiles.models import Event

runner = CliRunner()


def test_the_demo_closes_with_the_lift_and_the_html_report(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'omni.db'}"
    result = runner.invoke(
        app, ["demo", "--database-url", url, "--customers", "120", "--no-prefect", "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    closing = document["report"]
    journeys = {j["sequence"]: j for j in closing["journeys"]}
    cart = journeys["abandoned_cart"]
    assert cart["messaged"]["customers"] > 0 and cart["held_out"]["customers"] > 0
    [sentence] = [s for s in closing["sentences"] if s.startswith("abandoned_cart:")]
    assert "95% interval" in sentence and f"of {cart['messaged']['customers']:,} messaged" in sentence
    # The HTML report beside the store, the same numbers.
    html = Path(closing["html"])
    assert html.parent == tmp_path / "omni-reports" and html.name == "report-20260605-1500.html"
    text = html.read_text(encoding="utf-8")
    assert "<svg" in text and "http://" not in text.split("<svg", 1)[0]
    assert f"{cart['messaged']['customers']:,} messaged customers" in text
    assert all(m > h for m, h in zip(BUY_IF_MESSAGED, BUY_IF_HELD_OUT, strict=True))  # the stated story

    engine = create_store_engine(url)
    events = Event.__table__
    with session_scope(engine) as session:
        contacts = dict(
            session.execute(
                select(events.c.channel, func.count())
                .where(events.c.name == SUPPORT_CONTACT)
                .group_by(events.c.channel)
            ).all()
        )
        resolved = session.execute(
            select(func.count()).select_from(events).where(events.c.name == SUPPORT_RESOLVED)
        ).scalar_one()
        viewed = session.execute(
            select(func.count()).select_from(events).where(events.c.name == "Profile Viewed")
        ).scalar_one()
    engine.dispose()
    assert set(contacts) == {"call_center", "chat"} and resolved > 0 and viewed > 0


def test_the_demos_shoppers_buy_more_when_messaged(tmp_path: Path):
    """Over a larger crowd the simulated difference shows: messaged abandoners buy more often."""
    url = f"sqlite:///{tmp_path / 'omni.db'}"
    result = runner.invoke(
        app, ["demo", "--database-url", url, "--customers", "1500", "--no-prefect", "--json"]
    )
    assert result.exit_code == 0, result.output
    cart = {j["sequence"]: j for j in json.loads(result.stdout)["report"]["journeys"]}["abandoned_cart"]
    assert cart["held_out"]["customers"] >= 40
    assert cart["messaged"]["rate"] > cart["held_out"]["rate"]
    assert cart["lift"]["absolute"] > 0 and cart["lift"]["low"] is not None
