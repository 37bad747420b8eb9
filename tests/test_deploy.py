"""Deploying as the README says works the first time: runs start in OMNI_HOME (or fail saying what to
set), the flows create the store's schema themselves, `omni campaigns schedule` without a Prefect API
fails fast and writes nothing, and the Quick start leaves the shell where it was."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import common
from flows.common import OmniHomeError, check_omni_home, enter_omni_home

ROOT = Path(__file__).resolve().parent.parent
OMNI = str(Path(sys.executable).with_name("omni"))


def test_the_pull_step_enters_omni_home_or_fails_saying_what_to_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMNI_HOME", raising=False)
    with pytest.raises(OmniHomeError, match="OMNI_HOME is not set: set it in the worker's environment"):
        enter_omni_home()
    monkeypatch.setenv("OMNI_HOME", str(tmp_path / "missing"))
    with pytest.raises(OmniHomeError, match="is not a directory"):
        enter_omni_home()
    home = tmp_path / "omni-home"
    home.mkdir()
    monkeypatch.setenv("OMNI_HOME", str(home))
    assert enter_omni_home() == {"directory": str(home.resolve())}
    assert Path.cwd() == home.resolve()


def test_prefect_yaml_runs_the_omni_home_step(tmp_path, monkeypatch):
    """The pull steps of prefect.yaml, run the way a worker runs them."""
    from prefect.deployments.steps.core import StepExecutionError, run_steps

    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert pull == [{"flows.common.enter_omni_home": {}}]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMNI_HOME", raising=False)
    with pytest.raises(StepExecutionError) as failed:
        asyncio.run(run_steps(pull, print_function=lambda *_: None))
    assert "OMNI_HOME is not set" in str(failed.value.__cause__ or failed.value)
    monkeypatch.setenv("OMNI_HOME", str(ROOT))
    outputs = asyncio.run(run_steps(pull, print_function=lambda *_: None))
    assert outputs["directory"] == str(ROOT) and Path.cwd() == ROOT


def test_a_deployment_run_without_omni_home_fails_in_the_flow_too(tmp_path, monkeypatch):
    """``serve()`` has no pull step: the flows check OMNI_HOME themselves in deployment runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMNI_HOME", raising=False)
    check_omni_home()  # called directly (tests, the demo): the working directory is fine
    monkeypatch.setattr(common, "in_deployment_run", lambda: True)
    with pytest.raises(OmniHomeError, match="OMNI_HOME is not set"):
        check_omni_home()
    monkeypatch.setenv("OMNI_HOME", str(ROOT))
    check_omni_home()
    assert Path.cwd() == ROOT


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_flows_create_the_schema_on_a_fresh_store(prefect_harness, database_url, tmp_path):
    from flows.build_audiences import build_audiences
    from profiles.db import create_store_engine, current_revision, head_revision

    url = f"sqlite:///{tmp_path / 'fresh.db'}"  # no `omni init`
    state = build_audiences(names=["cart_abandoners"], database_url=url, return_state=True)
    assert state.is_completed(), state
    engine = create_store_engine(url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("api_url", [None, "closed"])
def test_campaigns_schedule_without_a_prefect_api_fails_fast_and_writes_nothing(tmp_path, api_url):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OMNI_"))}
    env["HOME"] = str(home)
    if api_url:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{_closed_port()}/api"
    started = time.monotonic()
    result = subprocess.run(
        [OMNI, "campaigns", "schedule", "store_event", "--at", "2030-01-15T09:00:00Z"],
        cwd=ROOT,  # campaigns/store_event.yaml
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    expected = "PREFECT_API_URL is not set" if api_url is None else "no Prefect API answers at"
    assert expected in result.stderr and "prefect server start" in result.stderr
    assert list(home.iterdir()) == []  # no ~/.prefect, nothing else
    # No temporary Prefect server was started to schedule into (it would also take 5-13 s more); the
    # bound is loose so that a loaded machine's slow start-up does not fail the test.
    assert "temporary server" not in result.stderr.lower()
    assert elapsed < 30, elapsed


def test_quick_start_command_1_leaves_the_shell_where_it_started(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    first = lines[0]
    # Whatever changes directory does it in a subshell: command 2, pasted next, runs where we started.
    outside = re.sub(r"\([^()]*\)", "", first)
    assert "cd " not in outside, first
    assert re.search(r"\(\s*mkdir -p demo && cd demo && \.\./\.venv/bin/omni demo\s*\)", first), first
    # And it really does, in bash, with the install and the demo replaced by no-ops.
    script = first.replace(".venv/bin/pip install -e .", "true").replace("../.venv/bin/omni demo", "true")
    script = script.replace("python3 -m venv .venv", "true")
    out = subprocess.run(["bash", "-c", f"{script} && pwd"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path)
