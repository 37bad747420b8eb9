"""The build-report flow under a temporary Prefect API: artifacts a marketer reads (each journey's lift in
a sentence, tables, a link), the HTML report written where the settings say, and ``omni serve`` showing
the newest one at ``/reports/latest`` to read keys only."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent.parent / "sequences"))
from journey_kit import T0, buy, customer, no_sleep, seed_stores  # noqa: E402

from flows.report import build_report, served_url  # noqa: E402
from omni.core.settings import Settings, get_settings  # noqa: E402
from reports import build_report as build_report_now  # noqa: E402
from reports.html import report_file  # noqa: E402
from reports.text import lift_sentence  # noqa: E402
from sequences.enrollment import is_held_out  # noqa: E402
from sequences.tick import run_tick  # noqa: E402

ROOT = Path(__file__).parent.parent.parent
LATER = T0 + timedelta(days=10)


async def _artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts}


def _journey(engine) -> None:
    """Twelve cart abandoners enter the abandoned-cart journey at T0; customers 1, 2 and 3 buy (at the
    till, online) the next day."""
    seed_stores(engine)
    users = {n: customer(engine, n) for n in range(1, 13)}
    run_tick(engine, now=T0, settings=Settings(), names=["abandoned_cart"], sleep=no_sleep)
    for n, channel in ((1, "store"), (2, "web"), (3, "store")):
        buy(engine, users[n], T0 + timedelta(days=1, hours=n), channel=channel, order_id=f"o-{n}")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_flow_publishes_sentences_tables_a_link_and_the_html_report(
    prefect_harness, engine, database_url, tmp_path, monkeypatch
):
    _journey(engine)
    monkeypatch.setenv("OMNI_PUBLIC_URL", "https://omni.example.com/")
    get_settings.cache_clear()
    try:
        state = build_report(
            database_url=database_url, now=LATER, report_dir=str(tmp_path / "out"), return_state=True
        )
        assert state.is_completed()
        document = state.result()
        artifacts = asyncio.run(_artifacts(state.state_details.flow_run_id))
    finally:
        get_settings.cache_clear()
    assert set(artifacts) == {"report-summary", "report-journeys", "report-channels", "report-html"}
    expected = build_report_now(engine, settings=Settings(), now=LATER)
    [journey] = [j for j in expected.journeys if j.sequence == "abandoned_cart"]
    held = sum(1 for n in range(1, 13) if is_held_out(n, "abandoned_cart", 10.0))
    assert (journey.messaged.customers, journey.held_out.customers) == (12 - held, held)
    assert journey.messaged.converted + journey.held_out.converted == 3
    # The summary says each journey's lift in one sentence, the same the terminal and the demo print.
    summary = artifacts["report-summary"].data
    assert f"- {lift_sentence(journey, expected.window_days)}" in summary
    assert "https://omni.example.com/reports/latest" in summary
    rows = json.loads(artifacts["report-journeys"].data)
    [row] = [r for r in rows if r["Journey"] == "abandoned_cart"]
    assert (row["Messaged"], row["Held out"]) == (12 - held, held)
    assert row["Verdict"] == journey.lift.verdict
    assert "(https://omni.example.com/reports/latest)" in artifacts["report-html"].data  # [text](link)
    # The HTML report: in the folder asked for, named after the report's time, and the same numbers.
    path = Path(document["html"])
    assert path == report_file(tmp_path / "out", LATER).resolve() and path.is_file()
    assert document["journeys"] == [j.to_dict() for j in expected.journeys]
    html = path.read_text(encoding="utf-8")
    assert f"{journey.messaged.customers:,} messaged customers" in html and "<svg" in html


def test_the_deployment_runs_daily(monkeypatch):
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    deployment = deployments["build-report"]
    assert deployment["entrypoint"] == "flows/report.py:build_report"
    assert deployment["schedules"] == [{"cron": "0 6 * * *", "timezone": "UTC", "active": True}]
    module, name = deployment["entrypoint"].split(":")
    import importlib

    loaded = importlib.import_module(module.removesuffix(".py").replace("/", "."))
    assert getattr(loaded, name).name == "build-report"
    monkeypatch.delenv("OMNI_PUBLIC_URL", raising=False)
    assert (
        served_url(Settings(server_host="0.0.0.0", server_port=8080)) == "http://0.0.0.0:8080/reports/latest"
    )
