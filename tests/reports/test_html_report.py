"""The HTML report: one self-contained file (nothing loaded from anywhere), a chart per section drawn by
matplotlib, and the numbers of the report it was made from."""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report_sample import sample_report  # noqa: E402

from reports.html import render_html, write_html  # noqa: E402
from reports.model import Report  # noqa: E402


class _Page(HTMLParser):
    """What a browser would fetch, the charts and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.charts: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "data", "srcset", "action") and value:
                if not value.startswith("#"):
                    self.loads.append((tag, name, value))
            if name == "style" and value and re.search(r"url\((?!#)", value):
                self.loads.append((tag, name, value))
        if tag == "svg":
            self.charts.append(dict(attrs).get("aria-label") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _text(page: _Page) -> str:
    return re.sub(r"\s+", " ", " ".join(page.text))


def test_the_file_is_self_contained_with_a_chart_per_section(tmp_path):
    path = tmp_path / "out" / "report.html"
    write_html(sample_report(), path)
    html = path.read_text(encoding="utf-8")
    assert not [p.name for p in path.parent.iterdir() if p.name != "report.html"]  # no partial file left
    page = _parse(html)
    assert page.loads == []  # no src / href / url() to fetch: images, fonts, styles, scripts
    assert "script" not in page.tags and "link" not in page.tags and "img" not in page.tags
    assert "@import" not in html and not re.search(r"url\((?!#)", html)  # url(#clip): in the page
    assert page.charts == ["lift", "funnel-abandoned_cart", "channels", "retention-aov", "fcr"]
    # The charts are matplotlib's (its SVG, text kept as text), inline, one document.
    assert html.count("<svg") == 5 and "<?xml" not in html and "<!DOCTYPE svg" not in html
    assert "Matplotlib" in html or "matplotlib" in html
    assert html.startswith("<!doctype html>")


def test_the_numbers_are_the_reports():
    report = sample_report()
    text = _text(_parse(render_html(report)))
    # The journey: each group's customers, buyers and rate; the lift with its interval and verdict.
    assert (
        "abandoned_cart: 12.4% of 1,000 messaged customers bought within 7 days, against 9.1% of 110 held "
        "out: +3.3 pts (95% interval +1.2 pts to +5.4 pts): significant" in text
    )
    row = re.search(r"abandoned_cart messaged 1,000 124 12\.4% 10\.5% to 14\.6% 130 6,500\.00 6\.50", text)
    assert row, text[:2000]
    assert "held out 110 10 9.1% 5.0% to 15.9% 10 480.00 4.36" in text
    assert "abandoned_cart +3.3 pts +1.2 pts to +5.4 pts +36.3% 0.021 significant +35.0 2,136.40" in text
    # The global control group.
    assert "everyone else 9,500 1,900 20.0%" in text and "global control 500 85 17.0%" in text
    assert "-0.4 pts to +6.6 pts" in text and "not significant" in text
    # The funnel, without feedback where there is none.
    assert "cart_email email 1,000 980 950 400 120 100 104 5,200.00" in text
    assert "retarget ads 700 700 – – – 40 41 2,050.00" in text
    assert "exit: bought at the till 61" in text
    # Conversion by channel, retention, AOV, FCR.
    assert "call_center 300 51 17.0% 13.2% to 21.6%" in text
    assert "store 800 950 61,750.00 65.00" in text
    assert "email 1,000 124 12.4% 10.5% to 14.6% 90 4,500.00 120 6,000.00" in text
    assert "3+ 100 55 55.0% 45.2% to 64.4%" in text
    assert "+18.8 pts (95 % interval +12.8 pts to +24.6 pts)" in text
    assert "AOV, 2+ channels minus 1: 14.20 (95 % interval 11.10 to 17.30)" in text
    assert "first contact: chat 150 110 73.3%" in text and "with context 100 85 85.0% 76.7% to 90.7%" in text


def test_text_is_escaped_and_an_empty_report_still_renders():
    html = render_html(sample_report())
    assert "A note with &lt;markup&gt; &amp; an ampersand." in html
    assert "<markup>" not in html
    from datetime import timedelta

    from report_sample import NOW

    empty = Report(
        generated_at=NOW, since=NOW - timedelta(days=90), until=NOW, window_days=7, min_control=100
    )
    page = _parse(render_html(empty))
    assert page.charts == [] and page.loads == []
    assert "No journey had anyone enrolled in the period." in _text(page)
