"""Sequence and campaign definitions: the YAML schema, validation and loading.

A sequence (``sequences/<name>.yaml``)::

    name: abandoned_cart
    trigger: {audience: cart_abandoners}       # or {event: Signed Up}
    exit: {event: Order Completed}             # any channel; and/or {left_audience: true}
    reenter_after: 30d                         # default: again on a new entry, never while active
    holdout: 10%                               # deterministic by customer and sequence
    steps:
      - {id: cart_email, send: {channel: email, template: email/abandoned_cart}}
      - {wait: 1d}
      - {id: retarget, send: {channel: ads, audience: cart_retargeting}}
      - {wait: 2d}
      - {id: pickup_reminder, send: {channel: sms, template: sms/pickup_reminder, fallback: push}}

Steps: ``send`` (channel, template — or ``audience`` for ads — and an optional ``fallback`` channel
used when the customer is unreachable on the first or it fails permanently), ``wait`` (a duration, or
``{until: "10:00"}``, the next such local time of the customer), and ``branch`` (``{if: <audience
condition>, then: <step id>, else: <step id>}``; without ``else`` the next step follows).

A campaign (``campaigns/<name>.yaml``): ``audience``, ``channel``, ``template`` and ``send_at``.

Invalid definitions raise :class:`audiences.DefinitionError` naming the file, the path and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from audiences.definitions import DefinitionError, parse_condition, parse_duration

SEND_CHANNELS = ("email", "sms", "push", "ads", "webhook")
MESSAGE_CHANNELS = ("email", "sms", "push")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,199}$")
STEP_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,99}$")
TIME_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class SendStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    channel: str
    template: str | None = None
    audience: str | None = None  # ads: the custom audience to add the customer to
    fallback: str | None = None
    fallback_template: str | None = None


class WaitStep(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    duration: timedelta | None = None
    until: time | None = None


class BranchStep(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    id: str
    condition: Any
    then: str
    otherwise: str | None = None


Step = SendStep | WaitStep | BranchStep


class ExitRule(BaseModel):
    model_config = ConfigDict(frozen=True)

    event: str | None = None
    properties: dict[str, Any] = {}
    left_audience: bool = False


class SequenceDefinition(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str = ""
    file: str = ""
    trigger_audience: str | None = None
    trigger_event: str | None = None
    exit: ExitRule = ExitRule()
    reenter_after: timedelta | None = None
    holdout_percent: float = 0.0
    steps: tuple[Step, ...]

    def step_index(self, step_id: str) -> int:
        for index, step in enumerate(self.steps):
            if step.id == step_id:
                return index
        raise KeyError(step_id)

    @property
    def audiences_used(self) -> set[str]:
        used = {self.trigger_audience} if self.trigger_audience else set()
        return used

    @property
    def ad_audiences(self) -> set[str]:
        return {
            s.audience for s in self.steps if isinstance(s, SendStep) and s.channel == "ads" and s.audience
        }


class CampaignDefinition(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    file: str = ""
    audience: str
    channel: str
    template: str
    send_at: datetime | None = None
    fallback: str | None = None


def _percent(value: Any, file: str, path: str) -> float:
    text = str(value).strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        result = float(number)
    except ValueError:
        raise DefinitionError(file, path, f"expected a percentage like 10%, got {value!r}") from None
    if not 0 <= result <= 100:
        raise DefinitionError(file, path, f"a percentage must be between 0% and 100%, got {value!r}")
    return result


def _duration(value: Any, file: str, path: str) -> timedelta:
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise DefinitionError(file, path, str(exc)) from None
    if duration <= timedelta(0):
        raise DefinitionError(file, path, "a duration must be positive")
    return duration


def _mapping(value: Any, file: str, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DefinitionError(file, path, f"expected a mapping, got {type(value).__name__}")
    return value


def _unknown_keys(raw: Mapping[str, Any], allowed: set[str], file: str, path: str) -> None:
    extra = sorted(set(map(str, raw)) - allowed)
    if extra:
        raise DefinitionError(file, path, f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _template_for(channel: str, template: Any, file: str, path: str) -> str:
    """A template name of ``channel``'s folder (``email/abandoned_cart`` for email): a template of another
    channel would be rendered for the wrong connector."""
    if not isinstance(template, str) or "/" not in template:
        raise DefinitionError(file, path, f"expected {channel}/NAME, got {template!r}")
    if template.split("/", 1)[0] != channel:
        raise DefinitionError(
            file, path, f"a {channel} message needs a {channel}/ template, got {template!r}"
        )
    return template


def fallback_template(fallback: str, template: str | None, given: str | None) -> str | None:
    """The fallback's template: the one given, else the primary's of the same name in the fallback
    channel's folder (``sms/pickup_reminder`` falls back to ``push/pickup_reminder``)."""
    if given or not template:
        return given
    return f"{fallback}/{template.split('/', 1)[-1]}"


