"""The global control group: a share of all customers who receive no marketing from any sequence or
campaign, so the report can measure what all of Omni's marketing together earns.

**The rule** (settings ``global_control_share``, a fraction, default 0 = off, and
``global_control_salt``): a customer is in the control group when the bucket of (salt, customer id) is
below ``share`` × 10,000. The bucket is a universal hash,
``((a · (id mod p) + b) mod p) mod 10,000`` with p = 2³¹ − 1 and a, b derived from the salt (SHA-256),
computed with integer arithmetic below 2⁶³, so SQLite, PostgreSQL and Python (:func:`control_bucket`)
agree exactly. The same salt keeps the same customers in the group on every run; a new salt draws a new,
independent group (rotation); a larger share keeps everyone already in and adds more.

**The record** (table ``global_control``, :class:`~profiles.models.GlobalControlMember`): who was in the
group, under which salt, from when until when. :func:`record_control` brings it up to date with the
rule (the tick and ``send_campaign`` call it before they enroll or send): new members enter, members
no longer in the group (another salt, a smaller share, merged into another customer, or the group
switched off) exit with ``exited_at``. The report reads the record, so changing the settings later does
not rewrite the past.

Sequences and campaigns apply the rule itself (:func:`in_control_sql`): a sequence enrolls a member as
held out with reason ``global_control`` (:data:`GLOBAL_CONTROL`), a campaign records the member's
delivery as ``skipped`` with that reason. A service journey (``global_control: false`` in its file, e.g.
an order ready for pickup) is not marketing and reaches everyone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, and_, exists, false, literal, or_, select, update
from sqlalchemy.orm import Session

from omni.core.settings import Settings
from profiles.bulk import dialect_insert
from profiles.models import Customer, GlobalControlMember

# Why a member of the global control group was held out of a journey or skipped by a campaign (the
# enrollment's exit_reason, the delivery's error).
GLOBAL_CONTROL = "global_control"
BUCKETS = 10_000
_P = 2_147_483_647  # 2^31 - 1, a prime: a · (id mod p) < 2^62


def _coefficients(salt: str) -> tuple[int, int]:
    digest = hashlib.sha256(f"omni-global-control:{salt}".encode()).digest()
    a = int.from_bytes(digest[:8], "big") % (_P - 1) + 1  # 1 .. p-1
    b = int.from_bytes(digest[8:16], "big") % _P
    return a, b


@dataclass(frozen=True)
class GlobalControl:
    """The rule: ``share`` of customers (0..1; 0 = off) chosen by ``salt``."""

    share: float = 0.0
    salt: str = ""

    @classmethod
    def of(cls, settings: Settings) -> GlobalControl:
        """From the settings (``global_control_share``, ``global_control_salt``)."""
        share = float(settings.global_control_share)
        return cls(share=share, salt=settings.global_control_salt)

    def __post_init__(self) -> None:
        if not 0 <= self.share < 1:
            raise ValueError(f"global control share {self.share}: a fraction from 0 (off) to below 1")

    @property
    def threshold(self) -> int:
        """Buckets below this are in the group."""
        return round(self.share * BUCKETS)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0


def control_bucket(customer_id: int, salt: str) -> int:
    """0..9999, the same as :func:`control_bucket_sql` computes in the database."""
    a, b = _coefficients(salt)
    return ((a * (customer_id % _P) + b) % _P) % BUCKETS


def control_bucket_sql(customer_id: Any, salt: str) -> ColumnElement:
    a, b = _coefficients(salt)
    p = literal(_P, BigInteger())
    return ((literal(a, BigInteger()) * (customer_id % p) + literal(b, BigInteger())) % p) % BUCKETS


def is_in_control(customer_id: int, control: GlobalControl) -> bool:
    return control.enabled and control_bucket(customer_id, control.salt) < control.threshold


def in_control_sql(customer_id: Any, control: GlobalControl | None) -> ColumnElement:
    """SQL: the customer is in the global control group (false when the group is off)."""
    if control is None or not control.enabled:
        return false()
    return control_bucket_sql(customer_id, control.salt) < control.threshold


def record_control(session: Session, control: GlobalControl, *, now: datetime) -> tuple[int, int]:
    """Bring the ``global_control`` record up to date with the rule at ``now``: returns (entered,
    exited). Two statements, set-based; cheap when nothing changed and the group is off."""
    members = GlobalControlMember.__table__
    customers = Customer.__table__
    open_row = members.c.exited_at.is_(None)
    merged = exists().where(customers.c.id == members.c.customer_id, customers.c.merged_into.is_not(None))
    if control.enabled:
        leaving = or_(members.c.salt != control.salt, ~in_control_sql(members.c.customer_id, control), merged)
    else:
        leaving = literal(True)
    exited = session.execute(
        update(members).where(open_row, leaving).values(exited_at=now).returning(members.c.id)
    ).all()
    if not control.enabled:
        return 0, len(exited)
    already = exists().where(members.c.customer_id == customers.c.id, members.c.exited_at.is_(None))
    chosen = select(
        customers.c.id,
        literal(control.salt),
        literal(control.share),
        literal(now, type_=members.c.entered_at.type),
    ).where(
        and_(customers.c.merged_into.is_(None), in_control_sql(customers.c.id, control), ~already),
    )
    entered = session.execute(
        dialect_insert(session, members)
        .from_select(["customer_id", "salt", "share", "entered_at"], chosen)
        .on_conflict_do_nothing()
        .returning(members.c.id)
    ).all()
    return len(entered), len(exited)


def control_members_sql(since: datetime, until: datetime) -> Any:
    """SQL: the customers in the global control group at any time in [since, until), one row each
    (``customer_id``), from the record."""
    members = GlobalControlMember.__table__
    return (
        select(members.c.customer_id)
        .where(members.c.entered_at < until, or_(members.c.exited_at.is_(None), members.c.exited_at > since))
        .distinct()
    )
