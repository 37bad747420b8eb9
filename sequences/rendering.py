"""Rendering message templates for customers.

Templates live in ``templates/<channel>/`` (``OMNI_TEMPLATES_DIR`` overrides the folder), one file per
part, named ``<name>.<part>.j2``:

| channel | parts | |
| --- | --- | --- |
| email | ``subject`` (required), ``html`` and/or ``txt`` | HTML autoescaped |
| sms | ``txt`` | checked against segment length: a warning past one segment, an error past 1,600 chars |
| push | ``title``, ``body`` | |

Files starting with ``_`` are layouts and partials (``{% extends "email/_layout.html.j2" %}``).
The environment is a Jinja2 ``SandboxedEnvironment`` with ``StrictUndefined``: a template that uses data
the customer does not have (no open cart, no first name) fails that customer's render with a
:class:`RenderError` naming the template, the customer and the missing value; a template that wants a
fallback says so (``{{ customer.first_name | default("there") }}``).

Context (see :func:`build_contexts`): ``customer`` (id, first_name, last_name, name, email, phone, locale,
timezone; keys without a value are absent), ``cart`` (the open cart: items with name, sku, price,
quantity, line_total; total, currency, item_count), ``order`` (the latest pickup order not yet picked
up, with its ``store``), ``store`` (the order's store, else the home store: name, address, full_address,
phone, hours, hours_today, opening_hours), ``unsubscribe_url`` (signed, see ``sequences.unsubscribe``),
``links`` (shop, cart, order: UTM-tagged), ``brand``, ``now`` (in the customer's timezone). Filters:
``money(currency)``, ``utm(content=None)``, ``datetime(fmt)``.

Interface for the sequence engine:

- ``render(session, template_name, customer_id, *, now, settings=None) -> Rendered`` (raises
  :class:`RenderError`);
- ``render_many(session, template_name, customer_ids, *, now, settings=None) -> dict[int, Rendered |
  RenderError]``: the same for a batch, with a handful of set-based queries per batch whatever its size;
- ``Rendered.messages(delivery_id) -> list[connectors.Message]`` (push: one per device token, the
  first keeps ``delivery_id``, the others get ``delivery_id#2``, ``#3``...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    UndefinedError,
    pass_context,
)
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from sqlalchemy import select
from sqlalchemy.orm import Session

from connectors.base import Message

BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
CHANNEL_PARTS = {"email": ("subject", "html", "txt"), "sms": ("txt",), "push": ("title", "body")}
REQUIRED_PARTS = {"email": ("subject",), "sms": ("txt",), "push": ("title", "body")}
SMS_MAX_CHARS = 1600
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CURRENCY_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "CAD": "CA$", "AUD": "A$", "JPY": "¥"}
CHUNK = 1000

# GSM 03.38: the basic set counts one septet, the extension set two; anything else means UCS-2.
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿"
    "abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENDED = set("^{}\\[~]|€\f")
GSM7 = frozenset(GSM7_BASIC | GSM7_EXTENDED)


class RenderError(Exception):
    """A template that cannot be rendered for a customer (missing data, no address, bad template)."""

    def __init__(self, template: str, customer_id: int | None, reason: str) -> None:
        who = f" for customer {customer_id}" if customer_id is not None else ""
        super().__init__(f"cannot render {template}{who}: {reason}")
        self.template = template
        self.customer_id = customer_id
        self.reason = reason


@dataclass
class Rendered:
    template: str
    channel: str
    customer_id: int | None
    recipients: list[str]
    subject: str | None = None
    html: str | None = None
    text: str | None = None
    title: str | None = None
    unsubscribe_url: str | None = None
    sms_segments: int | None = None
    warnings: list[str] = field(default_factory=list)

    def messages(self, delivery_id: str, *, to: str | None = None) -> list[Message]:
        """The connector messages for this render (``to`` overrides the recipients, e.g. a test send)."""
        recipients = [to] if to else self.recipients
        return [
            Message(
                delivery_id=delivery_id if index == 0 else f"{delivery_id}#{index + 1}",
                channel=self.channel,
                to=recipient,
                customer_id=self.customer_id,
                template=self.template,
                subject=self.subject,
                html=self.html,
                text=self.text,
                title=self.title,
                unsubscribe_url=self.unsubscribe_url,
                categories=(self.template.replace("/", "_"),),
                data={"template": self.template},
            )
            for index, recipient in enumerate(recipients)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    channel: str
    parts: tuple[str, ...]


# --- formatting helpers (filters) ----------------------------------------------------------------------


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


def sms_segments(text: str) -> int:
    """Segments an SMS body takes: GSM-7 (160 / 153 per part) or UCS-2 (70 / 67 per part)."""
    if not text:
        return 0
    chars = set(text)
    if chars <= GSM7:
        # One septet each, and one more for each character of the extension set.
        septets = len(text) + sum(text.count(ch) for ch in chars & GSM7_EXTENDED)
        return 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(text.encode("utf-16-le")) // 2
    return 1 if units <= 70 else math.ceil(units / 67)


def _zone(name: str | None) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


# --- the environment -----------------------------------------------------------------------------------


def templates_dir(settings: Any = None) -> Path:
    if settings is None:
        from omni.settings import get_settings

        settings = get_settings()
    return Path(settings.templates_dir) if settings.templates_dir else BUILTIN_TEMPLATES_DIR


_DICT_ATTRIBUTES = frozenset(dir(dict))


class _Sandbox(SandboxedEnvironment):
    """The sandbox, reading ``customer.first_name`` from a plain dict without an exception first.

    Jinja's ``a.b`` tries the attribute ``b`` and, when there is none, the item ``a["b"]``. A context is
    plain dicts, which have no attributes but their methods: the sandbox raised and caught an
    ``AttributeError`` for each of the ~35 values a message reads, the largest cost of a render. For a
    plain dict and a name that is not one of its attributes, this goes straight to the item, with the
    same result; anything else takes the sandbox's own path (and its checks).
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A template's globals as one plain dict rather than a ChainMap over the environment's: every
        # render copies them into its context, and copying a ChainMap (in Python) cost a third of a
        # render. The environment's globals are set once, before any template is loaded.
        return {**self.globals, **(d or {})}


