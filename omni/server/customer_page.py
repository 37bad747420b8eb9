"""The customer page: ``GET /customers/{key}``, one customer on one screen for an agent in a call, a chat or
a store — who they are, consent and reachability, the open cart, orders with channel and store, the
journeys they are in and the last messages Omni sent, and the timeline across every channel (filter
links per channel, older events by cursor).

Plain server-rendered HTML (Jinja2, autoescaped: every value shown comes from customer data, which is
hostile), small inline CSS, no JavaScript. The same read keys as the profile API, as the HTTP Basic user
name: a browser asks for it (401 with ``WWW-Authenticate``). The page reads what the API returns
(:func:`omni.server.profile_api.load_profile`), and the lookup is recorded as ``Profile Viewed`` with
``via: page``. An unknown customer gets a 404 page, a malformed key a 400 page, with the reason.
"""

from __future__ import annotations

import zlib
from functools import cache
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from omni.core.channels import TOUCHPOINT_LABELS
from omni.server.profile_api import TIMELINE_CHANNELS, ReadKey, load_profile, load_timeline
from profiles.lookup import KEY_KINDS

TIMELINE_SHOWN = 50

router = APIRouter(tags=["customer page"])


def channel_label(value: str) -> str:
    """How a channel is shown: its label from :mod:`omni.core.channels` when it has one."""
    return TOUCHPOINT_LABELS.get(value) or value.replace("_", " ").capitalize()


def channel_tint(value: str) -> str:
    """A light background colour per channel, the same on every page (spread around the colour wheel in
    the order of the channels, so neighbours differ)."""
    if value in TIMELINE_CHANNELS:
        hue = TIMELINE_CHANNELS.index(value) * 360 // len(TIMELINE_CHANNELS)
    else:
        hue = zlib.crc32(value.encode()) % 360
    return f"hsl({hue}, 70%, 88%)"


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _money(value, currency: str | None = None) -> str:
    if value is None:
        return ""
    return f"{value:,.2f}" + (f" {currency}" if currency else "")


def _quantity(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("omni.server", "templates"),
        autoescape=True,  # always: names, traits and event properties are whatever a feed sent
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(label=channel_label, tint=channel_tint, when=_when, money=_money, qty=_quantity)
    return env


def _render(template: str, status_code: int = 200, **context) -> HTMLResponse:
    html = environment().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


@router.get("/customers/{key}", response_class=HTMLResponse, summary="The customer page")
def customer_page(
    key: str,
    request: Request,
    api_key: ReadKey,
    cursor: Annotated[str | None, Query(description="Older events: the page's 'older' link.")] = None,
    channel: Annotated[list[str] | None, Query(description="Only these channels in the timeline.")] = None,
) -> HTMLResponse:
    """One customer on one screen (HTML)."""
    try:
        page = load_timeline(
            request,
            key,
            api_key=api_key,
            via="page",
            limit=TIMELINE_SHOWN,
            cursor=cursor,
            channels=channel,
            record=False,
        )
        # Recorded once per look (after the timeline was read, so a look does not show itself); older
        # pages of the timeline continue the same look.
        profile = load_profile(request, key, api_key=api_key, via="page", record=cursor is None)
    except HTTPException as exc:
        if exc.status_code not in (400, 404):
            raise
        title = "No such customer" if exc.status_code == 404 else "Cannot read this key"
        return _render(
            "customer_missing.html", exc.status_code, title=title, reason=exc.detail, kinds=KEY_KINDS
        )
    base = f"/customers/{quote(key, safe='@:+')}"
    selected = list(channel or [])
    older = None
    if page.next_cursor:
        older = f"{base}?{urlencode([('cursor', page.next_cursor), *(('channel', c) for c in selected)])}"
    return _render(
        "customer.html",
        p=profile,
        page=page,
        base=base,
        older=older,
        selected=selected,
        channels=TIMELINE_CHANNELS,
    )
