"""What a tick (or a campaign send) did, counted per send step, in the words a marketer reads."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sequences.deliveries import step_of


@dataclass
class StepCounts:
    """What one step (or campaign) did in a tick. Customers where a marketer reads customers: a customer
    whose primary channel fell back counts once, under the fallback's outcome. Attempts where attempts:
    ``postponed`` and ``retrying`` count deliveries put off in this tick. Ad-audience syncs are counted
    as what they are, adds and removals, never as messages sent."""

    sent: int = 0  # customers sent a message (email, SMS, push, webhook)
    added: int = 0  # customers added to an ad audience
    removed: int = 0  # customers removed from an ad audience (on exit)
    postponed: int = 0  # deliveries put off: quiet hours or the frequency cap
    fell_back: int = 0  # customers moved to the step's fallback channel
    skipped_consent: int = 0  # customers not reachable on any channel the step offers
    failed: int = 0  # customers the step could not reach (permanent failure, nothing left to try)
    retrying: int = 0  # deliveries to try again on a later tick (provider throttled or down)
    unknown: int = 0  # customers whose message may or may not have gone out; never resent

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# Column headers a person reads (the Prefect artifact, the CLI), in order, for each StepCounts field.
STEP_COLUMNS = {
    "sent": "Sent",
    "added": "Ad adds",
    "removed": "Ad removals",
    "fell_back": "Fell back",
    "skipped_consent": "Skipped (consent)",
    "failed": "Failed",
    "unknown": "Unknown",
    "postponed": "Postponed",
    "retrying": "Retrying",
}
ENTRY_COLUMNS = {"enrolled": "Enrolled", "held_out": "Held out", "exited": "Exited", "completed": "Completed"}


def without_empty_columns(rows: list[dict[str, Any]], keep: Collection[str] = ()) -> list[dict[str, Any]]:
    """``rows`` without the count columns that are zero (or blank) in every row, but those in ``keep``:
    what happened reads at a glance, on a 1,400-pixel screen and at 80 columns alike."""
    if not rows:
        return rows
    shown = [
        column
        for column in rows[0]
        if column in keep
        or not all(isinstance(row[column], int) for row in rows)
        or any(row[column] for row in rows)
    ]
    return [{column: row[column] for column in shown} for row in rows]


@dataclass
class SequenceReport:
    enrolled: int = 0
    held_out: int = 0
    exited: int = 0
    completed: int = 0
    exit_reasons: Counter = field(default_factory=Counter)
    # Send steps in the definition's order (run_tick lists them before anything is counted).
    steps: dict[str, StepCounts] = field(default_factory=lambda: defaultdict(StepCounts))

    def as_dict(self) -> dict[str, Any]:
        return {
            "enrolled": self.enrolled,
            "held_out": self.held_out,
            "exited": self.exited,
            "completed": self.completed,
            "exit_reasons": dict(self.exit_reasons),
            "steps": {step: counts.as_dict() for step, counts in self.steps.items()},
        }

    def total(self, name: str) -> int:
        return sum(getattr(counts, name) for counts in self.steps.values())


@dataclass
class TickReport:
    now: datetime
    audiences: dict[str, dict[str, int]] = field(default_factory=dict)
    sequences: dict[str, SequenceReport] = field(default_factory=lambda: defaultdict(SequenceReport))
    campaigns: dict[str, StepCounts] = field(default_factory=lambda: defaultdict(StepCounts))
    # (channel, customer_id, template or audience) of each message sent, for people (the demo)
    sent: list[tuple[str, int, str]] = field(default_factory=list)
    # channel -> why nothing more could be sent on it this tick (a revoked key, a provider down)
    halted: dict[str, str] = field(default_factory=dict)
    # rows written per table (at most), to refresh the planner's statistics when a tick changed a lot
    written: Counter = field(default_factory=Counter)

    def counts_for(self, *, campaign: str | None, sequence: str | None, step_id: str) -> StepCounts:
        """The counts of the campaign, or of the sequence's send step, a delivery belongs to."""
        if campaign:
            return self.campaigns[campaign]
        return self.sequences[sequence or ""].steps[step_of(step_id)]

    def rows(self) -> list[dict[str, Any]]:
        """One row per send step of each sequence, in the sequence's order, then one per campaign, with
        human column headers: what a marketer reads in the Prefect UI (``sequences-tick``)."""
        rows: list[dict[str, Any]] = []
        for name, sequence in self.sequences.items():
            for step, counts in sequence.steps.items():
                values = {label: getattr(counts, key) for key, label in STEP_COLUMNS.items()}
                rows.append({"Sequence": name, "Step": step, **values})
        for name, counts in self.campaigns.items():
            values = {label: getattr(counts, key) for key, label in STEP_COLUMNS.items()}
            rows.append({"Sequence": f"campaign {name}", "Step": "send", **values})
        return rows

    def journey_rows(self) -> list[dict[str, Any]]:
        """One row per sequence: customers who entered, were held out, left (and why) and finished."""
        return [
            {
                "Sequence": name,
                **{label: getattr(sequence, key) for key, label in ENTRY_COLUMNS.items()},
                "Exit reasons": ", ".join(f"{n} {why}" for why, n in sequence.exit_reasons.items()) or "",
            }
            for name, sequence in self.sequences.items()
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "audiences": self.audiences,
            "sequences": {name: report.as_dict() for name, report in self.sequences.items()},
            "campaigns": {name: counts.as_dict() for name, counts in self.campaigns.items()},
            "halted": dict(self.halted),
        }

    def shard_dict(self) -> dict[str, Any]:
        """What a shard of a tick hands back to the tick (JSON-safe, see :meth:`from_shard_dict`): the
        counts and the rows written, not the list of messages sent (100,000 tuples for a large tick)."""
        return {**self.as_dict(), "now": self.now.isoformat(), "written": dict(self.written)}

    @classmethod
    def from_shard_dict(cls, data: dict[str, Any]) -> TickReport:
        now = data["now"]
        report = cls(now=datetime.fromisoformat(now) if isinstance(now, str) else now)
        report.audiences = dict(data.get("audiences") or {})
        for name, values in (data.get("sequences") or {}).items():
            sequence = report.sequences[name]
            for key in ENTRY_COLUMNS:
                setattr(sequence, key, values.get(key, 0))
            sequence.exit_reasons.update(values.get("exit_reasons") or {})
            for step, counts in (values.get("steps") or {}).items():
                sequence.steps[step] = StepCounts(**counts)
        for name, counts in (data.get("campaigns") or {}).items():
            report.campaigns[name] = StepCounts(**counts)
        report.halted.update(data.get("halted") or {})
        report.written.update(data.get("written") or {})
        return report

    def merge(self, other: TickReport) -> None:
        """Add what ``other`` (a shard of this tick) did to this report. The sequences and steps this report
        lists keep their order; the audiences are the tick's own (built once, before the shards)."""
        for name, theirs in other.sequences.items():
            ours = self.sequences[name]
            for key in ENTRY_COLUMNS:
                setattr(ours, key, getattr(ours, key) + getattr(theirs, key))
            ours.exit_reasons.update(theirs.exit_reasons)
            for step, counts in theirs.steps.items():
                _add_counts(ours.steps[step], counts)
        for name, counts in other.campaigns.items():
            _add_counts(self.campaigns[name], counts)
        self.sent.extend(other.sent)
        for channel, reason in other.halted.items():
            self.halted.setdefault(channel, reason)
        self.written.update(other.written)