@lru_cache(maxsize=8)
def environment(directory: Path) -> SandboxedEnvironment:
    env = _Sandbox(
        loader=FileSystemLoader(str(directory)),
        undefined=StrictUndefined,
        autoescape=lambda name: bool(name) and name.endswith((".html.j2", ".html")),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        # Compiled templates are kept for the life of the process (a flow run or a CLI command): checking
        # every file on disk for each customer's render was the largest cost of a tick.
        auto_reload=False,
        cache_size=1000,
    )
    env.filters["money"] = money
    env.filters["utm"] = _utm_filter
    env.filters["datetime"] = lambda value, fmt="%a %d %b, %H:%M": value.strftime(fmt) if value else ""
    return env


@pass_context
def _utm_filter(context: Any, url: str, content: str | None = None) -> str:
    """``{{ "https://shop.example.com/p/1" | utm("hero") }}``: medium = channel, campaign = template."""
    return add_utm(
        url,
        medium=context.get("channel") or "email",
        campaign=context.get("campaign") or "omni",
        content=content,
    )


def list_templates(settings: Any = None, directory: Path | None = None) -> list[TemplateInfo]:
    """Every template in the folder, by name (``email/abandoned_cart``), with its parts."""
    directory = directory or templates_dir(settings)
    found: dict[str, set[str]] = {}
    for channel in CHANNEL_PARTS:
        folder = directory / channel
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.j2")):
            if path.name.startswith("_"):
                continue
            stem, _, part = path.name[: -len(".j2")].rpartition(".")
            if stem and part in CHANNEL_PARTS[channel]:
                found.setdefault(f"{channel}/{stem}", set()).add(part)
    return [
        TemplateInfo(
            name, name.split("/")[0], tuple(p for p in CHANNEL_PARTS[name.split("/")[0]] if p in parts)
        )
        for name, parts in sorted(found.items())
    ]


