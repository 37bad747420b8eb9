"""The rules every marketing message obeys, whichever sequence or campaign sends it.

- **Consent and reachability** (:func:`reachable`): email needs an address and no opt-out; SMS a phone
  and an opt-in; push a device token and an opt-in; ads an email or phone and no ads opt-out.
- **Quiet hours** in the customer's timezone (default 21:00-09:00): a message that falls inside is
  postponed to the end of the quiet period. Ad-audience syncs are not messages and are not held.
- **Frequency cap** across all channels (default 2 marketing messages per customer per rolling 24 h):
  a message over the cap is postponed until the oldest one in the window leaves it.
- **Holdout**: a deterministic bucket of (customer, sequence), identical in SQL on SQLite and
  PostgreSQL and in Python, so a held-out customer is held out on every run.
- A customer's **timezone**: ``traits.timezone``, else the latest ``context.timezone``, else the home
  store's, else ``OMNI_DEFAULT_TIMEZONE``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, func, literal, select
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from profiles.consent import is_allowed
from profiles.models import Customer, Store

MESSAGE_CHANNELS = ("email", "sms", "push")
# Deliveries that count against the cap: sent, and those that may have gone out.
COUNTED_STATUSES = ("sent", "sending", "unknown")
HOLDOUT_MODULUS = 10_000
_PRIME = 1_000_003


@dataclass(frozen=True)
class DeliveryPolicy:
    quiet_start: time = time(21, 0)
    quiet_end: time = time(9, 0)
    frequency_cap: int = 2
    frequency_window: timedelta = timedelta(hours=24)
    # Retries on later ticks of what the provider could not take now: attempts in all, and the first wait
    # (doubling) when the provider gave none.
    max_attempts: int = 5
    retry_backoff: timedelta = timedelta(minutes=5)
    # A delivery left ``sending`` longer than this was interrupted (a crash): it becomes ``unknown``.
    sending_timeout: timedelta = timedelta(minutes=10)
    batch_size: int = 1000
    default_timezone: str = "UTC"

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides: Any) -> DeliveryPolicy:
        if settings is None:
            from omni.core.settings import get_settings

            settings = get_settings()
        values: dict[str, Any] = {
            "quiet_start": settings.quiet_hours_start,
            "quiet_end": settings.quiet_hours_end,
            "frequency_cap": settings.frequency_cap,
            "frequency_window": timedelta(hours=settings.frequency_window_hours),
            "batch_size": settings.sequence_batch_size,
            "max_attempts": settings.max_send_attempts,
            "default_timezone": settings.default_timezone,
        }
        values.update(overrides)
        return cls(**values)


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def quiet_until(now: datetime, timezone: str, policy: DeliveryPolicy) -> datetime | None:
    """When quiet hours end for a customer in ``timezone``, or None when ``now`` is not quiet there."""
    zone = ZoneInfo(timezone)
    local = now.astimezone(zone)
    if not in_quiet_hours(local.time().replace(tzinfo=None), policy.quiet_start, policy.quiet_end):
        return None
    end = datetime.combine(local.date(), policy.quiet_end, tzinfo=zone)
    if end <= local:
        end = datetime.combine(local.date() + timedelta(days=1), policy.quiet_end, tzinfo=zone)
    return end.astimezone(now.tzinfo)


def next_local_time(after: datetime, at: time, timezone: str) -> datetime:
    """The first moment after ``after`` when the customer's clock shows ``at``."""
    zone = ZoneInfo(timezone)
    local = after.astimezone(zone)
    candidate = datetime.combine(local.date(), at, tzinfo=zone)
    if candidate <= local:
        candidate = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=zone)
    return candidate.astimezone(after.tzinfo)


def _salt(sequence: str) -> int:
    return int(hashlib.sha256(sequence.encode()).hexdigest()[:8], 16) % _PRIME


def holdout_bucket(customer_id: int, sequence: str) -> int:
    """0..9999, the same as :func:`holdout_bucket_sql` computes in the database."""
    return ((customer_id % _PRIME) * 7919 + _salt(sequence)) % HOLDOUT_MODULUS


def holdout_bucket_sql(customer_id: Any, sequence: str) -> ColumnElement:
    # Integer arithmetic only, kept below 2^63, so both databases agree with the Python above.
    return ((customer_id % _PRIME) * 7919 + literal(_salt(sequence))) % HOLDOUT_MODULUS


def is_held_out(customer_id: int, sequence: str, percent: float) -> bool:
    return holdout_bucket(customer_id, sequence) < round(percent * HOLDOUT_MODULUS / 100)


def customer_timezones(session: Session, customer_ids: Iterable[int], default: str) -> dict[int, str]:
    customers = Customer.__table__
    stores = Store.__table__
    zones: dict[int, str] = {}
    for chunk in chunked(sorted(set(customer_ids))):
        rows = session.execute(
            select(
                customers.c.id,
                func.coalesce(customers.c.timezone, customers.c.context_timezone, stores.c.timezone),
            )
            .select_from(customers.outerjoin(stores, stores.c.id == customers.c.home_store_id))
            .where(customers.c.id.in_(chunk))
        )
        for customer_id, zone in rows:
            zones[customer_id] = zone or default
    return zones