def _add_counts(into: StepCounts, counts: StepCounts) -> None:
    for key, value in counts.as_dict().items():
        setattr(into, key, getattr(into, key) + value)


class DeliveryHalted(RuntimeError):
    """A channel could not send at all this tick (a revoked key, a provider down after retries): its
    deliveries were left due, nothing was marked sent, and the tick (the Prefect task and flow, the CLI)
    ends failed with the reason. ``report`` holds what the rest of the tick did."""

    def __init__(self, report: TickReport) -> None:
        self.report = report
        self.created = 0  # a campaign's new deliveries (send_campaign sets it)
        reasons = "; ".join(f"{channel}: {reason}" for channel, reason in sorted(report.halted.items()))
        super().__init__(
            f"nothing could be sent on {', '.join(sorted(report.halted))} ({reasons}); "
            "those deliveries stay due and go out once the cause is fixed"
        )


class ShardsFailed(RuntimeError):
    """Some shards of a sharded tick failed (a worker died, a database error): the other shards went on
    and ``report`` holds what they and the tick's own stages did. What the failed shards left due goes out
    on the next tick; deliveries they left ``sending`` are recovered then (never resent on an at-most-once
    channel)."""

    def __init__(self, report: TickReport, failures: dict[str, BaseException]) -> None:
        self.report = report
        self.failures = failures  # shard ("shard 2/4") -> what went wrong
        count = len(failures)
        reasons = "; ".join(f"{shard}: {exc}" for shard, exc in failures.items())
        super().__init__(
            f"{count} shard{'s' if count != 1 else ''} of the tick failed ({reasons}); what they left due "
            "goes out on the next tick"
        )