def find_template(name: str, settings: Any = None, directory: Path | None = None) -> TemplateInfo:
    for info in list_templates(settings, directory):
        if info.name == name:
            return info
    known = ", ".join(i.name for i in list_templates(settings, directory)) or "none"
    raise RenderError(name, None, f"no such template (known: {known})")


# --- rendering -----------------------------------------------------------------------------------------


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def render_parts(
    info: TemplateInfo,
    context: dict[str, Any],
    *,
    directory: Path,
    customer_id: int | None = None,
    templates: Mapping[str, Template] | None = None,
) -> dict[str, str]:
    """Render every part of a template with ``context``; :class:`RenderError` on missing data.

    ``templates``: parts already loaded (:func:`load_parts`), so a batch looks each one up once.
    """
    env = environment(directory)
    parts: dict[str, str] = {}
    for part in info.parts:
        try:
            template = (templates or {}).get(part) or env.get_template(f"{info.name}.{part}.j2")
            parts[part] = template.render(context)
        except UndefinedError as exc:
            raise RenderError(
                info.name, customer_id, f"{part}: missing data: {exc.message}{_hint(exc)}"
            ) from None
        except SecurityError as exc:
            raise RenderError(info.name, customer_id, f"{part}: unsafe template: {exc}") from None
        except TemplateNotFound as exc:
            raise RenderError(info.name, customer_id, f"{part}: template file not found: {exc}") from None
        except TemplateError as exc:
            raise RenderError(info.name, customer_id, f"{part}: template error: {exc}") from None
    for part in REQUIRED_PARTS[info.channel]:
        if part not in parts:
            raise RenderError(info.name, customer_id, f"the template has no {part} part")
    if info.channel == "email" and "html" not in parts and "txt" not in parts:
        raise RenderError(info.name, customer_id, "an email template needs an html or txt part")
    return parts


def load_parts(info: TemplateInfo, *, directory: Path) -> dict[str, Template]:
    """The compiled template of each part that loads; a part that does not is left out, and
    :func:`render_parts` reports its error for each customer as before."""
    env = environment(directory)
    loaded: dict[str, Template] = {}
    for part in info.parts:
        try:
            loaded[part] = env.get_template(f"{info.name}.{part}.j2")
        except TemplateError:
            continue
    return loaded


def _hint(exc: UndefinedError) -> str:
    message = exc.message or ""
    for key, hint in (
        ("'cart'", "the customer has no open cart"),
        ("'order'", "the customer has no pickup order waiting"),
        ("'store'", "the customer has no home store and no pickup order store"),
        ("first_name", "the customer has no first name"),
    ):
        if key in message:
            return f" ({hint})"
    return ""


def assemble(
    info: TemplateInfo,
    parts: dict[str, str],
    *,
    customer_id: int | None,
    recipients: list[str],
    context: dict,
) -> Rendered:
    rendered = Rendered(
        template=info.name,
        channel=info.channel,
        customer_id=customer_id,
        recipients=recipients,
        unsubscribe_url=context.get("unsubscribe_url"),
    )
    if info.channel == "email":
        rendered.subject = _collapse(parts["subject"])
        if not rendered.subject:
            raise RenderError(info.name, customer_id, "the subject is empty")
        rendered.html = parts.get("html")
        rendered.text = parts["txt"].strip() + "\n" if "txt" in parts else None
    elif info.channel == "sms":
        text = parts["txt"].strip()
        if not text:
            raise RenderError(info.name, customer_id, "the SMS body is empty")
        if len(text) > SMS_MAX_CHARS:
            raise RenderError(info.name, customer_id, f"the SMS is {len(text)} chars, over {SMS_MAX_CHARS}")
        rendered.text = text
        rendered.sms_segments = sms_segments(text)
        if rendered.sms_segments > 1:
            rendered.warnings.append(
                f"the SMS takes {rendered.sms_segments} segments ({len(text)} chars): it is billed as many"
            )
    else:
        rendered.title = _collapse(parts["title"])
        rendered.text = _collapse(parts["body"])
        if not rendered.title or not rendered.text:
            raise RenderError(info.name, customer_id, "the push title or body is empty")
    return rendered


