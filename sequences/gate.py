"""The delivery gate: whether a due delivery may go out now, whichever sequence or campaign it belongs to.

- **Consent and reachability**: the one rule of :mod:`profiles.consent`: the address the channel sends
  to (:func:`~profiles.consent.has_address_sql`, read per batch), not suppressed (a hard bounce,
  :func:`~profiles.consent.suppressed_sql`), and the customer's recorded consent
  (:func:`~profiles.consent.unreachable_reason`). A webhook (operational, to another system) needs
  neither.
- **Quiet hours** in the customer's timezone (the one rule of :mod:`profiles.timezones`; default
  21:00-09:00): a marketing message (``MESSAGE_CHANNELS``) that falls inside is postponed to the end of
  the quiet period. Ad-audience syncs and webhooks are not messages to the customer and are not held.
- **Frequency cap** across all channels (default 2 marketing messages per customer per rolling 24 h):
  a message over the cap is postponed until the oldest one in the window leaves it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import MESSAGE_CHANNELS
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus
from profiles.consent import has_address_sql, suppressed_sql, unreachable_reason
from profiles.models import Customer, Store
from profiles.timezones import customer_timezone_sql, with_home_store, zone
from sequences.sql import Driver


@dataclass(frozen=True)
class DeliveryPolicy:
    """The rules of a tick, from the settings (:meth:`from_settings`)."""

    quiet_start: time = time(21, 0)
    quiet_end: time = time(9, 0)
    frequency_cap: int = 2
    frequency_window: timedelta = timedelta(hours=24)
    # Delivery attempts across ticks of what the provider could not take now, and the first wait
    # (doubling) when the provider gave none. (The tries within one send are connectors.RetryPolicy's.)
    delivery_attempts: int = 5
    retry_backoff: timedelta = timedelta(minutes=5)
    # A delivery left ``sending`` longer than this was interrupted (a crash): it becomes ``unknown``.
    sending_timeout: timedelta = timedelta(minutes=10)
    batch_size: int = 1000
    default_timezone: str = "UTC"

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> DeliveryPolicy:
        values: dict[str, Any] = {
            "quiet_start": settings.quiet_hours_start,
            "quiet_end": settings.quiet_hours_end,
            "frequency_cap": settings.frequency_cap,
            "frequency_window": timedelta(hours=settings.frequency_window_hours),
            "batch_size": settings.sequence_batch_size,
            "delivery_attempts": settings.delivery_attempts,
            "default_timezone": settings.default_timezone,
        }
        values.update(overrides)
        return cls(**values)


# --- quiet hours and the frequency cap ------------------------------------------------------------------


def in_quiet_hours(local: time, start: time, end: time) -> bool:
    if start == end:
        return False
    if start < end:
        return start <= local < end
    return local >= start or local < end


def quiet_until(now: datetime, customer_zone: ZoneInfo, policy: DeliveryPolicy) -> datetime | None:
    """When quiet hours end for a customer in ``customer_zone``, or None when ``now`` is not quiet there."""
    local = now.astimezone(customer_zone)
    if not in_quiet_hours(local.time().replace(tzinfo=None), policy.quiet_start, policy.quiet_end):
        return None
    end = datetime.combine(local.date(), policy.quiet_end, tzinfo=customer_zone)
    if end <= local:
        end = datetime.combine(local.date() + timedelta(days=1), policy.quiet_end, tzinfo=customer_zone)
    return end.astimezone(now.tzinfo)


def recent_messages(
    session: Session, customer_ids: Iterable[int], *, now: datetime, window: timedelta
) -> dict[int, list[datetime]]:
    """Times of marketing messages (``MESSAGE_CHANNELS``) per customer in the window before ``now``."""
    sql = Driver(session)
    channels = ", ".join(f"'{channel}'" for channel in MESSAGE_CHANNELS)
    counted = DeliveryStatus.counted()
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
            if status in counted:
                found[customer_id].append(sql.read_ts(at))
    return found


def cap_until(times: list[datetime], *, now: datetime, policy: DeliveryPolicy) -> datetime | None:
    """When the customer is under the cap again, or None when they are under it now."""
    recent = sorted(t for t in times if t > now - policy.frequency_window)
    if len(recent) < policy.frequency_cap:
        return None
    # The cap frees up when enough of the oldest leave the window.
    return recent[len(recent) - policy.frequency_cap] + policy.frequency_window


# --- contacts: what the gate and an ad-audience sync need to know about a customer ---------------------


@dataclass
class Contact:
    customer_id: int
    email: str | None
    phone: str | None
    first_name: str | None
    last_name: str | None
    zone: ZoneInfo
    # channel -> whether the customer has the address it sends to (for the channels of the batch)
    addresses: dict[str, bool]
    # channel -> whether that address is suppressed (a hard bounce)
    suppressed: dict[str, bool] = field(default_factory=dict)
    # channel -> recorded consent status (absent: never asked)
    consents: dict[str, str] = field(default_factory=dict)

    def unreachable(self, channel: str) -> str | None:
        """Why the customer cannot be sent ``channel`` now (None: they can)."""
        return unreachable_reason(
            channel,
            has_address=self.addresses[channel],
            consent_status=self.consents.get(channel),
            suppressed=self.suppressed[channel],
        )


@lru_cache(maxsize=64)
def _contacts_sql(pg: bool, channels: tuple[str, ...]) -> str:
    """The contacts query of :func:`load_contacts` (without its WHERE), compiled once per database and
    set of channels."""
    customers, home_stores = Customer.__table__, Store.__table__
    query = select(
        customers.c.id,
        customers.c.email,
        customers.c.phone,
        customers.c.first_name,
        customers.c.last_name,
        customer_timezone_sql(customers, home_stores),
        *(has_address_sql(channel, customers, per_customer=True) for channel in channels),
        *(suppressed_sql(channel, customers) for channel in channels),
    ).select_from(with_home_store(customers, home_stores))
    dialect = postgresql.dialect() if pg else sqlite.dialect()
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def load_contacts(
    session: Session, customer_ids: Iterable[int], channels: Collection[str], default_timezone: str
) -> dict[int, Contact]:
    """Contacts of ``customer_ids``, with their addresses on ``channels``: two queries per chunk of 1,000,
    whatever the batch size (written for the driver: SQLAlchemy's handling of 1,000-value ``IN`` lists
    cost more than the queries)."""
    ids = sorted(set(customer_ids))
    channels = tuple(sorted(set(channels)))
    sql = Driver(session)
    query = _contacts_sql(sql.pg, channels)
    contacts: dict[int, Contact] = {}
    for chunk in chunked(ids):
        among, params = sql.in_(chunk)
        for customer_id, email, phone, first_name, last_name, timezone, *flags in sql.rows(
            f"{query} WHERE customers.id {among}", params
        ):
            addresses, suppressed = flags[: len(channels)], flags[len(channels) :]
            contacts[customer_id] = Contact(
                customer_id,
                email,
                phone,
                first_name,
                last_name,
                zone(timezone, default_timezone),
                dict(zip(channels, map(bool, addresses), strict=True)),
                dict(zip(channels, map(bool, suppressed), strict=True)),
            )
        for customer_id, channel, status in sql.rows(
            f"SELECT customer_id, channel, status FROM consents WHERE customer_id {among}", params
        ):
            if customer_id in contacts:
                contacts[customer_id].consents[channel] = status
    return contacts


# --- the gate of one batch ----------------------------------------------------------------------------


@dataclass
class Gate:
    """The gate for one batch of deliveries: what it read about their customers, and the messages it let
    through so far (they count against the cap for the rest of the batch)."""

    now: datetime
    policy: DeliveryPolicy
    contacts: dict[int, Contact]
    recent: dict[int, list[datetime]]
    # by timezone: the end of quiet hours there (None: not quiet), the same for every customer in it
    quiet: dict[ZoneInfo, datetime | None] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        session: Session,
        customer_ids: Collection[int],
        channels: Collection[str],
        *,
        now: datetime,
        policy: DeliveryPolicy,
    ) -> Gate:
        contacts = load_contacts(session, customer_ids, channels, policy.default_timezone)
        recent = recent_messages(session, customer_ids, now=now, window=policy.frequency_window)
        return cls(now, policy, contacts, recent)

    def unreachable(self, customer_id: int, channel: str) -> str | None:
        """Why the customer cannot be sent ``channel`` (None: they can)."""
        contact = self.contacts.get(customer_id)
        if contact is None:
            return "no such customer"
        return contact.unreachable(channel)

    def hold(self, customer_id: int, channel: str) -> tuple[datetime, str] | None:
        """Until when a delivery on ``channel`` must wait, and why (quiet hours, the frequency cap); None
        when it may go now: then a marketing message counts against the customer's cap from now on."""
        if channel not in MESSAGE_CHANNELS:
            return None
        customer_zone = self.contacts[customer_id].zone
        if customer_zone not in self.quiet:
            self.quiet[customer_zone] = quiet_until(self.now, customer_zone, self.policy)
        later = self.quiet[customer_zone]
        capped = cap_until(self.recent[customer_id], now=self.now, policy=self.policy)
        if later or capped:
            return max(t for t in (later, capped) if t), "quiet hours" if later else "frequency cap"
        self.recent[customer_id].append(self.now)
        return None
