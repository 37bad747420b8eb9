"""Finding message templates and rendering them from a context dict.

Templates live in ``templates/<channel>/`` (``Settings.templates_dir``, ``OMNI_TEMPLATES_DIR``,
overrides the folder), one file per part, named ``<name>.<part>.j2``; the parts of each channel are its
``template_parts`` in :mod:`omni.core.channels`:

| channel | parts | |
| --- | --- | --- |
| email | ``subject`` (required), ``html`` and/or ``txt`` | HTML autoescaped |
| sms | ``txt`` | checked against segment length: a warning past one segment, an error past 1,600 chars |
| push | ``title``, ``body`` | |
| webhook | ``json`` | a JSON object (build values with ``tojson``): the payload another system receives |

Files starting with ``_`` are layouts and partials (``{% extends "email/_layout.html.j2" %}``).
Templates render in the sandbox of :mod:`templates.sandbox` with ``StrictUndefined``: a template that
uses data the customer does not have (no open cart, no first name) fails that customer's render with a
:class:`RenderError` naming the template, the customer and the missing value; a template that wants a
fallback says so (``{{ customer.first_name | default("there") }}``). Filters: :mod:`templates.filters`.

The context comes from the caller: :mod:`sequences.contexts` builds it from the store (and documents
it); :func:`render_context` renders one built elsewhere (tests, previews).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, TemplateNotFound, UndefinedError
from jinja2.sandbox import SecurityError

from omni.core.channels import CHANNELS, TEMPLATE_CHANNELS, Channel
from templates.sandbox import BUDGET, LIMITS, Budget, LimitExceeded, environment, render_limited
from templates.sms import sms_segments

BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent


class RenderError(Exception):
    """A template that cannot be rendered for a customer (missing data, no address, bad template, a
    render limit)."""

    def __init__(
        self, template: str, customer_id: int | None, reason: str, *, kind: str = "template"
    ) -> None:
        who = f" for customer {customer_id}" if customer_id is not None else ""
        super().__init__(f"cannot render {template}{who}: {reason}")
        self.template = template
        self.customer_id = customer_id
        self.reason = reason
        # data (the customer lacks something the template needs), template (broken or unsafe), or the
        # limit that was hit: time, output, size, range, arithmetic, format, items.
        self.kind = kind


@dataclass
class Rendered:
    """One customer's render of a template: what the connector messages are made of."""

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
    # webhook: the JSON object the receiving system gets (the connector's ``data``)
    data: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    channel: str
    parts: tuple[str, ...]


def templates_dir(directory: Path | None = None) -> Path:
    """The templates folder: ``directory`` (``Settings.templates_dir``), else the built-in one."""
    return Path(directory) if directory else BUILTIN_TEMPLATES_DIR


def list_templates(directory: Path | None = None) -> list[TemplateInfo]:
    """Every template in ``directory`` (None: the built-in folder), by name (``email/abandoned_cart``),
    with its parts."""
    directory = templates_dir(directory)
    found: dict[tuple[str, str], set[str]] = {}
    for channel in TEMPLATE_CHANNELS:
        folder = directory / channel
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.j2")):
            if path.name.startswith("_"):
                continue
            stem, _, part = path.name[: -len(".j2")].rpartition(".")
            if stem and part in CHANNELS[channel].template_parts:
                found.setdefault((channel, stem), set()).add(part)
    return [
        TemplateInfo(
            f"{channel}/{stem}", channel, tuple(p for p in CHANNELS[channel].template_parts if p in parts)
        )
        for (channel, stem), parts in sorted(found.items())
    ]


def find_template(name: str, directory: Path | None = None) -> TemplateInfo:
    """The template called ``name`` in ``directory`` (None: the built-in folder); :class:`RenderError`
    naming the known ones when there is none."""
    templates = list_templates(directory)
    for info in templates:
        if info.name == name:
            return info
    known = ", ".join(i.name for i in templates) or "none"
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
    """Render every part of a template with ``context`` within the render limits (one budget for all
    the parts); :class:`RenderError` on missing data, a broken template or a limit — never anything else.

    ``templates``: parts already loaded (:func:`load_parts`), so a batch looks each one up once.
    """
    env = environment(directory)
    parts: dict[str, str] = {}
    channel = CHANNELS[info.channel]
    budget = Budget(LIMITS.seconds, channel.output_limit or LIMITS.string_chars)
    token = BUDGET.set(budget)
    try:
        for part in info.parts:
            try:
                template = (templates or {}).get(part) or env.get_template(f"{info.name}.{part}.j2")
                parts[part] = render_limited(template, context, budget)
            except LimitExceeded as exc:
                raise RenderError(
                    info.name, customer_id, f"{part}: over a limit: {exc}", kind=exc.kind
                ) from None
            except UndefinedError as exc:
                raise RenderError(
                    info.name, customer_id, f"{part}: missing data: {exc.message}{_hint(exc)}", kind="data"
                ) from None
            except SecurityError as exc:
                raise RenderError(info.name, customer_id, f"{part}: unsafe template: {exc}") from None
            except TemplateNotFound as exc:
                raise RenderError(info.name, customer_id, f"{part}: template file not found: {exc}") from None
            except TemplateError as exc:
                raise RenderError(info.name, customer_id, f"{part}: template error: {exc}") from None
            except RecursionError:
                raise RenderError(
                    info.name, customer_id, f"{part}: template error: too deeply nested (recursion)"
                ) from None
            except MemoryError:
                raise RenderError(
                    info.name, customer_id, f"{part}: over a limit: out of memory", kind="size"
                ) from None
            except Exception as exc:  # noqa: BLE001 - any error of a template is that render's failure
                raise RenderError(
                    info.name, customer_id, f"{part}: error while rendering: {describe(exc)}"
                ) from None
    finally:
        BUDGET.reset(token)
    for part in channel.required_parts:
        if part not in parts:
            raise RenderError(info.name, customer_id, f"the template has no {part} part")
    if info.channel == Channel.EMAIL and "html" not in parts and "txt" not in parts:
        raise RenderError(info.name, customer_id, "an email template needs an html or txt part")
    return parts


