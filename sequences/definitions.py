"""Sequence and campaign definitions: the YAML schema, its validation and loading.

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

The files are read and validated like audiences, by :mod:`omni.core.definitions`: pydantic models of the
file as written (:class:`Send`, :class:`Campaign` and the private ones of a sequence), then what the
engine runs (:class:`SequenceDefinition` and its steps, :class:`CampaignDefinition`). An invalid
definition raises :class:`DefinitionError` naming the file, the path inside it and the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from audiences.definitions import Condition, load_audiences, parse_condition
from omni.core.channels import MESSAGE_CHANNELS, SEND_CHANNELS, TEMPLATE_CHANNELS, spec
from omni.core.clock import aware
from omni.core.definitions import (
    DefinitionError,
    DefinitionModel,
    Percent,
    PositiveDuration,
    Text,
    load_folder,
    snake_case,
    validate_definition,
)

SequenceName = snake_case("a sequence name")
CampaignName = snake_case("a campaign name")
StepId = snake_case("a step id", max_length=100)
TIME_PATTERN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def _channel_of(allowed: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"unknown channel {value!r} (expected one of {', '.join(allowed)})")
        return value

    return check


SendChannel = Annotated[str, BeforeValidator(_channel_of(SEND_CHANNELS))]
MessageChannel = Annotated[str, BeforeValidator(_channel_of(MESSAGE_CHANNELS))]


def _local_time(value: Any) -> time:
    if isinstance(value, time):
        return value
    match = TIME_PATTERN.match(str(value))
    if not match:
        raise ValueError(f"expected a local time HH:MM, got {str(value)!r}")
    return time(int(match.group(1)), int(match.group(2)))


def _utc(value: Any) -> datetime:
    try:
        when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"expected ISO-8601, got {value!r}") from None
    return aware(when).astimezone(UTC)


LocalTime = Annotated[time, BeforeValidator(_local_time)]
UtcTime = Annotated[datetime, BeforeValidator(_utc)]


def template_of(channel: str, template: Any) -> str:
    """``template`` when it is one of ``channel``'s folder (``email/abandoned_cart`` for email): a
    template of another channel would be rendered for the wrong connector."""
    if not isinstance(template, str) or "/" not in template:
        raise ValueError(f"expected {channel}/NAME, got {template!r}")
    if template.split("/", 1)[0] != channel:
        raise ValueError(f"a {channel} message needs a {channel}/ template, got {template!r}")
    return template


def fallback_template(fallback: str, template: str | None, given: str | None) -> str | None:
    """The fallback's template: the one given, else the primary's of the same name in the fallback
    channel's folder (``sms/pickup_reminder`` falls back to ``push/pickup_reminder``)."""
    if given or not template:
        return given
    return f"{fallback}/{template.split('/', 1)[-1]}"


# --- steps ------------------------------------------------------------------------------------------


def fallback_on_another_channel(value: str | None, info: ValidationInfo) -> str | None:
    """A send's fallback channel is not the channel it falls back from (steps and campaigns alike)."""
    if value is not None and value == info.data.get("channel"):
        raise ValueError("the fallback is the same channel")
    return value


class Send(DefinitionModel):
    """The ``send`` of a step as written: a template of the channel's folder (a channel that syncs an
    audience names the audience instead), and an optional fallback channel and its template."""

    channel: SendChannel
    template: str | None = Field(default=None, validate_default=True)
    audience: str | None = Field(default=None, validate_default=True)
    fallback: MessageChannel | None = None
    fallback_template: str | None = Field(default=None, validate_default=True)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None, info: ValidationInfo) -> str | None:
        channel = info.data.get("channel")
        if channel not in TEMPLATE_CHANNELS:
            return value
        if not value:
            raise ValueError(f"a {channel} step names its template")
        return template_of(channel, value)

    @field_validator("audience")
    @classmethod
    def _audience(cls, value: str | None, info: ValidationInfo) -> str | None:
        channel = info.data.get("channel")
        if channel is not None and spec(channel).delivery == "audience" and not value:
            raise ValueError(f"an {channel} step names the ad audience")
        return value

    _other_channel = field_validator("fallback")(fallback_on_another_channel)

    @field_validator("fallback_template")
    @classmethod
    def _fallback_template(cls, value: str | None, info: ValidationInfo) -> str | None:
        fallback = info.data.get("fallback")
        if fallback is None:
            if value is not None:
                raise ValueError("a fallback_template needs a fallback")
            return None
        return template_of(fallback, fallback_template(fallback, info.data.get("template"), value))


