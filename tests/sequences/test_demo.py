"""`omni demo`: the whole story in a fresh directory, through the CLI, checked against the store it leaves.

One run goes through the ``run_sequences`` flow (under the test Prefect API), one calls the engine
directly: both must tell exactly the same story (the demo is deterministic). SQLite only: the demo's
default store.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from omni.cli import app
from profiles.db import create_store_engine, session_scope
from profiles.models import Delivery, Enrollment, Event, OutboxMessage

CUSTOMERS = "80"
runner = CliRunner()


def _demo(directory: Path, *args: str):
    url = f"sqlite:///{directory / 'omni.db'}"
    return runner.invoke(app, ["demo", "--database-url", url, "--customers", CUSTOMERS, "--json", *args]), url


def _story(document: dict) -> list[dict]:
    """What each tick did, without timings."""
    return [
        {key: tick[key] for key in ("label", "at", "happened", "channels", "examples", "exits", "report")}
        for tick in document["ticks"]
    ]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> tuple[dict, str]:
    result, url = _demo(tmp_path_factory.mktemp("demo"))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), url


def test_every_channel_receives_and_in_store_purchases_stop_the_journey(demo_run):
    document, url = demo_run
    assert document["ran_with"] == "prefect"
    assert [t["label"] for t in document["ticks"]] == ["T", "T + 1 day", "T + 3 days"]
    received = Counter()
    for tick in document["ticks"]:
        received.update(tick["channels"])
    assert received["email"] > 0 and received["ads"] > 0
    assert received["sms"] + received["push"] > 0

    engine = create_store_engine(url)
    outbox, enrollments, events = OutboxMessage.__table__, Enrollment.__table__, Event.__table__
    with session_scope(engine) as session:
        by_channel = Counter(session.execute(select(outbox.c.channel)).scalars())
        exited = session.execute(
            select(enrollments).where(
                enrollments.c.sequence == "abandoned_cart", enrollments.c.status == "exited"
            )
        ).all()
        in_store = []
        for enrollment in exited:
            channels = session.execute(
                select(events.c.channel).where(
                    events.c.customer_id == enrollment.customer_id,
                    events.c.name == "Order Completed",
                    events.c.occurred_at > enrollment.enrolled_at,
                    events.c.occurred_at <= enrollment.exited_at,
                )
            ).scalars()
            if "store" in set(channels):
                in_store.append(enrollment.customer_id)
                # Nothing of this journey reached them after they bought at the till, bar the ad removal.
                later = session.execute(
                    select(outbox.c.channel, outbox.c.payload).where(
                        outbox.c.customer_id == enrollment.customer_id,
                        outbox.c.sent_at > enrollment.exited_at,
                    )
                ).all()
                assert all(row.channel == "ads" and row.payload["action"] == "remove" for row in later)
    engine.dispose()
    assert dict(by_channel) == {c: n for c, n in received.items() if n}
    assert in_store, "nobody exited because of an in-store purchase"
    reported = [e for t in document["ticks"] for e in t["exits"] if e["cause"] == "bought_in_store"]
    assert sorted(e["customer_id"] for e in reported) == sorted(in_store)
    assert "bought at the till" in reported[0]["detail"]


def test_holdout_never_messaged_and_nothing_sent_twice(demo_run):
    document, url = demo_run
    engine = create_store_engine(url)
    outbox, enrollments, deliveries = OutboxMessage.__table__, Enrollment.__table__, Delivery.__table__
    with session_scope(engine) as session:
        held_out = set(
            session.execute(
                select(enrollments.c.customer_id).where(enrollments.c.status == "holdout")
            ).scalars()
        )
        rows = session.execute(select(outbox)).all()
        held_deliveries = session.execute(
            select(deliveries.c.id)
            .join(enrollments, enrollments.c.id == deliveries.c.enrollment_id)
            .where(enrollments.c.status == "holdout")
        ).all()
    engine.dispose()
    assert held_out and document["summary"]["held_out"] == len(held_out)
    assert not held_out & {r.customer_id for r in rows}
    assert held_deliveries == []
    assert document["summary"]["holdout_messaged"] == 0

    ids = Counter(r.delivery_id for r in rows)
    assert ids and max(ids.values()) == 1
    # Nor the same message twice under different delivery ids: one cart email per customer, one add to the
    # retargeting audience, one pickup-ready email.
    same = Counter(
        (r.customer_id, r.channel, r.template, (r.payload or {}).get("action"))
        for r in rows
        if r.channel != "sms" and r.channel != "push"
    )
    assert max(same.values()) == 1


def test_same_story_without_prefect_and_refuses_a_store_with_customers(demo_run, tmp_path):
    document, _url = demo_run
    result, url = _demo(tmp_path, "--no-prefect")
    assert result.exit_code == 0, result.output
    direct = json.loads(result.stdout)
    assert direct["ran_with"] == "engine"
    assert _story(direct) == _story(document)

    again = runner.invoke(app, ["demo", "--database-url", url, "--customers", CUSTOMERS])
    assert again.exit_code == 2
    assert "already has" in again.output


def test_the_closing_summary_agrees_with_the_ticks(demo_run):
    """Every number of the summary adds up from the per-tick reports: customers where customers are
    counted, ad-audience adds and removals apart from messages."""
    document, _url = demo_run
    summary = document["summary"]
    steps = [
        (name, step, counts)
        for tick in document["ticks"]
        for name, sequence in tick["report"]["sequences"].items()
        for step, counts in sequence["steps"].items()
    ]

    def total(sequence: str, key: str) -> int:
        return sum(counts[key] for name, _step, counts in steps if name == sequence)

    for sequence in ("abandoned_cart", "pickup_ready"):
        enrolled = sum(t["report"]["sequences"][sequence]["enrolled"] for t in document["ticks"])
        assert summary["enrolled"][sequence] == enrolled
        assert summary["reached"][sequence] <= enrolled
    assert summary["reached"]["pickup_ready"] == total("pickup_ready", "sent")
    ads = sum(t["channels"]["ads"] for t in document["ticks"])
    assert (
        summary["messages"]["ads"]
        == ads
        == total("abandoned_cart", "added") + total("abandoned_cart", "removed")
    )
    messages = sum(summary["messages"][c] for c in ("email", "sms", "push"))
    assert messages == total("abandoned_cart", "sent") + total("pickup_ready", "sent")
    assert sum(summary["exits"].values()) == sum(len(t["exits"]) for t in document["ticks"])


def test_the_demo_never_writes_the_production_artifact_keys(demo_run):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )

    async def demo_artifact_keys() -> tuple[int, set[str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["run-sequences"]))
            )
            ids = [run.id for run in runs if run.parameters.get("artifact_prefix") == "demo"]
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
            )
            return len(ids), {artifact.key for artifact in found if artifact.key}

    runs, keys = asyncio.run(demo_artifact_keys())
    assert runs >= 3  # the demo's three ticks (and any other run asking for the prefix)
    assert "demo-sequences-tick" in keys
    assert all(key.startswith("demo-") for key in keys), keys
