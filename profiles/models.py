"""The tables of the profile store (SQLModel).

The schema itself is owned by the Alembic migrations in ``profiles/migrations``; a test checks that
these models and the migrated database agree, so a change here needs a migration beside it.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    or_,
    text,
)
from sqlmodel import Field, SQLModel

from omni.core.channels import OMNI_EVENTS, TOUCHPOINTS
from omni.core.statuses import EnrollmentStatus
from profiles.db import JSONType, UTCDateTime

# 64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def is_touchpoint(event_name: Any, channel: Any = None) -> Any:
    """SQL: the event is one of the customer's own touchpoints, not one Omni wrote about them: a message
    it sent them, or staff looking them up (``omni.core.channels.OMNI_EVENTS``), and, given the event's
    ``channel``, on a touchpoint channel (``TOUCHPOINTS``; not ``omni``, where Omni records an operator's
    decisions). Those show on the timeline, but the ``channels_used`` condition, the profile's channels
    and the reports read the customer's channels only."""
    own = or_(event_name.is_(None), event_name.not_in(list(OMNI_EVENTS)))
    return own if channel is None else and_(own, channel.in_(TOUCHPOINTS))


class IdentityKind(StrEnum):
    USER_ID = "user_id"
    ANONYMOUS_ID = "anonymous_id"
    EMAIL = "email"
    PHONE = "phone"
    DEVICE_TOKEN = "device_token"
    LOYALTY_ID = "loyalty_id"


def _id_column() -> Any:
    return Field(default=None, sa_column=Column(BigIntId, primary_key=True, autoincrement=True))


def _customer_fk(*, nullable: bool = False, index: bool = True) -> Any:
    return Field(
        default=None,
        sa_column=Column(BigIntId, ForeignKey("customers.id"), nullable=nullable, index=index),
    )


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


def _json(default: Any) -> Any:
    return Field(default_factory=default, sa_column=Column(JSONType, nullable=False))


class Customer(SQLModel, table=True):
    __tablename__ = "customers"

    id: int | None = _id_column()
    email: str | None = Field(default=None, sa_column=Column(String(320), index=True))
    phone: str | None = Field(default=None, sa_column=Column(String(32), index=True))
    first_name: str | None = Field(default=None, sa_column=Column(String(200)))
    last_name: str | None = Field(default=None, sa_column=Column(String(200)))
    locale: str | None = Field(default=None, sa_column=Column(String(35)))
    # Explicit ``traits.timezone``; ``context_timezone`` is the latest ``context.timezone`` seen.
    timezone: str | None = Field(default=None, sa_column=Column(String(64)))
    context_timezone: str | None = Field(default=None, sa_column=Column(String(64)))
    context_timezone_at: datetime | None = _ts()
    home_store_id: str | None = Field(default=None, sa_column=Column(String(100), index=True))
    traits: dict = _json(dict)
    # Time of the newest identify applied: an older identify only fills traits that are missing,
    # so the profile does not depend on the order events arrive in.
    traits_at: datetime | None = _ts()
    created_at: datetime | None = _ts(nullable=False)
    updated_at: datetime | None = _ts(nullable=False)
    merged_into: int | None = Field(
        default=None, sa_column=Column(BigIntId, ForeignKey("customers.id"), nullable=True, index=True)
    )


class Identity(SQLModel, table=True):
    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("kind", "value", name="uq_identities_kind_value"),)

    id: int | None = _id_column()
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    value: str = Field(sa_column=Column(String(512), nullable=False))
    customer_id: int | None = _customer_fk()
    created_at: datetime | None = _ts(nullable=False)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_customer_name_occurred", "customer_id", "name", "occurred_at"),
        Index("ix_events_name_occurred", "name", "occurred_at"),
    )

    id: int | None = _id_column()
    message_id: str = Field(sa_column=Column(String(255), nullable=False, unique=True))
    customer_id: int | None = Field(
        default=None, sa_column=Column(BigIntId, ForeignKey("customers.id"), nullable=False)
    )
    type: str = Field(sa_column=Column(String(16), nullable=False))
    # track: the event name; page / screen: the page name; identify / alias / group: null.
    name: str | None = Field(default=None, sa_column=Column(String(255)))
    channel: str = Field(sa_column=Column(String(32), nullable=False))
    # track / page / screen: properties; identify / group: traits; alias: {"previousId": ...}.
    properties: dict = _json(dict)
    context: dict = _json(dict)
    user_id: str | None = Field(default=None, sa_column=Column(String(512)))
    anonymous_id: str | None = Field(default=None, sa_column=Column(String(512)))
    occurred_at: datetime | None = _ts(nullable=False)
    received_at: datetime | None = _ts(nullable=False)


