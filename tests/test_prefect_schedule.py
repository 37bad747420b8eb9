"""A real Prefect server's scheduler creates the scheduled runs of a deployment from ``prefect.yaml``.

Only a real server catches this: the test harness's API never runs the scheduler, and a server whose
dependencies drifted (SQLAlchemy 2.1 with prefect 3.8.8) still starts, accepts deployments and shows
their schedules as active, while its scheduler fails every loop ("Can't evaluate bulk DML statement")
and never creates a run. The pins in pyproject.toml are what this test checks.

About 20-30 s: a fresh server (migrations), a work pool, one ``prefect deploy``, then the scheduler
(its loop shortened to a few seconds here; 60 s by default).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEPLOYMENT = "build-audiences"  # scheduled every 15 minutes in prefect.yaml
FLOW = "build-audiences"
BULK_DML_ERROR = "Can't evaluate bulk DML statement"  # SQLAlchemy 2.1 under prefect 3.8.8's scheduler


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "OMNI_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="3",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="2",
    )
    return env


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not gone within 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    """(API URL, environment for Prefect commands talking to it, the server's log file)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _prefect_env(home)
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    try:
        api = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"prefect server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield api, {**env, "PREFECT_API_URL": api}, log
    finally:
        _stop(process)


def _prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_servers_scheduler_creates_scheduled_runs_of_a_prefect_yaml_deployment(prefect_server):
    api, env, log = prefect_server
    _prefect(env, "work-pool", "create", "omni-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--name", DEPLOYMENT)
    deployment = httpx.get(f"{api}/deployments/name/{FLOW}/{DEPLOYMENT}", timeout=10).json()
    assert [s["active"] for s in deployment["schedules"]] == [True]

    query = {
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        "limit": 10,
    }
    deadline = time.monotonic() + 90
    runs: list = []
    while not runs and time.monotonic() < deadline:
        time.sleep(1)
        runs = httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).json()
        if BULK_DML_ERROR in log.read_text(errors="replace"):
            break  # the scheduler failed: no run will ever come
    server_log = log.read_text(errors="replace")
    assert runs, (
        "the server's scheduler created no scheduled run within 90 s "
        f"(scheduler error in its log: {BULK_DML_ERROR in server_log}):\n{server_log[-4000:]}"
    )
    assert all(run["deployment_id"] == deployment["id"] for run in runs)
    assert all(run["auto_scheduled"] for run in runs)
    assert BULK_DML_ERROR not in server_log
