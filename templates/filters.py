"""The filters templates add to Jinja's: ``money(currency)``, ``utm(content=None)``, ``datetime(fmt)``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from jinja2 import pass_context

CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "CAD": "CA$", "AUD": "A$", "JPY": "¥"}


def money(value: Any, currency: str | None = "USD") -> str:
    amount = float(value or 0)
    code = (currency or "USD").upper()
    symbol = CURRENCY_SYMBOLS.get(code)
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {code}"


def add_utm(url: str, *, source: str = "omni", medium: str, campaign: str, content: str | None = None) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("utm_")]
    query += [("utm_source", source), ("utm_medium", medium), ("utm_campaign", campaign)]
    if content:
        query.append(("utm_content", content))
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), parts.fragment))


@pass_context
def utm(context: Any, url: str, content: str | None = None) -> str:
    """``{{ "https://shop.example.com/p/1" | utm("hero") }}``: medium = channel, campaign = template."""
    return add_utm(
        url,
        medium=context.get("channel") or "email",
        campaign=context.get("campaign") or "omni",
        content=content,
    )


def format_datetime(value: datetime | None, fmt: str = "%a %d %b, %H:%M") -> str:
    """``{{ order.ready_at | datetime("%H:%M") }}``; nothing for a missing value."""
    return value.strftime(fmt) if value else ""


FILTERS = {"money": money, "utm": utm, "datetime": format_datetime}
