"""Statuses stored in the profile store: deliveries, enrollments, consents. The database holds their
values; code names them through these enums, never as string literals."""

from __future__ import annotations

from enum import StrEnum


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # claimed by a tick, the provider may be processing it
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # not sent on purpose: no consent, no address, the journey ended
    # The provider may have processed it (an ambiguous answer on an at-most-once channel): never resent.
    UNKNOWN = "unknown"

    @classmethod
    def final(cls) -> tuple[str, ...]:
        return (cls.SENT.value, cls.FAILED.value, cls.SKIPPED.value, cls.UNKNOWN.value)

    @classmethod
    def counted(cls) -> tuple[str, ...]:
        """The statuses that count against the frequency cap: the customer may have got the message."""
        return (cls.SENT.value, cls.SENDING.value, cls.UNKNOWN.value)


class EnrollmentStatus(StrEnum):
    ACTIVE = "active"
    HOLDOUT = "holdout"  # enrolled in the control group: walks the journey, is sent nothing
    COMPLETED = "completed"
    EXITED = "exited"

    @classmethod
    def open(cls) -> tuple[str, ...]:
        return (cls.ACTIVE.value, cls.HOLDOUT.value)


class ConsentStatus(StrEnum):
    OPTED_IN = "opted_in"
    OPTED_OUT = "opted_out"
