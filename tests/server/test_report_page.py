"""``/reports/latest`` on ``omni serve``: the newest HTML report of ``report_dir``, to read keys only,
self-contained (a Content-Security-Policy that lets it load nothing). SQLite and PostgreSQL."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import httpx

from omni.core.settings import Settings
from reports.html import latest_report, report_file, write_html
from reports.model import Report

T0 = datetime(2026, 6, 2, 15, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=10)


def test_omni_serve_shows_the_newest_report_to_read_keys(engine, live_server, api_key, tmp_path):
    folder = tmp_path / "reports-out"
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False)).model_copy(
        update={"report_dir": folder}
    )
    server = live_server(engine, settings, background=False)
    read, write = api_key(engine, "read", "desk"), api_key(engine, "write", "web")
    url = f"{server.url}/reports/latest"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, auth=(write, ""), timeout=10).status_code == 401  # a write key reads nothing
    missing = httpx.get(url, auth=(read, ""), timeout=10)
    assert missing.status_code == 404 and "no report yet" in missing.json()["detail"]

    older = Report(generated_at=T0, since=T0 - timedelta(days=90), until=T0, window_days=7, min_control=100)
    newer = Report(
        generated_at=LATER, since=LATER - timedelta(days=30), until=LATER, window_days=7, min_control=1
    )
    write_html(newer, report_file(folder, LATER))
    write_html(older, report_file(folder, T0))  # written last: the newest file, though about an older day
    os.utime(report_file(folder, LATER), ns=(1, 1))
    assert latest_report(folder) == report_file(folder, T0)
    shown = httpx.get(url, auth=(read, ""), timeout=10)
    assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html")
    assert shown.text == report_file(folder, T0).read_text(encoding="utf-8")
    assert "default-src 'none'" in shown.headers["content-security-policy"]


def test_a_browser_shows_the_served_report_loading_nothing(engine, live_server, api_key, browser, tmp_path):
    """In Chromium, under the page's Content-Security-Policy: the inline styles apply, the charts are
    drawn at full size, and the browser fetched nothing besides the page itself."""
    import base64
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "reports"))
    from report_sample import NOW, sample_report

    folder = tmp_path / "reports-out"
    write_html(sample_report(), report_file(folder, NOW))
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False)).model_copy(
        update={"report_dir": folder}
    )
    server = live_server(engine, settings, background=False)
    token = base64.b64encode(f"{api_key(engine, 'read', 'desk')}:".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    browser.get(f"{server.url}/reports/latest")
    assert browser.title.startswith("Omni report")
    widths = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => s.getBoundingClientRect().width)"
    )
    assert len(widths) == 5 and all(width > 300 for width in widths)
    collapse = browser.execute_script(
        "return getComputedStyle(document.querySelector('table')).borderCollapse"
    )
    assert collapse == "collapse"  # the inline stylesheet applied under the policy
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    body = browser.find_element("tag name", "body").text
    assert "abandoned_cart: 12.4% of 1,000 messaged customers" in body
