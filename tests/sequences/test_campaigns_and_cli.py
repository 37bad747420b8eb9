"""Campaigns (same guarantees as sequences), definition errors, and the sequences / campaigns CLI."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from journey_kit import T0, customer, deliveries, no_sleep, outbox, seed_stores
from typer.testing import CliRunner

from audiences import DefinitionError
from omni.cli import app
from omni.core.settings import Settings
from sequences.campaigns import UnknownCampaign, send_campaign
from sequences.definitions import load_campaigns, parse_campaign, parse_sequence

runner = CliRunner()


def campaign(**overrides):
    raw = {
        "name": "cart_push",
        "audience": "cart_abandoners",
        "channel": "email",
        "template": "email/abandoned_cart",
        **overrides,
    }
    return {raw["name"]: parse_campaign(raw, file="cart_push.yaml")}


@pytest.fixture
def store(engine):
    seed_stores(engine)
    return engine


def test_campaign_sends_once_with_consent_and_quiet_hours(store):
    for n in (1, 2, 3):
        customer(store, n, email=n != 2)  # customer 2 has no email address: not in the audience
    customer(store, 4, store="lis", timezone="Asia/Tokyo")  # 00:00 in Tokyo at T0: quiet
    definitions = campaign()
    created, report = send_campaign(
        store, "cart_push", now=T0, settings=Settings(), campaigns=definitions, sleep=no_sleep
    )
    counts = report.campaigns["cart_push"]
    assert created == 3
    assert (counts.sent, counts.postponed) == (2, 1)
    assert sorted(m.customer_id for m in outbox(store, "email")) == [1, 3]
    # Sending again creates and sends nothing new.
    created, report = send_campaign(
        store,
        "cart_push",
        now=T0 + timedelta(minutes=1),
        settings=Settings(),
        campaigns=definitions,
        sleep=no_sleep,
    )
    assert created == 0 and report.campaigns["cart_push"].sent == 0
    # The postponed one goes out after quiet hours (09:00 Tokyo = 00:00 UTC).
    send_campaign(
        store,
        "cart_push",
        now=T0 + timedelta(hours=9, minutes=5),
        settings=Settings(),
        campaigns=definitions,
        sleep=no_sleep,
    )
    assert sorted(m.customer_id for m in outbox(store, "email")) == [1, 3, 4]
    assert all(d.campaign == "cart_push" for d in deliveries(store))


def test_campaign_respects_the_cross_channel_frequency_cap_with_sequences(store):
    from sequences.tick import run_tick

    customer(store, 1)
    run_tick(
        store, settings=Settings(), now=T0, names=["abandoned_cart"], sleep=no_sleep
    )  # email 1 (customer 1 is not held out)
    send_campaign(
        store,
        "cart_push",
        now=T0 + timedelta(hours=1),
        settings=Settings(),
        campaigns=campaign(),
        sleep=no_sleep,
    )
    _, report = send_campaign(
        store,
        "cart_push_2",
        now=T0 + timedelta(hours=1),
        sleep=no_sleep,
        settings=Settings(),
        campaigns=campaign(name="cart_push_2"),
    )
    assert report.campaigns["cart_push_2"].postponed == 1  # third message within 24 h: over the cap of 2
    assert len(outbox(store, "email")) == 2


def test_unknown_campaign_and_bad_definitions_name_file_and_path(store, tmp_path):
    with pytest.raises(UnknownCampaign):
        send_campaign(store, "nope", now=T0, settings=Settings(), campaigns=campaign())
    with pytest.raises(DefinitionError) as excinfo:
        parse_campaign({"name": "x", "audience": "a", "channel": "fax", "template": "t"}, file="x.yaml")
    assert str(excinfo.value).startswith("x.yaml: channel: unknown channel 'fax'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\naudience: [unclosed\n")
    with pytest.raises(DefinitionError) as excinfo:
        load_campaigns(tmp_path)
    assert "bad.yaml" in str(excinfo.value) and "invalid YAML" in str(excinfo.value)


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        ({"trigger": {"audience": "nope"}}, "trigger.audience", "unknown audience 'nope'"),
        ({"trigger": {}}, "trigger", "either {audience: NAME} or {event: NAME}"),
        ({"holdout": "150%"}, "holdout", "between 0% and 100%"),
        ({"reenter_after": "soon"}, "reenter_after", "bad duration"),
        ({"steps": []}, "steps", "non-empty list"),
        ({"steps": [{"wait": "1x"}]}, "steps[0].wait", "bad duration"),
        ({"steps": [{"send": {"channel": "email"}}]}, "steps[0].send.template", "names its template"),
        ({"steps": [{"send": {"channel": "ads"}}]}, "steps[0].send.audience", "names the ad audience"),
        (
            {"steps": [{"send": {"channel": "email", "template": "email/t", "fallback": "webhook"}}]},
            "steps[0].send.fallback",
            "unknown channel 'webhook' (expected one of email, sms, push)",
        ),
        (
            {"steps": [{"send": {"channel": "sms", "template": "sms/t", "fallback": "fax"}}]},
            "steps[0].send.fallback",
            "unknown channel 'fax'",
        ),
        (
            {"steps": [{"branch": {"if": {"reachable": "sms"}, "then": "missing"}}]},
            "steps[0].branch.then",
            "unknown step id 'missing'",
        ),
        (
            {"steps": [{"branch": {"if": {"bogus": 1}, "then": "x"}}]},
            "steps[0].branch.if",
            "unknown condition",
        ),
        ({"steps": [{"wait": {"until": "25:00"}}]}, "steps[0].wait.until", "HH:MM"),
        # A template of another channel would be rendered for the wrong connector.
        (
            {"steps": [{"send": {"channel": "sms", "template": "email/abandoned_cart"}}]},
            "steps[0].send.template",
            "a sms message needs a sms/ template",
        ),
        ({"steps": [{"send": {"channel": "push", "template": "t"}}]}, "steps[0].send.template", "push/NAME"),
        (
            {
                "steps": [
                    {
                        "send": {
                            "channel": "sms",
                            "template": "sms/x",
                            "fallback": "push",
                            "fallback_template": "email/x",
                        }
                    }
                ]
            },
            "steps[0].send.fallback_template",
            "a push message needs a push/ template",
        ),
        (
            {"steps": [{"send": {"channel": "sms", "template": "sms/x", "fallback_template": "push/x"}}]},
            "steps[0].send.fallback_template",
            "needs a fallback",
        ),
    ],
)
def test_invalid_sequence_definitions_name_the_path_and_reason(raw, path, reason):
    from audiences import load_audiences

    base = {
        "name": "s",
        "trigger": {"audience": "cart_abandoners"},
        "steps": [{"id": "e", "send": {"channel": "email", "template": "email/abandoned_cart"}}],
    }
    with pytest.raises(DefinitionError) as excinfo:
        parse_sequence({**base, **raw}, file="s.yaml", audiences=load_audiences())
    assert excinfo.value.file == "s.yaml"
    assert excinfo.value.path == path
    assert reason in excinfo.value.reason


def test_branch_and_wait_until_steps(store):
    from audiences import load_audiences
    from sequences.tick import run_tick

    definition = parse_sequence(
        {
            "name": "branchy",
            "trigger": {"audience": "cart_abandoners"},
            "steps": [
                {"id": "check", "branch": {"if": {"reachable": "sms"}, "then": "text", "else": "mail"}},
                {"id": "text", "send": {"channel": "sms", "template": "sms/pickup_reminder"}},
                {"id": "done", "branch": {"if": {"reachable": "email"}, "then": "later"}},
                {"id": "mail", "send": {"channel": "email", "template": "email/abandoned_cart"}},
                {"id": "later", "wait": {"until": "10:00"}},
                {"id": "again", "send": {"channel": "email", "template": "email/abandoned_cart"}},
            ],
        },
        file="branchy.yaml",
        audiences=load_audiences(),
    )
    customer(store, 1, sms=True)
    customer(store, 2, sms=False)
    run_tick(store, settings=Settings(), now=T0, sequences={"branchy": definition}, sleep=no_sleep)
    assert [m.customer_id for m in outbox(store, "sms")] == [1]
    assert [m.customer_id for m in outbox(store, "email")] == [2]
    run_tick(
        store,
        settings=Settings(),
        now=T0 + timedelta(hours=20),
        sequences={"branchy": definition},
        sleep=no_sleep,
    )
    assert len(outbox(store, "email")) == 1  # 06:00 in New York: 10:00 has not come yet
    run_tick(
        store,
        settings=Settings(),
        now=T0 + timedelta(hours=24),
        sequences={"branchy": definition},
        sleep=no_sleep,
    )
    assert sorted(m.customer_id for m in outbox(store, "email")) == [1, 2, 2]


def test_cli_sequences_run_status_and_list(store, database_url):
    customer(store, 1)
    result = runner.invoke(
        app,
        [
            "sequences",
            "run",
            "abandoned_cart",
            "--database-url",
            database_url,
            "--now",
            T0.isoformat(),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["sequences"]["abandoned_cart"]["steps"]["cart_email"]["sent"] == 1
    status = json.loads(
        runner.invoke(
            app, ["sequences", "status", "abandoned_cart", "--database-url", database_url, "--json"]
        ).stdout
    )
    assert status["enrollments"] == {"active": 1}
    assert status["deliveries"]["cart_email"] == {"sent": 1}
    listed = json.loads(
        runner.invoke(app, ["sequences", "list", "--database-url", database_url, "--json"]).stdout
    )
    assert {s["name"] for s in listed} >= {"abandoned_cart", "pickup_ready"}
    unknown = runner.invoke(app, ["sequences", "run", "nope", "--database-url", database_url])
    assert unknown.exit_code == 2 and "unknown sequence 'nope'" in unknown.stderr
    human = runner.invoke(
        app,
        ["sequences", "run", "--database-url", database_url, "--now", (T0 + timedelta(days=1)).isoformat()],
    )
    assert human.exit_code == 0 and "Sequences tick" in human.stdout
    # Readable at 80 columns: one line per sequence and step, only the counts something happened in.
    lines = human.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, human.stdout
    assert any("retarget" in line and "1" in line for line in lines)
    # Names and headers are never folded (eleven columns at 80 broke "abandoned_cart" over two lines).
    assert any("abandoned_cart" in line for line in lines) and any("cart_email" in line for line in lines)
    assert any("Sequence / step" in line for line in lines)
    assert "Ad adds" in human.stdout and "Retrying" not in human.stdout


def test_cli_campaigns_send_and_list(store, database_url, tmp_path, monkeypatch):
    from omni.core.settings import get_settings

    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "cart_push.yaml").write_text(
        "name: cart_push\naudience: cart_abandoners\nchannel: email\ntemplate: email/abandoned_cart\n"
        "send_at: 2026-06-02T15:00:00Z\n"
    )
    monkeypatch.setenv("OMNI_CAMPAIGNS_DIR", str(folder))
    get_settings.cache_clear()
    customer(store, 1)
    listed = json.loads(runner.invoke(app, ["campaigns", "list", "--json"]).stdout)
    assert [c["name"] for c in listed] == ["cart_push"]
    # The human list says which folder it read (campaigns default to ./campaigns, not the package).
    human = runner.invoke(app, ["campaigns", "list"])
    # (Compared without whitespace: the console may fold a long path.)
    assert human.exit_code == 0 and f"Campaignsin{folder}(1)" in "".join(human.stdout.split())
    sent = runner.invoke(
        app,
        ["campaigns", "send", "cart_push", "--database-url", database_url, "--now", T0.isoformat(), "--json"],
    )
    assert sent.exit_code == 0, sent.output
    assert json.loads(sent.stdout)["sent"] == 1
    again = json.loads(
        runner.invoke(
            app,
            [
                "campaigns",
                "send",
                "cart_push",
                "--database-url",
                database_url,
                "--now",
                T0.isoformat(),
                "--json",
            ],
        ).stdout
    )
    assert (again["created"], again["sent"]) == (0, 0)
    missing = runner.invoke(app, ["campaigns", "send", "nope", "--database-url", database_url])
    assert missing.exit_code == 2 and "unknown campaign 'nope'" in missing.stderr
    get_settings.cache_clear()


def test_a_fallback_without_its_template_takes_the_same_name_in_its_channel():
    step = parse_sequence(
        {
            "name": "s",
            "trigger": {"event": "Signed Up"},
            "steps": [
                {"id": "r", "send": {"channel": "sms", "template": "sms/pickup_reminder", "fallback": "push"}}
            ],
        }
    ).steps[0]
    assert (step.fallback, step.fallback_template) == ("push", "push/pickup_reminder")


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        (
            {"channel": "sms", "template": "email/store_event"},
            "template",
            "a sms message needs a sms/ template",
        ),
        ({"fallback": "email"}, "fallback", "the fallback is the same channel"),
        ({"fallback": "fax"}, "fallback", "unknown channel 'fax'"),
    ],
)
def test_invalid_campaigns_name_the_path_and_reason(raw, path, reason):
    base = {"name": "c", "audience": "cart_abandoners", "channel": "email", "template": "email/store_event"}
    with pytest.raises(DefinitionError) as excinfo:
        parse_campaign({**base, **raw}, file="c.yaml")
    assert (excinfo.value.path, reason in excinfo.value.reason) == (path, True)
