"""Sequence and campaign definitions: the built-ins load, and every kind of invalid input fails naming
the file, the path inside it and the reason (the loader is omni.core.definitions, as for audiences)."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from audiences import load_audiences
from audiences.definitions import ReachableCondition
from omni.core.definitions import DefinitionError
from sequences.definitions import (
    BranchStep,
    SendStep,
    WaitStep,
    load_campaigns,
    load_sequences,
    parse_campaign,
    parse_sequence,
)

AUDIENCES = load_audiences()
EMAIL = {"id": "e", "send": {"channel": "email", "template": "email/abandoned_cart"}}
SEQUENCE = {"name": "s", "trigger": {"audience": "cart_abandoners"}, "steps": [EMAIL]}
CAMPAIGN = {"name": "c", "audience": "cart_abandoners", "channel": "email", "template": "email/store_event"}


def _send(**send: Any) -> dict:
    return {"steps": [{"send": {"channel": "sms", "template": "sms/pickup_reminder", **send}}]}


INVALID_SEQUENCES = [
    # An unknown key, at every level: the path names it and the reason lists the keys known there.
    (
        {"colour": "red"},
        "colour",
        "unknown key (expected name, description, trigger, exit, reenter_after, holdout, global_control, "
        "steps)",
    ),
    (
        {"trigger": {"audience": "cart_abandoners", "at": 1}},
        "trigger.at",
        "unknown key (expected audience, event)",
    ),
    ({"exit": {"evnt": "x"}}, "exit.evnt", "unknown key (expected event, properties, left_audience)"),
    ({"steps": [{**EMAIL, "delay": 1}]}, "steps[0].delay", "unknown key (expected id, send, wait, branch)"),
    (
        _send(colour="red"),
        "steps[0].send.colour",
        "unknown key (expected channel, template, audience, fallback, fallback_template)",
    ),
    (
        {"steps": [{"wait": {"until": "10:00", "tz": "UTC"}}]},
        "steps[0].wait.tz",
        "unknown key (expected until)",
    ),
    (
        {"steps": [{"branch": {"if": {"reachable": "sms"}, "then": "e", "otherwise": "e"}}, EMAIL]},
        "steps[0].branch.otherwise",
        "unknown key (expected if, then, else)",
    ),
    # A misspelt key is reported, not the key it was meant to be that is now missing.
    ({"trigger": {"audiense": "cart_abandoners"}}, "trigger.audiense", "unknown key"),
    # The root and the steps are mappings.
    ({"steps": ["wait 1d"]}, "steps[0]", "expected a mapping, got str"),
    ({"trigger": None}, "trigger", "expected a mapping, got nothing"),
    ({"steps": [{"id": "e", "send": EMAIL["send"], "wait": "1d"}]}, "steps[0]", "exactly one of send, wait"),
    ({"steps": [{"id": "e"}]}, "steps[0]", "exactly one of send, wait or branch"),
    ({"steps": []}, "steps", "non-empty list"),
    ({"steps": None}, "steps", "non-empty list"),
    # Names.
    ({"name": "Abandoned Cart"}, "name", "a sequence name is lower_snake_case, got 'Abandoned Cart'"),
    ({"steps": [{**EMAIL, "id": "Email"}]}, "steps[0].id", "a step id is lower_snake_case"),
    # Trigger and exit.
    ({"trigger": {}}, "trigger", "either {audience: NAME} or {event: NAME}"),
    ({"trigger": {"audience": "cart_abandoners", "event": "x"}}, "trigger", "either {audience: NAME}"),
    ({"trigger": {"audience": "nope"}}, "trigger.audience", "unknown audience 'nope'"),
    (
        {"trigger": {"event": "Signed Up"}, "exit": {"left_audience": True}},
        "exit.left_audience",
        "needs an audience trigger",
    ),
    # Durations, times and percentages.
    ({"reenter_after": "soon"}, "reenter_after", "bad duration 'soon'"),
    ({"reenter_after": "0d"}, "reenter_after", "a duration must be positive"),
    ({"steps": [{"wait": "1x"}]}, "steps[0].wait", "bad duration '1x'"),
    ({"steps": [{"wait": 3}]}, "steps[0].wait", "bad duration 3"),
    ({"steps": [{"wait": "0h"}]}, "steps[0].wait", "a duration must be positive"),
    ({"steps": [{"wait": {"until": "25:00"}}]}, "steps[0].wait.until", "expected a local time HH:MM"),
    # YAML reads an unquoted 10:00 as the number 600.
    ({"steps": [{"wait": {"until": 600}}]}, "steps[0].wait.until", "HH:MM, got '600'"),
    ({"holdout": "ten"}, "holdout", "expected a percentage like 10%, got 'ten'"),
    ({"holdout": "150%"}, "holdout", "between 0% and 100%"),
    ({"holdout": -1}, "holdout", "between 0% and 100%"),
    # Channels.
    (
        _send(channel="fax"),
        "steps[0].send.channel",
        "unknown channel 'fax' (expected one of email, sms, push, ads, webhook)",
    ),
    (
        _send(fallback="webhook"),
        "steps[0].send.fallback",
        "unknown channel 'webhook' (expected one of email, sms, push)",
    ),
    (_send(fallback="sms"), "steps[0].send.fallback", "the fallback is the same channel"),
    (_send(fallback_template="push/x"), "steps[0].send.fallback_template", "needs a fallback"),
    (
        {"steps": [{"send": {"channel": "ads"}}]},
        "steps[0].send.audience",
        "an ads step names the ad audience",
    ),
    (
        {"steps": [{"send": {"channel": "webhook"}}]},
        "steps[0].send.template",
        "a webhook step names its template",
    ),
    # A template of another channel's folder would be rendered for the wrong connector.
    (_send(template="email/abandoned_cart"), "steps[0].send.template", "a sms message needs a sms/ template"),
    (_send(template="pickup_reminder"), "steps[0].send.template", "expected sms/NAME"),
    (
        _send(fallback="push", fallback_template="email/x"),
        "steps[0].send.fallback_template",
        "a push message needs a push/ template",
    ),
    # Step ids and branches.
    ({"steps": [EMAIL, EMAIL]}, "steps[1].id", "duplicate step id 'e'"),
    (
        {"steps": [{"id": "wait_2", "wait": "1d"}, {"wait": "1d"}]},
        "steps[1].id",
        "duplicate step id 'wait_2'",
    ),
    (
        {"steps": [{"branch": {"if": {"reachable": "sms"}, "then": "missing"}}, EMAIL]},
        "steps[0].branch.then",
        "unknown step id 'missing'",
    ),
    (
        {"steps": [{"branch": {"if": {"reachable": "sms"}, "then": "e", "else": "gone"}}, EMAIL]},
        "steps[0].branch.else",
        "unknown step id 'gone'",
    ),
    ({"steps": [{"branch": {"then": "e"}}, EMAIL]}, "steps[0].branch.if", "Field required"),
    # The condition of a branch is an audience condition, with its paths under the branch's.
    (
        {"steps": [{"branch": {"if": {"all": [{"reachable": "fax"}]}, "then": "e"}}, EMAIL]},
        "steps[0].branch.if.all[0].reachable",
        "'fax' is not allowed",
    ),
    (
        {"steps": [{"branch": {"if": {"bogus": 1}, "then": "e"}}, EMAIL]},
        "steps[0].branch.if",
        "unknown condition",
    ),
]


@pytest.mark.parametrize(("raw", "path", "reason"), INVALID_SEQUENCES, ids=[c[1] for c in INVALID_SEQUENCES])
def test_invalid_sequences_name_file_path_and_reason(raw, path, reason):
    with pytest.raises(DefinitionError) as caught:
        parse_sequence({**SEQUENCE, **raw}, file="s.yaml", audiences=AUDIENCES)
    error = caught.value
    assert (error.file, error.path) == ("s.yaml", path), str(error)
    assert reason in error.reason, str(error)
    assert str(error).startswith(f"s.yaml: {path}: ")


def test_a_sequence_must_be_a_mapping():
    for raw, got in (([1, 2], "list"), (None, "nothing"), ("abandoned_cart", "str")):
        with pytest.raises(DefinitionError) as caught:
            parse_sequence(raw, file="s.yaml")
        assert (caught.value.path, caught.value.reason) == ("", f"expected a mapping, got {got}")


INVALID_CAMPAIGNS = [
    (
        {"colour": "red"},
        "colour",
        "unknown key (expected name, description, audience, channel, template, send_at, fallback)",
    ),
    ({"name": "Spring Sale"}, "name", "a campaign name is lower_snake_case"),
    ({"audience": ""}, "audience", "at least 1 character"),
    ({"channel": "fax"}, "channel", "unknown channel 'fax' (expected one of email, sms, push)"),
    # Audience syncs and webhooks are steps of a sequence, not campaigns.
    ({"channel": "ads"}, "channel", "unknown channel 'ads'"),
    ({"channel": "sms"}, "template", "a sms message needs a sms/ template"),
    ({"template": "store_event"}, "template", "expected email/NAME"),
    ({"fallback": "email"}, "fallback", "the fallback is the same channel"),
    ({"fallback": "webhook"}, "fallback", "unknown channel 'webhook'"),
    ({"send_at": "tomorrow"}, "send_at", "expected ISO-8601, got 'tomorrow'"),
]


@pytest.mark.parametrize(("raw", "path", "reason"), INVALID_CAMPAIGNS, ids=[c[1] for c in INVALID_CAMPAIGNS])
def test_invalid_campaigns_name_file_path_and_reason(raw, path, reason):
    with pytest.raises(DefinitionError) as caught:
        parse_campaign({**CAMPAIGN, **raw}, file="c.yaml")
    error = caught.value
    assert (error.file, error.path) == ("c.yaml", path), str(error)
    assert reason in error.reason, str(error)


def test_a_campaign_needs_its_audience_channel_and_template():
    for key in ("audience", "channel", "template"):
        with pytest.raises(DefinitionError) as caught:
            parse_campaign({k: v for k, v in CAMPAIGN.items() if k != key}, file="c.yaml")
        assert (caught.value.path, caught.value.reason) == (key, "Field required")


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


SEQUENCE_YAML = (
    "name: s\ntrigger: {event: Signed Up}\nsteps:\n  - {send: {channel: email, template: email/x}}\n"
)
CAMPAIGN_YAML = "name: c\naudience: cart_abandoners\nchannel: email\ntemplate: email/store_event\n"


@pytest.mark.parametrize(
    ("load", "text", "kind"),
    [(load_sequences, SEQUENCE_YAML, "sequence"), (load_campaigns, CAMPAIGN_YAML, "campaign")],
)
def test_folder_errors_name_the_file(tmp_path, load, text, kind):
    first = _write(tmp_path / "a", "one.yaml", text)
    second = _write(tmp_path / "a", "two.yml", text)
    with pytest.raises(DefinitionError) as caught:
        load(tmp_path / "a")
    assert (caught.value.file, caught.value.path) == (str(second), "name")
    name = text.split("\n", 1)[0].removeprefix("name: ")
    assert caught.value.reason == f"{kind} {name!r} is also defined in {first}"

    # A tab cannot indent YAML: the error names the line.
    bad = _write(tmp_path / "b", "bad.yaml", text.replace("\n", "\n\t", 1))
    with pytest.raises(DefinitionError) as caught:
        load(tmp_path / "b")
    assert (caught.value.file, caught.value.path) == (str(bad), "line 2")
    assert caught.value.reason.startswith("invalid YAML")

    listed = _write(tmp_path / "c", "list.yaml", "- name: s\n")
    with pytest.raises(DefinitionError) as caught:
        load(tmp_path / "c")
    assert (caught.value.file, caught.value.path, caught.value.reason) == (
        str(listed),
        "",
        "expected a mapping, got list",
    )


def test_errors_in_a_file_name_it_and_the_path_inside(tmp_path):
    path = _write(tmp_path, "s.yaml", SEQUENCE_YAML.replace("email/x", "sms/x"))
    with pytest.raises(DefinitionError) as caught:
        load_sequences(tmp_path)
    assert str(caught.value) == (
        f"{path}: steps[0].send.template: a email message needs a email/ template, got 'sms/x'"
    )


def test_a_missing_folder_holds_no_campaigns_but_sequences_must_exist(tmp_path):
    assert load_campaigns(tmp_path / "none") == {}
    with pytest.raises(DefinitionError, match="no such directory of sequence definitions"):
        load_sequences(tmp_path / "none")


def test_the_builtin_sequences_load():
    sequences = load_sequences()
    assert set(sequences) == {"abandoned_cart", "pickup_ready"}
    cart = sequences["abandoned_cart"]
    assert cart.file.endswith("abandoned_cart.yaml") and cart.description
    assert (cart.trigger_audience, cart.trigger_event, cart.exit.event) == (
        "cart_abandoners",
        None,
        "Order Completed",
    )
    assert cart.holdout_percent == 10.0 and cart.reenter_after is None
    assert [step.id for step in cart.steps] == [
        "cart_email",
        "wait_2",
        "retarget",
        "wait_4",
        "pickup_reminder",
    ]
    assert cart.step_index("retarget") == 2
    email, wait, ads, _, sms = cart.steps
    assert isinstance(email, SendStep) and (email.channel, email.template) == (
        "email",
        "email/abandoned_cart",
    )
    assert isinstance(wait, WaitStep) and (wait.duration, wait.until) == (timedelta(days=1), None)
    assert (ads.channel, ads.audience, ads.template) == ("ads", "cart_retargeting", None)
    assert (sms.fallback, sms.fallback_template) == ("push", "push/pickup_reminder")
    assert sequences["pickup_ready"].exit.left_audience


def test_valid_steps_of_every_kind():
    sequence = parse_sequence(
        {
            "name": "every_kind",
            "description": None,
            "trigger": {"event": "Signed Up"},
            "exit": {"event": "Order Completed", "properties": {"channel": "store"}},
            "reenter_after": "30d",
            "holdout": "2.5%",
            "steps": [
                {"branch": {"if": {"reachable": "sms"}, "then": "text", "else": "later"}},
                {
                    "id": "text",
                    "send": {"channel": "sms", "template": "sms/pickup_reminder", "fallback": "push"},
                },
                {"id": "later", "wait": {"until": "10:00"}},
                {"id": "store", "send": {"channel": "webhook", "template": "webhook/prepare_pickup"}},
            ],
        },
        file="every_kind.yaml",
    )
    assert (sequence.description, sequence.reenter_after, sequence.holdout_percent) == (
        "",
        timedelta(days=30),
        2.5,
    )
    assert sequence.exit.properties == {"channel": "store"}
    branch, text, later, store = sequence.steps
    assert isinstance(branch, BranchStep) and branch.id == "branch_1"
    assert isinstance(branch.condition, ReachableCondition) and (branch.then, branch.otherwise) == (
        "text",
        "later",
    )
    assert text.fallback_template == "push/pickup_reminder"
    assert isinstance(later, WaitStep) and (later.until, later.duration) == (time(10, 0), None)
    assert (store.channel, store.template) == ("webhook", "webhook/prepare_pickup")


def test_a_campaign_loads_with_its_file_and_send_time_in_utc(tmp_path):
    folder = tmp_path / "campaigns"
    path = _write(
        folder,
        "spring.yml",
        CAMPAIGN_YAML.replace("name: c", "name: spring") + "send_at: 2026-06-02T17:00:00+02:00\n",
    )
    _write(
        folder,
        "naive.yaml",
        CAMPAIGN_YAML.replace("name: c", "name: naive") + "send_at: '2026-06-02 15:00'\n",
    )
    _write(folder, "notes.txt", "not a definition")
    campaigns = load_campaigns(folder)
    assert set(campaigns) == {"spring", "naive"}
    spring = campaigns["spring"]
    assert (spring.file, spring.audience, spring.channel, spring.template) == (
        str(path),
        "cart_abandoners",
        "email",
        "email/store_event",
    )
    noon = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
    assert spring.send_at == noon and campaigns["naive"].send_at == noon
    assert spring.send_at.tzinfo == UTC
