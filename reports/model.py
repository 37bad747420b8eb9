"""The report's model: what ``omni report`` prints, the JSON it writes and the HTML report draws.

Every class has ``to_dict()``, which gives the stable JSON shape documented in the README ("Reports"):
keys are only ever added, never renamed or removed; ``version`` says which shape a file has. Numbers
are plain JSON numbers (rates and intervals as fractions 0..1, money in the orders' currency units);
a figure that cannot be computed (no customers, an interval of an empty group) is ``null``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

REPORT_VERSION = 1

# Lift verdicts (``Lift.verdict``).
SIGNIFICANT = "significant"  # the 95 % interval of the difference excludes 0
NOT_SIGNIFICANT = "not significant"  # the interval contains 0
TOO_FEW = "too few to tell"  # a group smaller than the minimum control size (settings)
NO_DATA = "no data"  # nobody enrolled in the period

# Channel-count bands of retention and AOV (distinct touchpoint channels).
BANDS = ("1", "2", "3+")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass
class Interval:
    """A 95 % interval (``low``, ``high``); both null when it cannot be computed."""

    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


@dataclass
class Group:
    """One arm of a comparison: ``customers`` in it, how many ``converted`` (ordered within the window),
    their ``orders`` and ``revenue``; ``rate`` = converted / customers with its Wilson interval
    (``rate_low``, ``rate_high``); ``revenue_per_customer`` = revenue / customers."""

    customers: int = 0
    converted: int = 0
    orders: int = 0
    revenue: float = 0.0
    rate: float | None = None
    rate_low: float | None = None
    rate_high: float | None = None
    revenue_per_customer: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Lift:
    """Messaged against held out. ``absolute`` = rate(messaged) − rate(held out), with its 95 % interval
    (``low``, ``high``: Newcombe's hybrid score interval); ``relative`` = absolute / rate(held out) with
    the interval scaled the same way (``relative_low``, ``relative_high``; null when the held-out rate is
    0); ``p_value`` two-sided (pooled two-proportion z-test); ``verdict`` one of ``significant``,
    ``not significant``, ``too few to tell``, ``no data``. Incremental figures are for the messaged
    group: (rate difference) × messaged customers, likewise orders and revenue per customer."""

    absolute: float | None = None
    low: float | None = None
    high: float | None = None
    relative: float | None = None
    relative_low: float | None = None
    relative_high: float | None = None
    p_value: float | None = None
    verdict: str = NO_DATA
    incremental_conversions: float | None = None
    incremental_orders: float | None = None
    incremental_revenue: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JourneyLift:
    """Definition 1: one sequence's customers enrolled in the period, messaged vs held out."""

    sequence: str
    messaged: Group = field(default_factory=Group)
    held_out: Group = field(default_factory=Group)
    lift: Lift = field(default_factory=Lift)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "messaged": self.messaged.to_dict(),
            "held_out": self.held_out.to_dict(),
            "lift": self.lift.to_dict(),
        }

    def sentence(self) -> str:
        """The lift in one sentence, as a marketer reads it (the demo and the terminal use it)."""
        from reports.text import lift_sentence  # noqa: PLC0415 (text formatting lives beside the CLI tables)

        return lift_sentence(self)


@dataclass
class GlobalControlLift:
    """Definition 2: all of Omni's marketing against the global control group. ``enabled`` false (and the
    groups empty) when the control share is 0. ``messaged`` = customers outside the control group,
    ``held_out`` = the control group, same ``Group`` / ``Lift`` meaning as a journey."""

    enabled: bool = False
    share: float = 0.0
    salt: str | None = None
    messaged: Group = field(default_factory=Group)
    held_out: Group = field(default_factory=Group)
    lift: Lift = field(default_factory=Lift)

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "share": self.share,
            "salt": self.salt,
            "messaged": self.messaged.to_dict(),
            "held_out": self.held_out.to_dict(),
            "lift": self.lift.to_dict(),
        }


@dataclass
class FunnelStep:
    """Definition 3: one send step of a sequence on one channel. ``delivered``, ``opened``, ``clicked``
    are null when there is no provider feedback to count them from (see ``Funnel``)."""

    step: str
    channel: str
    reached: int = 0  # customers with a delivery for the step on the channel (any status)
    sent: int = 0  # ... whose delivery was sent
    delivered: int | None = None  # ... confirmed delivered by the provider (deliveries.delivered_at)
    opened: int | None = None  # ... who opened it (Email Opened with its delivery_id)
    clicked: int | None = None  # ... who clicked a link in it (Email Link Clicked with its delivery_id)
    converted: int = 0  # sent customers who ordered within the window after the send
    orders: int = 0
    revenue: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExitCount:
    """Customers whose enrollment of the period exited for ``reason``; ``rule`` is the exit rule as the
    engine recorded it (``enrollments.exit_reason``; for an exit on Order Completed the reason says how
    they bought)."""

    reason: str
    customers: int = 0
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Funnel:
    """One sequence's funnel: its steps in order of first use, and exits by reason."""

    sequence: str
    enrolled: int = 0  # enrollments in the period (messaged and held out)
    steps: list[FunnelStep] = field(default_factory=list)
    exits: list[ExitCount] = field(default_factory=list)
    feedback: bool = False  # provider feedback (delivered_at) exists in the store

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "enrolled": self.enrolled,
            "feedback": self.feedback,
            "steps": [s.to_dict() for s in self.steps],
            "exits": [e.to_dict() for e in self.exits],
        }


