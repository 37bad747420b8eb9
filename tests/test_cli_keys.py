"""`omni keys create | list | revoke`: the key printed once, listed by prefix, refused once revoked."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from omni.cli import app
from profiles.apikeys import authenticate
from profiles.db import session_scope

runner = CliRunner()


def omni(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_create_list_revoke(engine):
    url = engine.url.render_as_string(hide_password=False)
    created = omni("keys", "create", "--source", "pos-lisbon", "--database-url", url, "--json")
    assert created.exit_code == 0, created.output
    made = json.loads(created.stdout)
    assert made["key"].startswith("omni_w_") and made["source"] == "pos-lisbon" and made["scope"] == "write"
    plain = omni("keys", "create", "--source", "desk", "--scope", "read", "--database-url", url)
    assert plain.exit_code == 0
    read_key = plain.stdout.strip()  # stdout holds just the key; the note goes to stderr
    assert read_key.startswith("omni_r_") and "\n" not in read_key

    listed = json.loads(omni("keys", "list", "--database-url", url, "--json").stdout)
    assert [(k["source"], k["scope"], k["revoked_at"]) for k in listed] == [
        ("pos-lisbon", "write", None),
        ("desk", "read", None),
    ]
    assert made["key"] not in json.dumps(listed) and all(len(k["prefix"]) == 12 for k in listed)
    table = omni("keys", "list", "--database-url", url)
    assert table.exit_code == 0 and made["prefix"] in table.stdout and made["key"] not in table.stdout

    revoked = omni("keys", "revoke", made["prefix"], "--database-url", url, "--json")
    assert revoked.exit_code == 0 and json.loads(revoked.stdout)["revoked_at"] is not None
    with session_scope(engine) as session:
        assert authenticate(session, made["key"], "write") is None
        assert authenticate(session, read_key, "read").source == "desk"
    active = json.loads(omni("keys", "list", "--active", "--database-url", url, "--json").stdout)
    assert [k["source"] for k in active] == ["desk"]


def test_bad_input_exits_2_with_one_line(engine):
    url = engine.url.render_as_string(hide_password=False)
    bad_source = omni("keys", "create", "--source", "no spaces", "--database-url", url)
    assert bad_source.exit_code == 2 and "source" in bad_source.stderr
    bad_scope = omni("keys", "create", "--source", "web", "--scope", "admin", "--database-url", url)
    assert bad_scope.exit_code == 2 and "scope" in bad_scope.stderr
    unknown = omni("keys", "revoke", "omni_w_nope", "--database-url", url)
    assert unknown.exit_code == 2 and "no key" in unknown.stderr
