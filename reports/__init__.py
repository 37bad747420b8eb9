"""Measurement: holdout lift, journey funnels and the omnichannel metrics, computed set-based in the store.

- ``model``: the report's dataclasses and their stable JSON shape (``Report.to_dict``).
- ``stats``: intervals and p-values (Newcombe's hybrid score interval, Wilson, Welch), standard library.
- ``metrics``: one SQL statement (or a few) per metric, identical on SQLite and PostgreSQL.
- ``build``: :func:`build_report`, the entry point.
- ``text``: the report as terminal tables and sentences.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from omni.core.settings import Settings
    from reports.model import Report


def build_report(
    engine: Engine,
    *,
    settings: Settings,
    now: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    window: timedelta | None = None,
) -> Report:
    """The report at ``now`` for [``since``, ``until``) (default: the last ``report_period_days`` up to
    ``now``) with the attribution ``window`` (default ``report_window_days``)."""
    from reports.build import build  # noqa: PLC0415

    return build(engine, settings=settings, now=now, since=since, until=until, window=window)