def render_context(
    template_name: str, context: dict[str, Any], *, settings: Any = None, recipients: Sequence[str] = ()
) -> Rendered:
    """Render a template with a context built elsewhere (tests, previews)."""
    directory = templates_dir(settings)
    info = find_template(template_name, settings, directory)
    customer_id = (context.get("customer") or {}).get("id")
    parts = render_parts(info, context, directory=directory, customer_id=customer_id)
    return assemble(info, parts, customer_id=customer_id, recipients=list(recipients), context=context)


def render(
    session: Session, template_name: str, customer_id: int, *, now: datetime, settings: Any = None
) -> Rendered:
    """Render ``template_name`` for one customer of the store. Raises :class:`RenderError`."""
    outcome = render_many(session, template_name, [customer_id], now=now, settings=settings)[customer_id]
    if isinstance(outcome, RenderError):
        raise outcome
    return outcome


def render_many(
    session: Session, template_name: str, customer_ids: Iterable[int], *, now: datetime, settings: Any = None
) -> dict[int, Rendered | RenderError]:
    """Render a template for many customers; a customer whose render fails gets its :class:`RenderError`
    (the others go on). An unknown template raises at once."""
    if settings is None:
        from omni.settings import get_settings

        settings = get_settings()
    directory = templates_dir(settings)
    info = find_template(template_name, settings, directory)
    ids = list(dict.fromkeys(customer_ids))
    contexts = build_contexts(
        session, ids, now=now, channel=info.channel, template=info.name, settings=settings
    )
    outcomes: dict[int, Rendered | RenderError] = {}
    templates = load_parts(info, directory=directory)
    for customer_id in ids:
        context = contexts.get(customer_id)
        try:
            if context is None:
                raise RenderError(info.name, customer_id, "no such customer")
            recipients = _recipients(info, context)
            parts = render_parts(
                info, context, directory=directory, customer_id=customer_id, templates=templates
            )
            outcomes[customer_id] = assemble(
                info, parts, customer_id=customer_id, recipients=recipients, context=context
            )
        except RenderError as exc:
            outcomes[customer_id] = exc
    return outcomes


def _recipients(info: TemplateInfo, context: dict) -> list[str]:
    customer = context["customer"]
    if info.channel == "email":
        if not customer.get("email"):
            raise RenderError(info.name, customer["id"], "the customer has no email address")
        return [customer["email"]]
    if info.channel == "sms":
        if not customer.get("phone"):
            raise RenderError(info.name, customer["id"], "the customer has no phone number")
        return [customer["phone"]]
    tokens = context.pop("_device_tokens", None) or []
    if not tokens:
        raise RenderError(info.name, customer["id"], "the customer has no device token")
    return list(tokens)


# --- context -------------------------------------------------------------------------------------------


def _store_dict(store: Any, local_now: datetime) -> dict[str, Any]:
    zone = _zone(store.timezone)
    store_now = local_now.astimezone(zone) if zone else local_now
    hours = dict(store.hours or {})
    today = DAYS[store_now.weekday()]
    address_parts = [store.address, " ".join(p for p in (store.postal_code, store.city) if p), store.region]
    value = {
        "id": store.id,
        "name": store.name,
        "address": store.address,
        "city": store.city,
        "region": store.region,
        "postal_code": store.postal_code,
        "country": store.country,
        "phone": store.phone,
        "email": store.email,
        "timezone": store.timezone,
        "hours": hours,
        "hours_today": hours.get(today, "closed") if hours else None,
        "opening_hours": [
            {"day": name, "hours": hours.get(key, "closed")}
            for key, name in zip(DAYS, DAY_NAMES, strict=True)
        ]
        if hours
        else None,
        "full_address": ", ".join(p for p in address_parts if p) or None,
    }
    return {k: v for k, v in value.items() if v is not None}