@dataclass
class Contact:
    """What the dispatcher needs to know about one customer."""

    customer_id: int
    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    device_tokens: tuple[str, ...] = ()
    consents: dict[str, str] | None = None
    timezone: str = "UTC"
    merged_into: int | None = None

    def reachable(self, channel: str) -> tuple[bool, str]:
        """(reachable, reason when not)."""
        if channel == "webhook":
            # A message to another system about the customer (a store's system: "prepare this pickup
            # order"), not marketing to them: no address, consent, quiet hours or cap applies.
            return True, ""
        status = (self.consents or {}).get(channel)
        if channel == "email" and not self.email:
            return False, "no email address"
        if channel == "sms" and not self.phone:
            return False, "no phone number"
        if channel == "push" and not self.device_tokens:
            return False, "no device token"
        if channel == "ads" and not (self.email or self.phone):
            return False, "no email or phone to match"
        if not is_allowed(channel, status):
            return False, f"no {channel} consent ({status or 'never opted in'})"
        return True, ""


def load_contacts(session: Session, customer_ids: Iterable[int], default_timezone: str) -> dict[int, Contact]:
    """Contacts of ``customer_ids``: three queries per chunk of 1,000, whatever the batch size (written for
    the driver: SQLAlchemy's handling of 1,000-value ``IN`` lists cost more than the queries)."""
    from sequences.sql import Driver

    ids = sorted(set(customer_ids))
    sql = Driver(session)
    contacts: dict[int, Contact] = {}
    for chunk in chunked(ids):
        among, params = sql.in_(chunk)
        # The timezone as customer_timezones() reads it: their own, the latest seen, the home store's.
        for customer_id, email, phone, first_name, last_name, merged_into, zone in sql.rows(
            "SELECT c.id, c.email, c.phone, c.first_name, c.last_name, c.merged_into, "
            "COALESCE(c.timezone, c.context_timezone, s.timezone) "
            f"FROM customers AS c LEFT OUTER JOIN stores AS s ON s.id = c.home_store_id WHERE c.id {among}",
            params,
        ):
            contacts[customer_id] = Contact(
                customer_id,
                email,
                phone,
                first_name,
                last_name,
                consents={},
                timezone=zone or default_timezone,
                merged_into=merged_into,
            )
        tokens: dict[int, list[str]] = defaultdict(list)
        # The kind is checked here, not in SQL: with "kind = ..." SQLite would walk the (kind, value)
        # index through every device token in the store instead of looking up these customers.
        for customer_id, kind, token in sql.rows(
            f"SELECT customer_id, kind, value FROM identities WHERE customer_id {among} ORDER BY id DESC",
            params,
        ):
            if kind == "device_token":
                tokens[customer_id].append(token)
        for customer_id, found in tokens.items():
            if customer_id in contacts:
                contacts[customer_id].device_tokens = tuple(found)
        for customer_id, channel, status in sql.rows(
            f"SELECT customer_id, channel, status FROM consents WHERE customer_id {among}", params
        ):
            if customer_id in contacts:
                contacts[customer_id].consents[channel] = status  # type: ignore[index]
    return contacts


def recent_messages(
    session: Session, customer_ids: Iterable[int], *, now: datetime, window: timedelta
) -> dict[int, list[datetime]]:
    """Times of marketing messages (every channel but ads) per customer in the window before ``now``."""
    from sequences.sql import Driver

    sql = Driver(session)
    channels = ", ".join(f"'{channel}'" for channel in MESSAGE_CHANNELS)
    found: dict[int, list[datetime]] = defaultdict(list)
    for chunk in chunked(sorted(set(customer_ids))):
        among, params = sql.in_(chunk)
        # The status is checked here, not in SQL: with "status IN (...)" SQLite would walk the (status,
        # next attempt) index through every delivery ever sent instead of looking up these customers,
        # each batch of a tick slower than the one before.
        for customer_id, status, at in sql.rows(
            "SELECT customer_id, status, COALESCE(sent_at, updated_at) FROM deliveries "
            f"WHERE customer_id {among} AND marketing = {sql.true} AND channel IN ({channels}) "
            f"AND COALESCE(sent_at, updated_at) > {sql.mark}",
            [*params, sql.ts(now - window)],
        ):
            if status in COUNTED_STATUSES:
                found[customer_id].append(sql.read_ts(at))
    return found


def cap_until(times: list[datetime], *, now: datetime, policy: DeliveryPolicy) -> datetime | None:
    """When the customer is under the cap again, or None when they are under it now."""
    recent = sorted(t for t in times if t > now - policy.frequency_window)
    if len(recent) < policy.frequency_cap:
        return None
    # The cap frees up when enough of the oldest leave the window.
    return recent[len(recent) - policy.frequency_cap] + policy.frequency_window
