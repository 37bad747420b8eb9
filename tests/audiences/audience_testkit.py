"""Hand-built customer histories for the audience tests, ingested through the real Segment path."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select

from audiences import compile_condition
from profiles.ingest import IngestOptions, ingest_payloads
from profiles.models import Identity

_MESSAGE_IDS = itertools.count()
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def days(n: float) -> timedelta:
    return timedelta(days=n)


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


class History:
    """Segment payloads for named users (userId = the name), timed relative to ``NOW``."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []

    def _add(self, payload: dict[str, Any], ago: timedelta, channel: str | None) -> History:
        payload["timestamp"] = (NOW - ago).isoformat()
        payload["messageId"] = f"m{next(_MESSAGE_IDS)}"
        if channel:
            payload.setdefault("context", {})["channel"] = channel
        self.payloads.append(payload)
        return self

    def identify(
        self, user: str, ago: timedelta = days(200), channel: str | None = None, **traits: Any
    ) -> History:
        return self._add({"type": "identify", "userId": user, "traits": traits}, ago, channel)

    def track(
        self,
        user: str,
        event: str,
        ago: timedelta,
        channel: str | None = "web",
        context: dict | None = None,
        properties: dict | None = None,
        **props: Any,
    ) -> History:
        payload: dict[str, Any] = {
            "type": "track",
            "userId": user,
            "event": event,
            "properties": {**(properties or {}), **props},
        }
        if context:
            payload["context"] = dict(context)
        return self._add(payload, ago, channel)

    def anonymous(
        self, anonymous_id: str, event: str, ago: timedelta, channel: str = "web", **props: Any
    ) -> History:
        payload = {"type": "track", "anonymousId": anonymous_id, "event": event, "properties": props}
        return self._add(payload, ago, channel)

    def alias(self, user: str, previous_id: str, ago: timedelta) -> History:
        return self._add({"type": "alias", "userId": user, "previousId": previous_id}, ago, None)

    def add_to_cart(
        self, user: str, ago: timedelta, price: float = 20.0, product: str = "p1", **extra: Any
    ) -> History:
        return self.track(user, "Product Added", ago, product_id=product, price=price, quantity=1, **extra)

    def order(self, user: str, ago: timedelta, order_id: str, channel: str = "web", **props: Any) -> History:
        return self.track(
            user, "Order Completed", ago, channel=channel, order_id=order_id, total=30.0, **props
        )

    def ingest(self, engine: Engine, *, shuffle: int | None = None, batch_size: int | None = None) -> None:
        payloads = list(self.payloads)
        if shuffle is not None:
            random.Random(shuffle).shuffle(payloads)
        # Received after the latest event (ingest refuses payloads dated too far ahead of their receipt).
        received = max([NOW + days(1), *(datetime.fromisoformat(p["timestamp"]) for p in payloads)])
        options = IngestOptions() if batch_size is None else IngestOptions(batch_size=batch_size)
        result = ingest_payloads(engine, payloads, options=options, now=received)
        assert result.rejected == 0, result.samples


def user_ids(engine: Engine) -> dict[int, str]:
    """customer id -> the userId of every user (merged users map to their survivor)."""
    table = Identity.__table__
    with engine.connect() as conn:
        rows = conn.execute(select(table.c.customer_id, table.c.value).where(table.c.kind == "user_id")).all()
    names: dict[int, list[str]] = {}
    for customer_id, value in rows:
        names.setdefault(customer_id, []).append(value)
    return {cid: "+".join(sorted(values)) for cid, values in names.items()}


def matching(
    engine: Engine, condition: Mapping[str, Any], *, now: datetime = NOW, definitions: Mapping | None = None
) -> set[str]:
    statement = compile_condition(condition, now=now, definitions=definitions)
    with engine.connect() as conn:
        ids = [row[0] for row in conn.execute(statement)]
    assert len(ids) == len(set(ids)), "a customer appears twice"
    names = user_ids(engine)
    return {names.get(i, f"#{i}") for i in ids}


def check(engine: Engine, cases: list[tuple[dict, set[str]]], *, now: datetime = NOW) -> None:
    failures = []
    for condition, expected in cases:
        got = matching(engine, condition, now=now)
        if got != expected:
            failures.append(f"{condition}: expected {sorted(expected)}, got {sorted(got)}")
    assert not failures, "\n".join(failures)