def _copy_store(value: dict[str, Any]) -> dict[str, Any]:
    copied = dict(value)
    if "hours" in copied:
        copied["hours"] = dict(copied["hours"])
    if "opening_hours" in copied:
        copied["opening_hours"] = [dict(day) for day in copied["opening_hours"]]
    return copied


def _items(items: list) -> list[dict[str, Any]]:
    lines = []
    for item in items or []:
        quantity = item.get("quantity") or 1
        price = float(item.get("price") or 0)
        line = {
            "product_id": item.get("product_id"),
            "sku": item.get("sku"),
            "name": item.get("name") or item.get("sku") or item.get("product_id"),
            "price": price,
            "quantity": quantity,
            "line_total": round(price * quantity, 2),
        }
        lines.append({k: v for k, v in line.items() if v is not None})
    return lines


def build_contexts(
    session: Session,
    customer_ids: Sequence[int],
    *,
    now: datetime,
    channel: str,
    template: str,
    settings: Any,
) -> dict[int, dict[str, Any]]:
    """The template context of each customer, loaded with a few queries per 1,000 customers."""
    from profiles.models import Cart, Customer, Identity, IdentityKind, Order, Store
    from sequences.unsubscribe import make_token, unsubscribe_secret, unsubscribe_url

    secret = unsubscribe_secret(session, settings)
    campaign = template.split("/")[-1]
    customers_t, carts_t, orders_t, stores_t, identities_t = (
        Customer.__table__,
        Cart.__table__,
        Order.__table__,
        Store.__table__,
        Identity.__table__,
    )
    contexts: dict[int, dict[str, Any]] = {}
    default_zone = _zone(settings.default_timezone) or ZoneInfo("UTC")
    # The same for every customer of the batch: computed once (URL building was a large share of a render).
    shop_link = add_utm(settings.site_url, medium=channel, campaign=campaign)
    cart_link = add_utm(settings.site_url.rstrip("/") + "/cart", medium=channel, campaign=campaign)
    zones: dict[str | None, ZoneInfo | None] = {}
    local_nows: dict[ZoneInfo, datetime] = {}
    store_dicts: dict[str, dict[str, Any]] = {}

    def zone_of(name: str | None) -> ZoneInfo | None:
        if name not in zones:
            zones[name] = _zone(name)
        return zones[name]

    # Only the columns a context uses: whole rows cost more to read (JSON traits, timestamps) than to render.
    customer_columns = [
        customers_t.c[name]
        for name in (
            "id",
            "first_name",
            "last_name",
            "email",
            "phone",
            "locale",
            "timezone",
            "context_timezone",
            "home_store_id",
        )
    ]
    cart_columns = [
        carts_t.c[name] for name in ("customer_id", "status", "items", "value", "currency", "updated_at")
    ]
    order_columns = [
        orders_t.c[name]
        for name in (
            "customer_id",
            "order_id",
            "status",
            "store_id",
            "total",
            "currency",
            "items",
            "placed_at",
            "ready_at",
        )
    ]
    for start in range(0, len(customer_ids), CHUNK):
        chunk = list(customer_ids[start : start + CHUNK])
        customers = {
            r.id: r
            for r in session.execute(select(*customer_columns).where(customers_t.c.id.in_(chunk))).all()
        }
        carts: dict[int, Any] = {}
        # The status is checked here, not in SQL: with "status = 'open'" SQLite would walk the (status,
        # updated_at) index through every open cart in the store instead of looking up these customers.
        for row in session.execute(
            select(*cart_columns).where(carts_t.c.customer_id.in_(chunk)).order_by(carts_t.c.updated_at)
        ).all():
            if row.status == "open":
                carts[row.customer_id] = row  # the latest open cart wins
        orders: dict[int, Any] = {}
        for row in session.execute(
            select(*order_columns)
            .where(
                orders_t.c.customer_id.in_(chunk),
                orders_t.c.fulfillment == "pickup",
                orders_t.c.status != "picked_up",
            )
            .order_by(orders_t.c.updated_at)
        ):
            current = orders.get(row.customer_id)
            # A ready order beats one still being prepared; otherwise the latest.
            if current is None or not (
                current.status == "ready_for_pickup" and row.status != "ready_for_pickup"
            ):
                orders[row.customer_id] = row
        tokens: dict[int, list[str]] = {}
        if channel == "push":
            # The kind is checked here, not in SQL (which would walk the (kind, value) index through every
            # device token in the store instead of looking up these customers).
            for row in session.execute(
                select(identities_t.c.customer_id, identities_t.c.kind, identities_t.c.value)
                .where(identities_t.c.customer_id.in_(chunk))
                .order_by(identities_t.c.created_at.desc(), identities_t.c.id.desc())
            ):
                if row.kind == IdentityKind.DEVICE_TOKEN.value:
                    tokens.setdefault(row.customer_id, []).append(row.value)
        store_ids = {c.home_store_id for c in customers.values() if c.home_store_id}
        store_ids |= {o.store_id for o in orders.values() if o.store_id}
        stores = (
            {r.id: r for r in session.execute(select(stores_t).where(stores_t.c.id.in_(sorted(store_ids))))}
            if store_ids
            else {}
        )
        for customer_id in chunk:
            row = customers.get(customer_id)
            if row is None:
                continue
            order = orders.get(customer_id)
            store = stores.get(order.store_id) if order is not None and order.store_id else None
            store = store or stores.get(row.home_store_id)
            zone = (
                zone_of(row.timezone)
                or zone_of(row.context_timezone)
                or (zone_of(store.timezone) if store is not None else None)
                or default_zone
            )
            local_now = local_nows.get(zone)
            if local_now is None:
                local_now = local_nows[zone] = now.astimezone(zone)
            name = " ".join(p for p in (row.first_name, row.last_name) if p) or None
            customer = {
                "id": row.id,
                "first_name": row.first_name,
                "last_name": row.last_name,
                "name": name,
                "email": row.email,
                "phone": row.phone,
                "locale": row.locale,
                "timezone": zone.key,
            }
            links = {"shop": shop_link}
            context: dict[str, Any] = {
                "customer": {k: v for k, v in customer.items() if v is not None},
                "brand": settings.brand_name,
                "now": local_now,
                "channel": channel,
                "campaign": campaign,
                "links": links,
                "unsubscribe_url": unsubscribe_url(
                    settings.unsubscribe_base_url, make_token(secret, row.id, channel)
                ),
            }
            cart = carts.get(customer_id)
            if cart is not None and cart.items:
                items = _items(cart.items)
                context["cart"] = {
                    "items": items,
                    "item_count": sum(int(i.get("quantity") or 0) for i in items),
                    "total": float(cart.value or 0),
                    "currency": cart.currency or "USD",
                    "updated_at": cart.updated_at.astimezone(zone),
                }
                links["cart"] = cart_link
            if store is not None:
                # A store's details are the same for every customer at ``now``: built once, copied for each
                # (a template may not change what another customer's message says).
                # Its "today" is the store's, or the customer's when the store has no valid timezone.
                key = store.id if zone_of(store.timezone) else f"{store.id}@{zone.key}"
                if key not in store_dicts:
                    store_dicts[key] = _store_dict(store, local_now)
                context["store"] = _copy_store(store_dicts[key])
            if order is not None:
                order_context = {
                    "order_id": order.order_id,
                    "status": order.status,
                    "ready": order.status == "ready_for_pickup",
                    "total": float(order.total or 0),
                    "currency": order.currency or "USD",
                    "items": _items(order.items),
                    "placed_at": order.placed_at.astimezone(zone) if order.placed_at else None,
                    "ready_at": order.ready_at.astimezone(zone) if order.ready_at else None,
                }
                if store is not None and order.store_id == store.id:
                    order_context["store"] = context["store"]
                context["order"] = {k: v for k, v in order_context.items() if v is not None}
                links["order"] = add_utm(
                    f"{settings.site_url.rstrip('/')}/orders/{order.order_id}",
                    medium=channel,
                    campaign=campaign,
                )
            if channel == "push":
                context["_device_tokens"] = tokens.get(customer_id, [])
            contexts[customer_id] = context
    return contexts