class SendStep(Send):
    id: str


class WaitStep(DefinitionModel):
    id: str
    duration: timedelta | None = None
    until: time | None = None


class BranchStep(DefinitionModel):
    id: str
    condition: Condition
    then: str
    otherwise: str | None = None


Step = SendStep | WaitStep | BranchStep


class _Until(DefinitionModel):
    until: LocalTime


# ``wait: 1d`` or ``wait: {until: "10:00"}``. The tags keep the errors of the other form out.
Wait = Annotated[
    Annotated[PositiveDuration, Tag("<duration>")] | Annotated[_Until, Tag("<until>")],
    Discriminator(lambda value: "<until>" if isinstance(value, Mapping | _Until) else "<duration>"),
]


class _Branch(DefinitionModel):
    condition: Any = Field(alias="if")  # an audience condition, checked by parse_condition
    then: str
    otherwise: str | None = Field(default=None, alias="else")


class _Step(DefinitionModel):
    """One of ``steps`` as written: an optional id and exactly one of send, wait or branch."""

    id: StepId | None = None
    send: Send | None = None
    wait: Wait | None = None
    branch: _Branch | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _Step:
        if [self.send, self.wait, self.branch].count(None) != 2:
            raise ValueError("a step has exactly one of send, wait or branch")
        return self

    def build(self, index: int, file: str) -> Step:
        """The step the engine runs; an id not given is the kind and the step's number (``wait_2``)."""
        if self.send is not None:
            return SendStep(id=self.id or f"send_{index + 1}", **self.send.model_dump())
        if self.branch is not None:
            return BranchStep(
                id=self.id or f"branch_{index + 1}",
                condition=parse_condition(self.branch.condition, file=file, path=f"steps[{index}].branch.if"),
                then=self.branch.then,
                otherwise=self.branch.otherwise,
            )
        step_id = self.id or f"wait_{index + 1}"
        if isinstance(self.wait, _Until):
            return WaitStep(id=step_id, until=self.wait.until)
        return WaitStep(id=step_id, duration=self.wait)


# --- sequences --------------------------------------------------------------------------------------


class ExitRule(DefinitionModel):
    event: str | None = None
    properties: dict[str, Any] = {}
    left_audience: bool = False


class _Trigger(DefinitionModel):
    audience: str | None = None
    event: str | None = None

    @field_validator("audience")
    @classmethod
    def _known(cls, value: str | None, info: ValidationInfo) -> str | None:
        audiences = (info.context or {}).get("audiences")
        if value is not None and audiences is not None and value not in audiences:
            raise ValueError(f"unknown audience {value!r}")
        return value

    @model_validator(mode="after")
    def _one(self) -> _Trigger:
        if (self.audience is None) == (self.event is None):
            raise ValueError("a trigger is either {audience: NAME} or {event: NAME}")
        return self


class _Sequence(DefinitionModel):
    """A sequence file as written."""

    name: SequenceName
    description: Text = ""
    trigger: _Trigger
    exit: ExitRule = ExitRule()
    reenter_after: PositiveDuration | None = None
    holdout: Percent = 0.0
    # false: a service journey (an order ready for pickup) that the global control group receives too
    global_control: bool = True
    steps: list[_Step]

    @field_validator("steps", mode="before")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError("a sequence needs a non-empty list of steps")
        return value


class SequenceDefinition(DefinitionModel):
    name: str
    description: str = ""
    file: str = ""
    trigger_audience: str | None = None
    trigger_event: str | None = None
    exit: ExitRule = ExitRule()
    reenter_after: timedelta | None = None
    holdout_percent: float = 0.0
    global_control: bool = True
    steps: tuple[Step, ...]

    def step_index(self, step_id: str) -> int:
        for index, step in enumerate(self.steps):
            if step.id == step_id:
                return index
        raise KeyError(step_id)


