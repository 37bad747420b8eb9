"""The one channel model: every fact about a channel lives in its entry here.

Two vocabularies, kept apart on purpose:

- **Touchpoints** (:class:`Touchpoint`): where a customer did something — an event's ``channel``
  (web, app, a store's till, the call centre, chat, and the message channels they answered on).
- **Channels** (:class:`Channel`): what Omni sends on — email, SMS, push (messages to the customer),
  ads (a custom-audience sync) and webhook (a message to another system, a store's clienteling tool).

Each :class:`ChannelSpec` says whether the channel carries marketing consent and whether it needs an
opt-in, what makes a customer reachable on it, the event written on their timeline when something is
sent and the touchpoint it is recorded on, whether a send is a message or an audience sync, whether
an ambiguous send may be repeated, the parts of its templates and the limits of a rendered message.

Adding a channel: one entry in :data:`CHANNELS` (and the :class:`Channel` member), one connector
module, one registry line in ``connectors``, one contract-suite subclass, one fake server, one README row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Literal


class Touchpoint(StrEnum):
    """Where an event happened: the ``channel`` of an event."""

    WEB = "web"
    APP = "app"
    STORE = "store"
    CALL_CENTER = "call_center"
    CHAT = "chat"
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    SOCIAL = "social"


class Channel(StrEnum):
    """What Omni sends on."""

    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    ADS = "ads"
    WEBHOOK = "webhook"


# What a customer must have to be reached on a channel.
Address = Literal["email", "phone", "device_token", "email_or_phone", "none"]


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: Channel
    # "message": one message per customer; "audience": the customer is added to / removed from a list
    # the provider holds (no message, no quiet hours).
    delivery: Literal["message", "audience"]
    # Marketing to the customer: consent, quiet hours and the frequency cap apply. A webhook is an
    # operational message about the customer to another system: none of them applies.
    marketing: bool
    # Carries a consent of its own (the ``consents`` table's channel).
    consent: bool
    # Needs an explicit opt-in; otherwise allowed until the customer opts out.
    opt_in_required: bool
    address: Address
    # The event Omni writes on the customer's timeline when it sends, and the touchpoint it is recorded on.
    sent_event: str
    sent_touchpoint: Touchpoint
    # At least once: an ambiguous send (the provider may have processed it) may be repeated, because the
    # provider dedupes (audience membership is a set; webhook receivers dedupe on the delivery id). Every
    # other channel is at most once: an ambiguous send is recorded ``unknown`` and never resent.
    at_least_once: bool = False
    # Template parts, the ones a template must have, and the largest rendered output (all parts).
    template_parts: tuple[str, ...] = ()
    required_parts: tuple[str, ...] = ()
    output_limit: int | None = None
    # The most characters of one message body (SMS: 10 segments of a concatenated message).
    body_limit: int | None = None
    # What is missing when the customer has no address for the channel.
    no_address: str = ""


CHANNELS: Mapping[Channel, ChannelSpec] = MappingProxyType(
    {
        Channel.EMAIL: ChannelSpec(
            Channel.EMAIL,
            delivery="message",
            marketing=True,
            consent=True,
            opt_in_required=False,
            address="email",
            sent_event="Email Sent",
            sent_touchpoint=Touchpoint.EMAIL,
            template_parts=("subject", "html", "txt"),
            required_parts=("subject",),
            output_limit=1_000_000,
            no_address="no email address",
        ),
        Channel.SMS: ChannelSpec(
            Channel.SMS,
            delivery="message",
            marketing=True,
            consent=True,
            opt_in_required=True,
            address="phone",
            sent_event="SMS Sent",
            sent_touchpoint=Touchpoint.SMS,
            template_parts=("txt",),
            required_parts=("txt",),
            output_limit=10_000,
            body_limit=1600,
            no_address="no phone number",
        ),
        Channel.PUSH: ChannelSpec(
            Channel.PUSH,
            delivery="message",
            marketing=True,
            consent=True,
            opt_in_required=True,
            address="device_token",
            sent_event="Push Sent",
            sent_touchpoint=Touchpoint.PUSH,
            template_parts=("title", "body"),
            required_parts=("title", "body"),
            output_limit=4_000,
            no_address="no device token",
        ),
        Channel.ADS: ChannelSpec(
            Channel.ADS,
            delivery="audience",
            marketing=True,
            consent=True,
            opt_in_required=False,
            address="email_or_phone",
            sent_event="Audience Synced",
            sent_touchpoint=Touchpoint.SOCIAL,
            at_least_once=True,
            no_address="no email or phone to match",
        ),
        Channel.WEBHOOK: ChannelSpec(
            Channel.WEBHOOK,
            delivery="message",
            marketing=False,
            consent=False,
            opt_in_required=False,
            address="none",
            sent_event="Webhook Sent",
            sent_touchpoint=Touchpoint.WEB,
            at_least_once=True,
            template_parts=("json",),
            required_parts=("json",),
            output_limit=1_000_000,
        ),
    }
)


# By name: a Channel member hashes as its value, so both find their entry with one dict lookup (spec() is
# called several times per delivery in a tick).
_BY_NAME: dict[str, ChannelSpec] = {channel.value: facts for channel, facts in CHANNELS.items()}


def spec(channel: str | Channel) -> ChannelSpec:
    """The facts of ``channel``; KeyError naming the known channels when it is none of them."""
    try:
        facts = _BY_NAME.get(channel)  # type: ignore[call-overload]
    except TypeError:  # unhashable: not a channel name
        facts = None
    if facts is not None:
        return facts
    facts = _BY_NAME.get(str(getattr(channel, "value", channel)).strip().lower())
    if facts is None:
        raise KeyError(f"unknown channel {channel!r} (expected one of {', '.join(CHANNELS)})")
    return facts


def at_most_once(channel: str | Channel) -> bool:
    """Whether an ambiguous send on ``channel`` must never be repeated (any unknown channel: yes)."""
    try:
        return not spec(channel).at_least_once
    except KeyError:
        return True


# Derived views, for the places that need a list. Never write one of these by hand elsewhere.
SEND_CHANNELS: tuple[str, ...] = tuple(c.value for c in CHANNELS)
MESSAGE_CHANNELS: tuple[str, ...] = tuple(
    c.value for c, s in CHANNELS.items() if s.delivery == "message" and s.marketing
)
CONSENT_CHANNELS: tuple[str, ...] = tuple(c.value for c, s in CHANNELS.items() if s.consent)
OPT_IN_CHANNELS: tuple[str, ...] = tuple(c.value for c, s in CHANNELS.items() if s.opt_in_required)
TEMPLATE_CHANNELS: tuple[str, ...] = tuple(c.value for c, s in CHANNELS.items() if s.template_parts)
TOUCHPOINTS: tuple[str, ...] = tuple(t.value for t in Touchpoint)
SENT_EVENTS: Mapping[str, str] = MappingProxyType({c.value: s.sent_event for c, s in CHANNELS.items()})
SENT_TOUCHPOINTS: Mapping[str, str] = MappingProxyType(
    {c.value: s.sent_touchpoint.value for c, s in CHANNELS.items()}
)

# How people read each touchpoint (the customer page of `omni serve`, the reports).
TOUCHPOINT_LABELS: Mapping[str, str] = MappingProxyType(
    {
        Touchpoint.WEB.value: "Web",
        Touchpoint.APP.value: "App",
        Touchpoint.STORE.value: "Store",
        Touchpoint.CALL_CENTER.value: "Call centre",
        Touchpoint.CHAT.value: "Chat",
        Touchpoint.EMAIL.value: "Email",
        Touchpoint.SMS.value: "SMS",
        Touchpoint.PUSH.value: "Push",
        Touchpoint.SOCIAL.value: "Social",
    }
)
# Events Omni itself writes on a customer's timeline, none of them a touchpoint of the customer's: what it
# sent them (each channel's sent_event, on its sent_touchpoint) and staff looking them up through the
# profile API or the customer page of `omni serve` (PROFILE_VIEWED, on OMNI_CHANNEL, which is no
# touchpoint).
PROFILE_VIEWED = "Profile Viewed"
OMNI_CHANNEL = "omni"
OMNI_EVENTS: tuple[str, ...] = (*SENT_EVENTS.values(), PROFILE_VIEWED)