def _channel(value: Any, file: str, path: str, allowed: tuple[str, ...] = SEND_CHANNELS) -> str:
    if value not in allowed:
        raise DefinitionError(file, path, f"unknown channel {value!r} (expected one of {', '.join(allowed)})")
    return value


def _parse_step(raw: Any, index: int, file: str) -> Step:
    path = f"steps[{index}]"
    raw = _mapping(raw, file, path)
    kinds = [k for k in ("send", "wait", "branch") if k in raw]
    if len(kinds) != 1:
        raise DefinitionError(file, path, "a step has exactly one of send, wait or branch")
    kind = kinds[0]
    _unknown_keys(raw, {"id", kind}, file, path)
    step_id = raw.get("id", f"{kind}_{index + 1}")
    if not isinstance(step_id, str) or not STEP_ID_PATTERN.match(step_id):
        raise DefinitionError(file, f"{path}.id", f"a step id is lower_snake_case, got {step_id!r}")
    body = raw[kind]
    if kind == "send":
        body = _mapping(body, file, f"{path}.send")
        _unknown_keys(
            body, {"channel", "template", "audience", "fallback", "fallback_template"}, file, f"{path}.send"
        )
        channel = _channel(body.get("channel"), file, f"{path}.send.channel")
        if channel == "ads":
            if not body.get("audience"):
                raise DefinitionError(file, f"{path}.send.audience", "an ads step names the ad audience")
        elif not body.get("template"):
            raise DefinitionError(file, f"{path}.send.template", f"a {channel} step names its template")
        else:
            _template_for(channel, body["template"], file, f"{path}.send.template")
        fallback = body.get("fallback")
        other = body.get("fallback_template")
        if fallback is not None:
            _channel(fallback, file, f"{path}.send.fallback", MESSAGE_CHANNELS)
            if fallback == channel:
                raise DefinitionError(file, f"{path}.send.fallback", "the fallback is the same channel")
            other = fallback_template(fallback, body.get("template"), other)
            _template_for(fallback, other, file, f"{path}.send.fallback_template")
        elif other is not None:
            raise DefinitionError(
                file, f"{path}.send.fallback_template", "a fallback_template needs a fallback"
            )
        return SendStep(
            id=step_id,
            channel=channel,
            template=body.get("template"),
            audience=body.get("audience"),
            fallback=fallback,
            fallback_template=other,
        )
    if kind == "wait":
        if isinstance(body, Mapping):
            _unknown_keys(body, {"until"}, file, f"{path}.wait")
            until = str(body.get("until", ""))
            match = TIME_PATTERN.match(until)
            if not match:
                raise DefinitionError(
                    file, f"{path}.wait.until", f"expected a local time HH:MM, got {until!r}"
                )
            return WaitStep(id=step_id, until=time(int(match.group(1)), int(match.group(2))))
        return WaitStep(id=step_id, duration=_duration(body, file, f"{path}.wait"))
    body = _mapping(body, file, f"{path}.branch")
    _unknown_keys(body, {"if", "then", "else"}, file, f"{path}.branch")
    if "if" not in body or "then" not in body:
        raise DefinitionError(file, f"{path}.branch", "a branch needs if and then")
    condition = parse_condition(body["if"], file=file, path=f"{path}.branch.if")
    return BranchStep(id=step_id, condition=condition, then=str(body["then"]), otherwise=body.get("else"))