def parse_sequence(
    raw: Any, *, file: str = "<sequence>", audiences: Mapping[str, Any] | None = None
) -> SequenceDefinition:
    """One sequence from its parsed YAML. An audience trigger must name one of ``audiences`` (None: not
    checked); a branch names steps of the sequence; step ids are unique."""
    written = validate_definition(_Sequence, raw, file=file, context={"audiences": audiences})
    if written.exit.left_audience and written.trigger.audience is None:
        raise DefinitionError(file, "exit.left_audience", "left_audience needs an audience trigger")
    steps = tuple(step.build(index, file) for index, step in enumerate(written.steps))
    ids = [step.id for step in steps]
    for index, step in enumerate(steps):
        if ids.index(step.id) != index:
            raise DefinitionError(file, f"steps[{index}].id", f"duplicate step id {step.id!r}")
        if isinstance(step, BranchStep):
            for key, target in (("then", step.then), ("else", step.otherwise)):
                if target is not None and target not in ids:
                    raise DefinitionError(file, f"steps[{index}].branch.{key}", f"unknown step id {target!r}")
    return SequenceDefinition(
        name=written.name,
        description=written.description,
        file=file,
        trigger_audience=written.trigger.audience,
        trigger_event=written.trigger.event,
        exit=written.exit,
        reenter_after=written.reenter_after,
        holdout_percent=written.holdout,
        global_control=written.global_control,
        steps=steps,
    )


# --- campaigns --------------------------------------------------------------------------------------


class Campaign(DefinitionModel):
    """A campaign file as written."""

    name: CampaignName
    description: Text = ""
    audience: str = Field(min_length=1)
    channel: MessageChannel
    template: str
    send_at: UtcTime | None = None
    fallback: MessageChannel | None = None

    @field_validator("template")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        channel = info.data.get("channel")
        return value if channel is None else template_of(channel, value)

    _other_channel = field_validator("fallback")(fallback_on_another_channel)


class CampaignDefinition(Campaign):
    file: str = ""


def parse_campaign(raw: Any, *, file: str = "<campaign>") -> CampaignDefinition:
    """One campaign from its parsed YAML."""
    return CampaignDefinition(**validate_definition(Campaign, raw, file=file).model_dump(), file=file)


# --- folders ----------------------------------------------------------------------------------------


def sequences_directory(directory: Path | None = None) -> Path:
    """``directory``, or the built-in sequences' folder."""
    return Path(__file__).parent if directory is None else Path(directory)


def campaigns_directory(directory: Path | None = None) -> Path:
    """``directory``, or ``campaigns`` in the working directory (campaigns belong to a project)."""
    return Path.cwd() / "campaigns" if directory is None else Path(directory)


def load_sequences(
    directory: Path | None = None, *, audiences: Mapping[str, Any] | None = None
) -> dict[str, SequenceDefinition]:
    """Every sequence in ``directory`` (default: the built-in ones). An audience trigger must name one of
    ``audiences`` (default: the built-in audiences). Raises DefinitionError."""
    known = load_audiences() if audiences is None else audiences
    return load_folder(
        sequences_directory(directory),
        lambda raw, file, _text: parse_sequence(raw, file=file, audiences=known),
        kind="sequence",
    )


@lru_cache(maxsize=8)
def step_labels(sequences_dir: Path | None, audiences_dir: Path | None) -> dict[str, tuple[str, ...]]:
    """sequence -> its steps as shown to people (``retarget (ads)``; a journey's ``step_index`` indexes
    it), read once per folder; empty when the definitions cannot be read (journeys then show step
    numbers only)."""
    try:
        definitions = load_sequences(sequences_dir, audiences=load_audiences(audiences_dir))
    except (DefinitionError, OSError):
        return {}
    return {
        name: tuple(
            f"{step.id} ({step.channel})" if getattr(step, "channel", None) else step.id
            for step in sequence.steps
        )
        for name, sequence in definitions.items()
    }


def step_label(steps: Mapping[str, tuple[str, ...]], sequence: str, index: int) -> str | None:
    """The label of step ``index`` of ``sequence`` in ``steps`` (:func:`step_labels`); None when the
    sequence or the step is not known (a definition changed or could not be read)."""
    labels = steps.get(sequence)
    return labels[index] if labels and 0 <= index < len(labels) else None


def load_campaigns(directory: Path | None = None) -> dict[str, CampaignDefinition]:
    """Every campaign in ``directory`` (default: ``./campaigns``; a missing folder holds none). Raises
    DefinitionError."""
    return load_folder(
        campaigns_directory(directory),
        lambda raw, file, _text: parse_campaign(raw, file=file),
        kind="campaign",
        missing_ok=True,
    )