@dataclass
class RateRow:
    """A labelled count and share with its Wilson 95 % interval: ``customers`` (or tickets) in the row,
    ``converted`` of them (ordered / retained / resolved at first contact), ``rate``, ``low``, ``high``."""

    label: str
    customers: int = 0
    converted: int = 0
    rate: float | None = None
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OrdersRow:
    """Orders by a label (a placed-on channel, a message channel, a path kind)."""

    label: str
    customers: int = 0
    orders: int = 0
    revenue: float = 0.0
    aov: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MessageChannelRow:
    """Definition 4, message channels: ``messaged`` customers sent a message on the channel in the period;
    ``converted`` of them ordered within the window after one; orders in the period credited to the
    channel by last touch (the latest message within the window before the order) and by any touch
    (every channel with a message in that window)."""

    channel: str
    messaged: int = 0
    converted: int = 0
    rate: float | None = None
    low: float | None = None
    high: float | None = None
    last_touch_orders: int = 0
    last_touch_revenue: float = 0.0
    any_touch_orders: int = 0
    any_touch_revenue: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChannelConversion:
    """Definition 4: ``touchpoints`` (RateRow per touchpoint channel), ``placed`` (OrdersRow per channel
    an order was placed on), ``messages`` (MessageChannelRow per message channel), ``paths`` (OrdersRow
    ``single`` and ``cross``: orders whose path touched one channel, or two or more)."""

    touchpoints: list[RateRow] = field(default_factory=list)
    placed: list[OrdersRow] = field(default_factory=list)
    messages: list[MessageChannelRow] = field(default_factory=list)
    paths: list[OrdersRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "touchpoints": [r.to_dict() for r in self.touchpoints],
            "placed": [r.to_dict() for r in self.placed],
            "messages": [r.to_dict() for r in self.messages],
            "paths": [r.to_dict() for r in self.paths],
        }


@dataclass
class Retention:
    """Definition 5: customers who ordered in the previous period, by distinct touchpoint channels they
    used then (``bands``: RateRow labelled ``1``, ``2``, ``3+``; ``converted`` = ordered again in this
    period), and ``multichannel`` (2+) against ``single`` with the difference's Newcombe interval."""

    previous_since: datetime | None = None
    previous_until: datetime | None = None
    bands: list[RateRow] = field(default_factory=list)
    difference: float | None = None  # rate(2+) − rate(1)
    low: float | None = None
    high: float | None = None
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "previous_since": _iso(self.previous_since),
            "previous_until": _iso(self.previous_until),
            "bands": [b.to_dict() for b in self.bands],
            "difference": self.difference,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
        }


@dataclass
class AovBand:
    label: str  # "1", "2", "3+"
    customers: int = 0
    orders: int = 0
    revenue: float = 0.0
    aov: float | None = None
    sd: float | None = None  # sample standard deviation of the order totals

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AovGap:
    """AOV(``group``) − AOV(``baseline``) with its 95 % interval (Welch, normal approximation)."""

    group: str
    baseline: str
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Aov:
    """Definition 6: this period's orders by the customer's distinct touchpoint channels in the period."""

    bands: list[AovBand] = field(default_factory=list)
    gaps: list[AovGap] = field(default_factory=list)  # "2+" vs "1", "2" vs "1", "3+" vs "1"

    def to_dict(self) -> dict[str, Any]:
        return {"bands": [b.to_dict() for b in self.bands], "gaps": [g.to_dict() for g in self.gaps]}


@dataclass
class Fcr:
    """Definition 7: tickets resolved in the period. Each RateRow counts resolved tickets (``customers``)
    and those resolved at the first contact (``converted``). ``by_channel``: by the channel of the
    ticket's first contact; ``overall``; ``after_other_channel`` / ``no_recent_contact``: whether the
    first contact followed the customer's contact on another channel within the recent-contact window;
    ``with_context`` / ``without_context``: whether the profile was looked up through the profile API
    between the first contact and the resolution."""

    overall: RateRow = field(default_factory=lambda: RateRow("all"))
    by_channel: list[RateRow] = field(default_factory=list)
    after_other_channel: RateRow = field(default_factory=lambda: RateRow("after another channel"))
    no_recent_contact: RateRow = field(default_factory=lambda: RateRow("no recent contact"))
    with_context: RateRow = field(default_factory=lambda: RateRow("with context"))
    without_context: RateRow = field(default_factory=lambda: RateRow("without context"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.to_dict(),
            "by_channel": [r.to_dict() for r in self.by_channel],
            "after_other_channel": self.after_other_channel.to_dict(),
            "no_recent_contact": self.no_recent_contact.to_dict(),
            "with_context": self.with_context.to_dict(),
            "without_context": self.without_context.to_dict(),
        }


@dataclass
class Report:
    """The whole report at ``now`` for the period [``since``, ``until``) and the attribution window."""

    generated_at: datetime
    since: datetime
    until: datetime
    window_days: float
    min_control: int
    confidence: float = 0.95
    journeys: list[JourneyLift] = field(default_factory=list)
    global_control: GlobalControlLift = field(default_factory=GlobalControlLift)
    funnels: list[Funnel] = field(default_factory=list)
    channels: ChannelConversion = field(default_factory=ChannelConversion)
    retention: Retention = field(default_factory=Retention)
    aov: Aov = field(default_factory=Aov)
    fcr: Fcr = field(default_factory=Fcr)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why
    timings: dict[str, float] = field(default_factory=dict)  # seconds per metric (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "generated_at": _iso(self.generated_at),
            "since": _iso(self.since),
            "until": _iso(self.until),
            "window_days": self.window_days,
            "min_control": self.min_control,
            "confidence": self.confidence,
            "journeys": [j.to_dict() for j in self.journeys],
            "global_control": self.global_control.to_dict(),
            "funnels": [f.to_dict() for f in self.funnels],
            "channels": self.channels.to_dict(),
            "retention": self.retention.to_dict(),
            "aov": self.aov.to_dict(),
            "fcr": self.fcr.to_dict(),
            "notes": list(self.notes),
        }