def parse_sequence(
    raw: Any, *, file: str = "<sequence>", audiences: Mapping[str, Any] | None = None
) -> SequenceDefinition:
    raw = _mapping(raw, file, "")
    _unknown_keys(
        raw, {"name", "description", "trigger", "exit", "reenter_after", "holdout", "steps"}, file, ""
    )
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise DefinitionError(file, "name", f"a sequence name is lower_snake_case, got {name!r}")
    trigger = _mapping(raw.get("trigger"), file, "trigger")
    _unknown_keys(trigger, {"audience", "event"}, file, "trigger")
    if ("audience" in trigger) == ("event" in trigger):
        raise DefinitionError(file, "trigger", "a trigger is either {audience: NAME} or {event: NAME}")
    trigger_audience = trigger.get("audience")
    if trigger_audience is not None and audiences is not None and trigger_audience not in audiences:
        raise DefinitionError(file, "trigger.audience", f"unknown audience {trigger_audience!r}")
    exit_raw = _mapping(raw.get("exit", {}), file, "exit")
    _unknown_keys(exit_raw, {"event", "properties", "left_audience"}, file, "exit")
    if exit_raw.get("left_audience") and not trigger_audience:
        raise DefinitionError(file, "exit.left_audience", "left_audience needs an audience trigger")
    try:
        exit_rule = ExitRule(**exit_raw)
    except ValidationError as exc:
        raise DefinitionError(file, "exit", exc.errors()[0]["msg"]) from None
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise DefinitionError(file, "steps", "a sequence needs a non-empty list of steps")
    steps = tuple(_parse_step(step, index, file) for index, step in enumerate(steps_raw))
    ids = [step.id for step in steps]
    for index, step_id in enumerate(ids):
        if ids.index(step_id) != index:
            raise DefinitionError(file, f"steps[{index}].id", f"duplicate step id {step_id!r}")
    for index, step in enumerate(steps):
        if isinstance(step, BranchStep):
            for target, key in ((step.then, "then"), (step.otherwise, "else")):
                if target is not None and target not in ids:
                    raise DefinitionError(file, f"steps[{index}].branch.{key}", f"unknown step id {target!r}")
    reenter = raw.get("reenter_after")
    return SequenceDefinition(
        name=name,
        description=str(raw.get("description", "")),
        file=file,
        trigger_audience=trigger_audience,
        trigger_event=trigger.get("event"),
        exit=exit_rule,
        reenter_after=_duration(reenter, file, "reenter_after") if reenter is not None else None,
        holdout_percent=_percent(raw.get("holdout", 0), file, "holdout"),
        steps=steps,
    )


def parse_campaign(raw: Any, *, file: str = "<campaign>") -> CampaignDefinition:
    raw = _mapping(raw, file, "")
    _unknown_keys(
        raw, {"name", "description", "audience", "channel", "template", "send_at", "fallback"}, file, ""
    )
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise DefinitionError(file, "name", f"a campaign name is lower_snake_case, got {name!r}")
    for key in ("audience", "channel", "template"):
        if not raw.get(key):
            raise DefinitionError(file, key, f"a campaign needs {key}")
    _channel(raw["channel"], file, "channel", MESSAGE_CHANNELS)
    _template_for(raw["channel"], raw["template"], file, "template")
    if raw.get("fallback") is not None:
        _channel(raw["fallback"], file, "fallback", MESSAGE_CHANNELS)
        if raw["fallback"] == raw["channel"]:
            raise DefinitionError(file, "fallback", "the fallback is the same channel")
    send_at = raw.get("send_at")
    if send_at is not None:
        try:
            send_at = send_at if isinstance(send_at, datetime) else datetime.fromisoformat(str(send_at))
        except ValueError:
            raise DefinitionError(file, "send_at", f"expected ISO-8601, got {send_at!r}") from None
        send_at = send_at.replace(tzinfo=UTC) if send_at.tzinfo is None else send_at.astimezone(UTC)
    return CampaignDefinition(
        name=name,
        description=str(raw.get("description", "")),
        file=file,
        audience=raw["audience"],
        channel=raw["channel"],
        template=raw["template"],
        send_at=send_at,
        fallback=raw.get("fallback"),
    )


def _load_dir(directory: Path, parse: Any, **kwargs: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*.y*ml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise DefinitionError(str(path), "", f"invalid YAML: {exc}") from None
        definition = parse(raw, file=str(path), **kwargs)
        if definition.name in found:
            raise DefinitionError(
                str(path), "name", f"{definition.name!r} is also defined in {found[definition.name].file}"
            )
        found[definition.name] = definition
    return found


def sequences_dir() -> Path:
    from omni.core.settings import get_settings

    return get_settings().sequences_dir or Path(__file__).parent


def campaigns_dir() -> Path:
    from omni.core.settings import get_settings

    return get_settings().campaigns_dir or Path.cwd() / "campaigns"


def load_sequences(
    directory: Path | None = None, *, audiences: Mapping[str, Any] | None = None
) -> dict[str, SequenceDefinition]:
    """Every sequence in ``directory`` (default: ``OMNI_SEQUENCES_DIR``, else the built-in ones)."""
    if audiences is None:
        from audiences import load_audiences

        audiences = load_audiences()
    return _load_dir(directory or sequences_dir(), parse_sequence, audiences=audiences)


def load_campaigns(directory: Path | None = None) -> dict[str, CampaignDefinition]:
    """Every campaign in ``directory`` (default: ``OMNI_CAMPAIGNS_DIR``, else ``./campaigns``)."""
    return _load_dir(directory or campaigns_dir(), parse_campaign)