def describe(exc: BaseException) -> str:
    """An unexpected error, in a line short enough for a delivery's error column."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def load_parts(info: TemplateInfo, *, directory: Path) -> tuple[dict[str, Template], str | None]:
    """The compiled parts, and the reason the template cannot be rendered for anyone (a part that does
    not compile or load), or None."""
    env = environment(directory)
    loaded: dict[str, Template] = {}
    broken: str | None = None
    for part in info.parts:
        try:
            loaded[part] = env.get_template(f"{info.name}.{part}.j2")
        except TemplateNotFound as exc:
            broken = broken or f"{part}: template file not found: {exc}"
        except TemplateError as exc:
            broken = broken or f"{part}: template error: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. a RecursionError compiling a pathological template
            broken = broken or f"{part}: template error: {describe(exc)}"
    return loaded, broken


def _hint(exc: UndefinedError) -> str:
    message = exc.message or ""
    for key, hint in (
        ("'cart'", "the customer has no open cart"),
        ("'order'", "the customer has no pickup order waiting"),
        ("first_name", "the customer has no first name"),
        (
            "'None' has no attribute",
            "a value the customer may not have is empty, e.g. no store is theirs: guard it with "
            "{% if store %} ... {% else %} ... {% endif %}",
        ),
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
    """The :class:`Rendered` of a template's rendered parts, checked: no empty subject, title or body, an
    SMS within its body limit, a webhook body that is a JSON object."""
    rendered = Rendered(
        template=info.name,
        channel=info.channel,
        customer_id=customer_id,
        recipients=recipients,
        unsubscribe_url=context.get("unsubscribe_url"),
    )
    if info.channel == Channel.EMAIL:
        rendered.subject = _collapse(parts["subject"])
        if not rendered.subject:
            raise RenderError(info.name, customer_id, "the subject is empty")
        rendered.html = parts.get("html")
        rendered.text = parts["txt"].strip() + "\n" if "txt" in parts else None
    elif info.channel == Channel.SMS:
        text = parts["txt"].strip()
        if not text:
            raise RenderError(info.name, customer_id, "the SMS body is empty")
        limit = CHANNELS[Channel.SMS].body_limit
        if limit is not None and len(text) > limit:
            raise RenderError(info.name, customer_id, f"the SMS is {len(text)} chars, over {limit}")
        rendered.text = text
        rendered.sms_segments = sms_segments(text)
        if rendered.sms_segments > 1:
            rendered.warnings.append(
                f"the SMS takes {rendered.sms_segments} segments ({len(text)} chars): it is billed as many"
            )
    elif info.channel == Channel.WEBHOOK:
        try:
            document = json.loads(parts["json"])
        except ValueError as exc:
            raise RenderError(info.name, customer_id, f"the webhook body is not JSON: {exc}") from None
        if not isinstance(document, dict):
            raise RenderError(info.name, customer_id, "the webhook body is not a JSON object")
        rendered.data = document
    else:
        rendered.title = _collapse(parts["title"])
        rendered.text = _collapse(parts["body"])
        if not rendered.title or not rendered.text:
            raise RenderError(info.name, customer_id, "the push title or body is empty")
    return rendered


def render_context(
    template_name: str,
    context: dict[str, Any],
    *,
    directory: Path | None = None,
    recipients: Sequence[str] = (),
) -> Rendered:
    """Render a template of ``directory`` (None: the built-in folder) with a context built elsewhere
    (tests, previews)."""
    directory = templates_dir(directory)
    info = find_template(template_name, directory)
    customer_id = (context.get("customer") or {}).get("id")
    parts = render_parts(info, context, directory=directory, customer_id=customer_id)
    return assemble(info, parts, customer_id=customer_id, recipients=list(recipients), context=context)