class Consent(SQLModel, table=True):
    __tablename__ = "consents"
    __table_args__ = (UniqueConstraint("customer_id", "channel", name="uq_consents_customer_channel"),)

    id: int | None = _id_column()
    customer_id: int | None = _customer_fk(index=False)
    channel: str = Field(sa_column=Column(String(16), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    source: str = Field(sa_column=Column(String(200), nullable=False))
    updated_at: datetime | None = _ts(nullable=False)


class Store(SQLModel, table=True):
    __tablename__ = "stores"

    id: str = Field(sa_column=Column(String(100), primary_key=True))
    name: str = Field(sa_column=Column(String(200), nullable=False))
    address: str | None = Field(default=None, sa_column=Column(String(500)))
    city: str | None = Field(default=None, sa_column=Column(String(200)))
    region: str | None = Field(default=None, sa_column=Column(String(200)))
    postal_code: str | None = Field(default=None, sa_column=Column(String(32)))
    country: str | None = Field(default=None, sa_column=Column(String(2)))
    phone: str | None = Field(default=None, sa_column=Column(String(32)))
    email: str | None = Field(default=None, sa_column=Column(String(320)))
    timezone: str | None = Field(default=None, sa_column=Column(String(64)))
    # {"mon": "09:00-20:00", ...}
    hours: dict = _json(dict)
    latitude: float | None = Field(default=None, sa_column=Column(Float))
    longitude: float | None = Field(default=None, sa_column=Column(Float))
    created_at: datetime | None = _ts(nullable=False)
    updated_at: datetime | None = _ts(nullable=False)


class CartStatus(StrEnum):
    OPEN = "open"
    CONVERTED = "converted"


class Cart(SQLModel, table=True):
    """A cart derived from Product Added / Product Removed events (see ``profiles.commerce``)."""

    __tablename__ = "carts"
    __table_args__ = (Index("ix_carts_status_updated", "status", "updated_at"),)

    id: int | None = _id_column()
    customer_id: int | None = _customer_fk()
    status: str = Field(sa_column=Column(String(16), nullable=False))
    cart_id: str | None = Field(default=None, sa_column=Column(String(255)))
    # [{"product_id", "sku", "name", "price", "quantity"}], only lines with quantity > 0
    items: list = _json(list)
    item_count: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    value: float = Field(default=0.0, sa_column=Column(Float, nullable=False))
    currency: str | None = Field(default=None, sa_column=Column(String(3)))
    started_at: datetime | None = _ts(nullable=False)
    # Last activity: the latest add / remove.
    updated_at: datetime | None = _ts(nullable=False)
    converted_at: datetime | None = _ts()
    order_id: str | None = Field(default=None, sa_column=Column(String(255)))
    # The open cart's every line, [[key, line], ...] in first-seen order, including lines removed down
    # to zero, which items leaves out: what ingest needs to carry the cart forward from this row alone
    # (profiles.commerce). Null on converted carts.
    lines: list | None = Field(default=None, sa_column=Column(JSONType, nullable=True))


class OrderStatus(StrEnum):
    PLACED = "placed"
    READY_FOR_PICKUP = "ready_for_pickup"
    PICKED_UP = "picked_up"


class Fulfillment(StrEnum):
    SHIP = "ship"
    PICKUP = "pickup"
    IN_STORE = "in_store"


class Order(SQLModel, table=True):
    """An order derived from Order Completed (any channel) and Order Updated events."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_status_fulfillment", "status", "fulfillment"),)

    order_id: str = Field(sa_column=Column(String(255), primary_key=True))
    customer_id: int | None = _customer_fk()
    channel: str = Field(sa_column=Column(String(32), nullable=False))
    total: float = Field(default=0.0, sa_column=Column(Float, nullable=False))
    currency: str | None = Field(default=None, sa_column=Column(String(3)))
    fulfillment: str = Field(sa_column=Column(String(16), nullable=False))
    store_id: str | None = Field(default=None, sa_column=Column(String(100)))
    status: str = Field(sa_column=Column(String(32), nullable=False))
    items: list = _json(list)
    placed_at: datetime | None = _ts(nullable=False)
    ready_at: datetime | None = _ts()
    picked_up_at: datetime | None = _ts()
    updated_at: datetime | None = _ts(nullable=False)


class RejectedEvent(SQLModel, table=True):
    """Input that could not be stored, kept verbatim with the reason, so a person can fix and replay it."""

    __tablename__ = "rejected_events"
    # One row per (source, raw text): running the same input again stores no rejection twice
    # (migration 0007). Null on rows that duplicated an earlier one before that.
    __table_args__ = (Index("uq_rejected_events_raw_hash", "raw_hash", unique=True),)

    id: int | None = _id_column()
    source: str = Field(sa_column=Column(String(1000), nullable=False))
    raw: str = Field(sa_column=Column(Text, nullable=False))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    received_at: datetime | None = _ts(nullable=False, index=True)
    # sha256 (hex) of source, a line feed and raw (profiles.ingest.rejection_hash)
    raw_hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class OutboxMessage(SQLModel, table=True):
    """What the default ``outbox`` connector "sent": the message exactly as it would have gone out."""

    __tablename__ = "outbox"

    id: int | None = _id_column()
    delivery_id: str = Field(sa_column=Column(String(255), nullable=False, unique=True))
    channel: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    customer_id: int | None = Field(default=None, sa_column=Column(BigIntId, nullable=True, index=True))
    recipient: str | None = Field(default=None, sa_column=Column(String(1000)))
    template: str | None = Field(default=None, sa_column=Column(String(255)))
    subject: str | None = Field(default=None, sa_column=Column(Text))
    body: str | None = Field(default=None, sa_column=Column(Text))
    payload: dict = _json(dict)
    sent_at: datetime | None = _ts(nullable=False, index=True)


class AudienceMembership(SQLModel, table=True):
    """One stay of a customer in an audience; a customer who leaves and comes back gets a new row.

    Derived data, written in bulk by audience builds from ids read in ``customers`` (whose rows are
    never deleted: a merged customer keeps its row). So ``customer_id`` has no foreign key, whose check
    (one row lock in ``customers`` per member written) was most of a first build's cost on PostgreSQL,
    and no index of its own: every lookup names the audience (migration 0003).

    No surrogate key either (migration 0005): nothing looks a stay up by its own id, and on PostgreSQL
    numbering each row (``nextval``) and indexing that number cost more than the row itself. The table
    has no primary key; its one index is the one-open-row index below. A row is known by (audience,
    customer_id, entered_at), which is the ORM's identity for it (``__mapper_args__``; no constraint in
    the database: a stay that opens and closes within builds at one ``now`` may share it). On
    PostgreSQL the table's replica identity is FULL, so that logical replication of its updates
    (``exited_at``) keeps working without a key.
    """

    __tablename__ = "audience_memberships"
    __table_args__ = (
        # One open row per customer and audience; also the index for every "current members" lookup
        # (audience = ? AND exited_at IS NULL).
        Index(
            "uq_audience_memberships_open",
            "audience",
            "customer_id",
            unique=True,
            sqlite_where=text("exited_at IS NULL"),
            postgresql_where=text("exited_at IS NULL"),
        ),
    )
    __mapper_args__ = {"primary_key": ["audience", "customer_id", "entered_at"]}

    audience: str = Field(sa_column=Column(String(200), nullable=False))
    customer_id: int | None = Field(default=None, sa_column=Column(BigIntId, nullable=False))
    entered_at: datetime | None = _ts(nullable=False)
    exited_at: datetime | None = _ts()


class AudienceBuild(SQLModel, table=True):
    __tablename__ = "audience_builds"
    __table_args__ = (Index("ix_audience_builds_audience_built", "audience", "built_at"),)

    id: int | None = _id_column()
    audience: str = Field(sa_column=Column(String(200), nullable=False))
    built_at: datetime | None = _ts(nullable=False)
    size: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    entered: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    exited: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    duration_ms: int = Field(default=0, sa_column=Column(Integer, nullable=False))


# SQL: the enrollment is open (the partial index below, and the engine's queries).
ENROLLMENT_OPEN = "status IN ({})".format(", ".join(f"'{status}'" for status in EnrollmentStatus.open()))


class Enrollment(SQLModel, table=True):
    __tablename__ = "enrollments"
    __table_args__ = (
        # Due enrollments of a sequence in (next run, id) order: a walk's batch is the next entries (0011).
        Index("ix_enrollments_due", "sequence", "status", "next_run_at", "id"),
        # At most one open enrollment per sequence and customer, whatever the isolation level: two ticks
        # at once both enrolling the same entrants lose the race here (enroll inserts ON CONFLICT DO
        # NOTHING). Migration 0006.
        Index(
            "uq_enrollments_open",
            "sequence",
            "customer_id",
            unique=True,
            sqlite_where=text(ENROLLMENT_OPEN),
            postgresql_where=text(ENROLLMENT_OPEN),
        ),
    )

    id: int | None = _id_column()
    sequence: str = Field(sa_column=Column(String(200), nullable=False))
    customer_id: int | None = _customer_fk()
    # an omni.core.statuses.EnrollmentStatus
    status: str = Field(sa_column=Column(String(16), nullable=False))
    step_index: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    next_run_at: datetime | None = _ts()
    enrolled_at: datetime | None = _ts(nullable=False)
    exited_at: datetime | None = _ts()
    exit_reason: str | None = Field(default=None, sa_column=Column(String(500)))
    updated_at: datetime | None = _ts(nullable=False)


class Delivery(SQLModel, table=True):
    """One message to one customer for one step; claimed before the connector is called."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("enrollment_id", "step_id", name="uq_deliveries_enrollment_step"),
        Index("ix_deliveries_customer_created", "customer_id", "created_at"),
        # Pending deliveries in (due time, id) order: a dispatch batch is the next entries; a claimed or
        # resolved delivery leaves the index. Sends in flight, for the recovery of interrupted ones (0011).
        Index(
            "ix_deliveries_due",
            "next_attempt_at",
            "id",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_deliveries_sending",
            "updated_at",
            sqlite_where=text("status = 'sending'"),
            postgresql_where=text("status = 'sending'"),
        ),
        # Twilio's status callbacks name the message by its SID (migration 0009).
        Index("ix_deliveries_provider_message_id", "provider_message_id"),
    )

    id: int | None = _id_column()
    # "enrollment:<id>:<step>" or "campaign:<name>:<customer>": unique, and the idempotency key
    # handed to the connector.
    dedupe_key: str = Field(sa_column=Column(String(500), nullable=False, unique=True))
    enrollment_id: int | None = Field(
        default=None, sa_column=Column(BigIntId, ForeignKey("enrollments.id"), nullable=True)
    )
    campaign: str | None = Field(default=None, sa_column=Column(String(200)))
    step_id: str = Field(sa_column=Column(String(200), nullable=False))
    customer_id: int | None = _customer_fk(index=False)
    channel: str = Field(sa_column=Column(String(16), nullable=False))
    connector: str = Field(sa_column=Column(String(64), nullable=False))
    # What goes out, fixed when the delivery is created: the template, or for ads the ad audience and
    # the action (add / remove).
    template: str | None = Field(default=None, sa_column=Column(String(255)))
    ad_audience: str | None = Field(default=None, sa_column=Column(String(255)))
    action: str | None = Field(default=None, sa_column=Column(String(16)))
    # an omni.core.statuses.DeliveryStatus
    status: str = Field(sa_column=Column(String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    provider_message_id: str | None = Field(default=None, sa_column=Column(String(500)))
    error: str | None = Field(default=None, sa_column=Column(Text))
    marketing: bool = Field(default=True, sa_column=Column(Boolean, nullable=False))
    next_attempt_at: datetime | None = _ts()
    created_at: datetime | None = _ts(nullable=False)
    updated_at: datetime | None = _ts(nullable=False)
    sent_at: datetime | None = _ts()
    # What the provider said last (feedback webhooks, ``profiles.feedback``): delivered, deferred, bounced,
    # blocked, dropped (SendGrid); queued, sent, delivered, undelivered, failed (Twilio). Never backwards.
    delivered_at: datetime | None = _ts()
    provider_status: str | None = Field(default=None, sa_column=Column(String(32)))


class StoreMetadata(SQLModel, table=True):
    """Small key/value facts about the store itself (e.g. a generated unsubscribe secret)."""

    __tablename__ = "omni_metadata"

    key: str = Field(sa_column=Column(String(200), primary_key=True))
    value: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime | None = _ts(nullable=False)


class ApiKey(SQLModel, table=True):
    """A key for ``omni serve``: ``write`` keys send events (each names the source its events come from),
    ``read`` keys read profiles. Only the key's sha256 is stored; ``prefix`` (its first characters) names it
    in listings."""

    __tablename__ = "api_keys"

    id: int | None = _id_column()
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    source: str = Field(sa_column=Column(String(100), nullable=False))
    scope: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime | None = _ts(nullable=False)
    revoked_at: datetime | None = _ts()


# (helper A: the intake table goes here)
class IntakeRequest(SQLModel, table=True):
    """A request the tracking API of ``omni serve`` accepted, kept until it is ingested: committed before
    the 200, deleted in the transaction that stores its events (``profiles.intake``)."""

    __tablename__ = "intake"
    # Ids never reused (SQLite would reuse them once the queue empties): "<source> request <id>" names
    # one request for good in rejected_events.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = _id_column()
    received_at: datetime | None = _ts(nullable=False)
    # The write key's source (web, app, pos-lisbon ...): recorded on each event as context.omni.source.
    source: str = Field(sa_column=Column(String(100), nullable=False))
    # The call: identify, track, page, screen, group, alias, or batch.
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    # The JSON body as accepted (decompressed, without writeKey), and its size in bytes.
    size: int = Field(sa_column=Column(Integer, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))


# (helper C: suppression / feedback tables go here)


class Suppression(SQLModel, table=True):
    """An address no message may go to, whoever holds it: a hard bounce (``profiles.suppression``).
    Keyed by the address, not the customer, so a customer who gives a new address is reachable again."""

    __tablename__ = "suppressions"
    __table_args__ = (UniqueConstraint("kind", "address", name="uq_suppressions_kind_address"),)

    id: int | None = _id_column()
    # The kind of address (``omni.core.channels`` ``address``: email, phone), normalised as stored.
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    address: str = Field(sa_column=Column(String(512), nullable=False))
    reason: str = Field(sa_column=Column(String(32), nullable=False))  # hard_bounce
    source: str = Field(sa_column=Column(String(200), nullable=False))  # sendgrid:bounce
    detail: str | None = Field(default=None, sa_column=Column(Text))  # the provider's words
    created_at: datetime | None = _ts(nullable=False)


class ProviderEvent(SQLModel, table=True):
    """Every event a provider posted to a feedback webhook, kept as it came (``profiles.feedback``): each
    is processed once (``event_key``), and those Omni could not match (an unknown delivery id or phone
    number) stay here for inspection."""

    __tablename__ = "provider_events"
    __table_args__ = (Index("ix_provider_events_outcome_received", "outcome", "received_at"),)

    id: int | None = _id_column()
    provider: str = Field(sa_column=Column(String(32), nullable=False))  # sendgrid / twilio
    kind: str = Field(sa_column=Column(String(64), nullable=False))  # bounce, status, inbound ...
    # sendgrid:<sg_event_id>, twilio:<MessageSid>:<status>, twilio:<MessageSid> (inbound)
    event_key: str = Field(sa_column=Column(String(300), nullable=False, unique=True))
    delivery_id: str | None = Field(default=None, sa_column=Column(String(500)))  # as matched
    address: str | None = Field(default=None, sa_column=Column(String(512)))  # email / phone
    outcome: str = Field(sa_column=Column(String(32), nullable=False))  # applied, unknown_delivery ...
    payload: dict = _json(dict)
    occurred_at: datetime | None = _ts()
    received_at: datetime | None = _ts(nullable=False)


class GlobalControlMember(SQLModel, table=True):
    """The global control group's record (``profiles.control``): a customer in the group under ``salt``
    from ``entered_at`` until ``exited_at`` (open: still in it). At most one open row per customer."""

    __tablename__ = "global_control"
    __table_args__ = (
        Index(
            "uq_global_control_open",
            "customer_id",
            unique=True,
            sqlite_where=text("exited_at IS NULL"),
            postgresql_where=text("exited_at IS NULL"),
        ),
    )

    id: int | None = _id_column()
    customer_id: int | None = _customer_fk()
    salt: str = Field(sa_column=Column(String(200), nullable=False))
    share: float = Field(sa_column=Column(Float, nullable=False))
    entered_at: datetime | None = _ts(nullable=False)
    exited_at: datetime | None = _ts()


metadata = SQLModel.metadata
