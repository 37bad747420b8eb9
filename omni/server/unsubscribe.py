"""Unsubscribe and the preference centre, at the URL every marketing message carries
(``OMNI_UNSUBSCRIBE_BASE_URL``, by default ``<the server's URL>/unsubscribe``; ``?token=`` a signed
token naming the customer and the channel, :mod:`sequences.unsubscribe`).

- ``POST /unsubscribe?token=...`` with the body ``List-Unsubscribe=One-Click`` (RFC 8058; form-encoded
  or multipart): the customer is opted out of the token's channel at once; 200, no redirect, no cookie.
  Repeating it changes nothing more.
- ``GET /unsubscribe?token=...`` changes nothing (mail scanners follow links): a page naming the address,
  a button confirming the unsubscribe and the preference centre, the customer's consent per channel
  (``CONSENT_CHANNELS``) with a button to change each and to opt back in.
- ``POST /unsubscribe?token=...`` with ``channel`` and ``status`` (``opted_in`` / ``opted_out``): the
  page's buttons; answers with the page.

A malformed, truncated, tampered or foreign token (signed with another secret), or one naming no
customer or a channel without consent, changes nothing and gets a plain 400 page. Every change is a
consent decision with source ``one_click`` or ``preference_centre`` and an ``Unsubscribed`` /
``Subscribed`` event on the timeline (:mod:`profiles.suppression`), so the next tick, the audiences and
the profile API see it. Pages are never cached, indexed, framed, nor send a ``Referer`` (the token is
in the URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from sqlalchemy import select

from omni.core.channels import CONSENT_CHANNELS, Channel, Touchpoint, spec
from omni.core.statuses import ConsentStatus
from omni.server.deps import app_settings, now_of, store_engine
from profiles.consent import consents_of, reachability_of
from profiles.db import session_scope
from profiles.models import Customer
from profiles.suppression import decide, live_customer, opt_out
from sequences.unsubscribe import InvalidToken, unsubscribe_secret, verify_token

ONE_CLICK = "one_click"
PREFERENCE_CENTRE = "preference_centre"
# The form field and value of an RFC 8058 one-click POST.
ONE_CLICK_FIELD, ONE_CLICK_VALUE = "List-Unsubscribe", "One-Click"
PAGE_TOUCHPOINT = Touchpoint.WEB.value
MAX_FORM_BYTES = 16_384

HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
}

router = APIRouter(tags=["unsubscribe"])


@cache
def _templates() -> Environment:
    return Environment(
        loader=PackageLoader("omni.server", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
    )


def label(channel: str) -> str:
    """How a channel is named on the page: ``Email``, ``SMS``, ``Push``, ``Ads``."""
    return channel.upper() if channel == Channel.SMS else channel.capitalize()


class BadLink(ValueError):
    """The token or the form cannot be acted on: a plain 400 page."""


@dataclass
class Visitor:
    customer_id: int
    channel: str
    email: str | None
    phone: str | None


def _visitor(session, settings, token: str | None) -> Visitor:
    try:
        customer_id, channel = verify_token(unsubscribe_secret(session, settings), token)
    except InvalidToken as exc:
        raise BadLink(str(exc)) from None
    if channel not in CONSENT_CHANNELS:
        raise BadLink("the link names no channel with consent")
    live = live_customer(session, customer_id)
    if live is None:
        raise BadLink("the link names no customer")
    customers = Customer.__table__
    row = session.execute(select(customers.c.email, customers.c.phone).where(customers.c.id == live)).one()
    return Visitor(live, channel, row.email, row.phone)


def _page_context(session, visitor: Visitor, *, notice: str | None) -> dict:
    consents = consents_of(session, visitor.customer_id)
    reasons = reachability_of(session, visitor.customer_id)
    rows = []
    for channel in CONSENT_CHANNELS:
        consent = consents[channel]
        rows.append(
            {
                "channel": channel,
                "label": label(channel),
                "allowed": consent["allowed"],
                "status": consent["status"],
                "opt_in_required": spec(channel).opt_in_required,
                "note": reasons[channel] if consent["allowed"] else None,
                "current": channel == visitor.channel,
            }
        )
    # The address the link's channel sends to; for push (a device) the one the customer is known by.
    if spec(visitor.channel).address == "phone":
        address = visitor.phone or visitor.email
    else:
        address = visitor.email or visitor.phone
    return {
        "address": address or "your account",
        "channel": visitor.channel,
        "channel_label": label(visitor.channel),
        "allowed": consents[visitor.channel]["allowed"],
        "rows": rows,
        "notice": notice,
        "opted_in": ConsentStatus.OPTED_IN.value,
        "opted_out": ConsentStatus.OPTED_OUT.value,
    }


def _html(name: str, context: dict, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _templates().get_template(name).render(**context), status_code=status, headers=HEADERS
    )


def _bad_link(reason: str) -> HTMLResponse:
    return _html("unsubscribe_error.html", {"reason": reason}, status=400)


@router.get("/unsubscribe", response_class=HTMLResponse, include_in_schema=False)
def unsubscribe_page(request: Request, token: str | None = None) -> Response:
    """The confirmation page and the preference centre; changes nothing."""
    engine, settings = store_engine(request), app_settings(request)
    try:
        with session_scope(engine) as session:
            visitor = _visitor(session, settings, token)
            context = _page_context(session, visitor, notice=None)
    except BadLink as exc:
        return _bad_link(str(exc))
    return _html("unsubscribe.html", context)


@router.post("/unsubscribe", include_in_schema=False)
async def unsubscribe_post(request: Request, token: str | None = None) -> Response:
    """RFC 8058 one-click (``List-Unsubscribe=One-Click``), or a button of the page (``channel``,
    ``status``)."""
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        return _bad_link("the form is too large")
    try:
        form = await request.form(max_files=0, max_fields=20)
    except Exception:  # noqa: BLE001 - any body that is not a form: nothing changes
        return _bad_link("the request is not a form")
    one_click = str(form.get(ONE_CLICK_FIELD) or "").strip().lower() == ONE_CLICK_VALUE.lower()
    channel, status = str(form.get("channel") or ""), str(form.get("status") or "")
    now = now_of(request)
    engine, settings = store_engine(request), app_settings(request)

    def change() -> Response:
        with session_scope(engine) as session:
            visitor = _visitor(session, settings, token)
            if one_click:
                opt_out(
                    session,
                    [visitor.customer_id],
                    visitor.channel,
                    source=ONE_CLICK,
                    now=now,
                    touchpoint=spec(visitor.channel).sent_touchpoint.value,
                    operator=True,
                )
                return PlainTextResponse(f"Unsubscribed from {label(visitor.channel)}.\n", headers=HEADERS)
            if channel not in CONSENT_CHANNELS or status not in (
                ConsentStatus.OPTED_IN.value,
                ConsentStatus.OPTED_OUT.value,
            ):
                raise BadLink("the form names no channel and status")
            decide(
                session,
                [visitor.customer_id],
                channel,
                status,
                source=PREFERENCE_CENTRE,
                now=now,
                touchpoint=PAGE_TOUCHPOINT,
                operator=True,
            )
            word = "unsubscribed from" if status == ConsentStatus.OPTED_OUT.value else "subscribed to"
            context = _page_context(session, visitor, notice=f"Saved: you are {word} {label(channel)}.")
        return _html("unsubscribe.html", context)

    try:
        return await run_in_threadpool(change)
    except BadLink as exc:
        return _bad_link(str(exc))
