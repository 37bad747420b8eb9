"""``omni report``: holdout lift, journey funnels and the omnichannel metrics, as tables, JSON or HTML."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from omni.cli.common import (
    BadInput,
    DatabaseUrlOption,
    Failure,
    JsonOption,
    NowOption,
    console,
    handle_errors,
    open_store,
    parse_now,
    print_json,
)
from omni.core.settings import get_settings


def _time(option: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadInput(
            f"{option} {value!r} is not an ISO-8601 time (e.g. 2026-06-01 or 2026-06-01T00:00:00Z)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def register(app: typer.Typer) -> None:
    @app.command("report")
    @handle_errors
    def report(
        now: NowOption = None,
        since: Annotated[
            str | None,
            typer.Option(
                "--since", help="Start of the period (ISO-8601, UTC if no zone); default: until − 90 days."
            ),
        ] = None,
        until: Annotated[
            str | None,
            typer.Option("--until", help="End of the period, exclusive (ISO-8601); default: --now."),
        ] = None,
        window: Annotated[
            float | None,
            typer.Option("--window", help="Attribution window in days (default 7, OMNI_REPORT_WINDOW_DAYS)."),
        ] = None,
        json: JsonOption = False,
        html: Annotated[
            Path | None, typer.Option("--html", help="Also write the report with charts to this HTML file.")
        ] = None,
        database_url: DatabaseUrlOption = None,
    ) -> None:
        """Did each journey pay (messaged vs held out, with a 95 % interval), on which channel customers buy,
        and whether omnichannel customers are worth more: retention, AOV, first-contact resolution."""
        from reports import build_report

        settings = get_settings()
        at = parse_now(now)
        if window is not None and window <= 0:
            raise BadInput(f"--window {window}: a number of days above 0")
        try:
            result = build_report(
                open_store(database_url),
                settings=settings,
                now=at,
                since=_time("--since", since),
                until=_time("--until", until),
                window=timedelta(days=window) if window is not None else None,
            )
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        if html is not None:
            try:
                write_html = importlib.import_module("reports.html").write_html
            except (ImportError, AttributeError):
                raise Failure(
                    "the HTML report is not available in this installation (reports.html)"
                ) from None
            write_html(result, html)
        if json:
            print_json(result.to_dict())
            return
        from reports.text import render

        render(result, console)
        if html is not None:
            console.print(f"HTML report: {html}", highlight=False)
