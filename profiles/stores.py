"""Physical stores: loaded from a file of store records (``omni stores load``), used for a customer's
home store, pickup orders, store hours in messages and as a timezone fallback.

Opening hours (``hours``) are normalised when a store is loaded, so every reader sees one form:

- keys: a day (``mon`` … ``sun``, or the full English name, any case), a range of days (``mon-sat``; a
  range may wrap round the week: ``fri-mon`` is Friday, Saturday, Sunday and Monday) or a comma list of
  both (``sat,sun``, ``mon-wed,fri``). A day may be given by one key only;
- values: ``closed``, or one or more intervals ``HH:MM-HH:MM`` separated by commas
  (``10:00-13:00,14:00-19:00``; a JSON list of intervals is accepted too), in the store's own timezone.
  An interval that ends at or before it starts runs past midnight (``18:00-02:00`` closes at 2 am the next
  day); ``24:00`` is midnight at the end of the day, so ``00:00-24:00`` is open all day. Intervals of a
  day must not overlap and come in order; only the last may run past midnight.
- stored form: ``{"mon": "10:00-13:00, 14:00-19:00", "tue": ..., "sun": "closed"}`` with only the days
  the file gives, in week order; a day the file does not give is closed.

Anything else is refused with the store's id and the reason (:func:`parse_store`); :func:`parse_stores`
checks a whole file and reports every bad store at once, so a file is loaded whole or not at all.

Which store is a customer's is one rule, :func:`customer_stores`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from omni.core.channels import Touchpoint
from profiles.models import Customer, Event, Fulfillment, Order, Store
from profiles.segment import valid_timezone

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_DAY_ALIASES = {
    **{d: i for i, d in enumerate(DAYS)},
    **{n.lower(): i for i, n in enumerate(DAY_NAMES)},
    "tues": 1,
    "thur": 3,
    "thurs": 3,
}
_INTERVAL = re.compile(r"^(\d{1,2}):(\d{2})\s*[-–]\s*(\d{1,2}):(\d{2})$")
CLOSED = "closed"

# The nearest store is only "the customer's" within this distance (by coordinates).
NEAREST_STORE_MAX_KM = 500.0
# A postal code matches a store's when equal, else when they share at least this many leading characters.
POSTAL_PREFIX_MIN = 3


# --- opening hours -------------------------------------------------------------------------------------


def _day_index(token: str, key: str) -> int:
    index = _DAY_ALIASES.get(token.strip().lower())
    if index is None:
        raise ValueError(f"{key!r}: {token.strip()!r} is not a day (use mon, tue, wed, thu, fri, sat, sun)")
    return index


def _days_of(key: str) -> list[int]:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"{key!r}: empty day")
    days: list[int] = []
    for part in key.split(","):
        if "-" in part:
            first, _, last = part.partition("-")
            start, end = _day_index(first, key), _day_index(last, key)
            span = (end - start) % 7
            days.extend((start + step) % 7 for step in range(span + 1))  # fri-mon wraps round the week
        else:
            days.append(_day_index(part, key))
    return days


def _minutes(hours: str, minutes: str, text: str, key: str) -> int:
    h, m = int(hours), int(minutes)
    if h > 24 or m > 59 or (h == 24 and m != 0):
        raise ValueError(f"{key!r}: {text!r} is not a time of day")
    return h * 60 + m


def _intervals(key: str, value: Any) -> str:
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key!r}: a list of hours must hold interval strings like '10:00-19:00'")
        pieces = [p for v in value for p in v.split(",")]
    elif isinstance(value, str):
        if value.strip().lower() == CLOSED:
            return CLOSED
        pieces = value.split(",")
    else:
        raise ValueError(f"{key!r}: hours must be text like '10:00-19:00' or 'closed', not {value!r}")
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        text = piece.strip()
        match = _INTERVAL.match(text)
        if not match:
            raise ValueError(
                f"{key!r}: {text!r} is not an interval like '10:00-19:00' (or 'closed', or a comma list)"
            )
        start = _minutes(match[1], match[2], text, key)
        end = _minutes(match[3], match[4], text, key)
        if start == 24 * 60:
            raise ValueError(f"{key!r}: {text!r} starts at 24:00 (use 00:00 of the next day)")
        if end <= start:
            if end == start:
                raise ValueError(
                    f"{key!r}: {text!r} opens and closes at the same time (all day: 00:00-24:00)"
                )
            end += 24 * 60  # past midnight
        if spans and start < spans[-1][1]:
            raise ValueError(f"{key!r}: {text!r} overlaps or comes before the interval before it")
        if spans and spans[-1][1] > 24 * 60:
            raise ValueError(f"{key!r}: only the last interval of a day may run past midnight")
        spans.append((start, end))
    return ", ".join(f"{_hhmm(start)}-{_hhmm(end)}" for start, end in spans)


def _hhmm(minutes: int) -> str:
    if minutes > 24 * 60:
        minutes -= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def normalize_hours(hours: Any) -> dict[str, str]:
    """The per-day form of a store's opening hours (see the module doc); ValueError with the reason."""
    if hours is None:
        return {}
    if not isinstance(hours, Mapping):
        raise ValueError(f"hours must be an object of day -> hours, not {type(hours).__name__}")
    by_day: dict[int, tuple[str, str]] = {}
    for key, value in hours.items():
        text = _intervals(str(key), value)
        for day in _days_of(key):
            if day in by_day:
                raise ValueError(f"{DAYS[day]} is given twice: in {by_day[day][0]!r} and {key!r}")
            by_day[day] = (key, text)
    return {DAYS[day]: by_day[day][1] for day in sorted(by_day)}


def stored_hours(hours: Any) -> dict[str, str]:
    """Hours as stored, normalised when they can be (stores loaded before hours were normalised kept
    ``mon-sat`` keys); hours that cannot be read are returned as they are."""
    try:
        return normalize_hours(hours)
    except ValueError:
        return dict(hours) if isinstance(hours, Mapping) else {}


# --- loading -------------------------------------------------------------------------------------------


class StoreRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=200)
    address: str | None = None
    city: str | None = None
    region: str | None = None
    postal_code: str | None = Field(default=None, max_length=32)
    country: str | None = Field(default=None, min_length=2, max_length=2)
    phone: str | None = None
    email: str | None = None
    timezone: str | None = None
    hours: dict[str, str] = Field(default_factory=dict)
    latitude: float | None = Field(default=None, ge=-90, le=90)
    longitude: float | None = Field(default=None, ge=-180, le=180)

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("postal_code", mode="before")
    @classmethod
    def _postal_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None and not valid_timezone(value):
            raise ValueError(f"{value!r} is not an IANA timezone name")
        return value

    @field_validator("hours", mode="before")
    @classmethod
    def _hours(cls, value: Any) -> dict[str, str]:
        return normalize_hours(value)

    @model_validator(mode="after")
    def _coordinates(self) -> StoreRecord:
        if (self.latitude is None) != (self.longitude is None):
            raise ValueError("latitude and longitude go together: give both or neither")
        return self


def parse_store(value: Any) -> StoreRecord:
    """Raises ValueError with a readable reason, naming the store when the record has an id."""
    try:
        return StoreRecord.model_validate(value)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'store'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        store_id = value.get("id") if isinstance(value, Mapping) else None
        who = f"store {str(store_id)!r}" if store_id not in (None, "") else "store without an id"
        raise ValueError(f"{who}: {reasons}") from None


class StoreFileError(ValueError):
    """A file of stores with bad records: ``problems`` lists (source, reason) for every one."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = "; ".join(f"{source}: {reason}" for source, reason in problems)
        super().__init__(f"{len(problems)} bad store record(s), nothing loaded: {lines}")


def parse_stores(values: Sequence[Any], sources: Sequence[str] | None = None) -> list[StoreRecord]:
    """Every record of a file, or :class:`StoreFileError` naming every bad one (and ids given twice):
    a file is loaded whole or not at all, so fixing it and loading it again loses nothing."""
    sources = list(sources) if sources is not None else [f"item {i}" for i in range(len(values))]
    records: list[StoreRecord] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for value, source in zip(values, sources, strict=True):
        try:
            record = parse_store(value)
        except ValueError as exc:
            problems.append((source, str(exc)))
            continue
        if record.id in seen:
            problems.append((source, f"store {record.id!r}: id already given at {seen[record.id]}"))
            continue
        seen[record.id] = source
        records.append(record)
    if problems:
        raise StoreFileError(problems)
    return records


def upsert_stores(session: Session, records: Iterable[StoreRecord], *, now: datetime) -> int:
    count = 0
    for record in records:
        existing = session.get(Store, record.id)
        values = record.model_dump()
        if existing is None:
            session.add(Store(**values, created_at=now, updated_at=now))
        else:
            for key, value in values.items():
                setattr(existing, key, value)
            existing.updated_at = now
        count += 1
    session.flush()
    return count


def list_stores(session: Session) -> list[Store]:
    return list(session.execute(select(Store).order_by(Store.id)).scalars())


# --- the customer's store ------------------------------------------------------------------------------

STORE_FIELDS = (
    "id",
    "name",
    "address",
    "city",
    "region",
    "postal_code",
    "country",
    "phone",
    "email",
    "timezone",
    "hours",
    "latitude",
    "longitude",
)


def load_stores(session: Session, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Stores by id as plain dicts (every store when ``ids`` is None), hours in the per-day form."""
    table = Store.__table__
    query = select(*(table.c[name] for name in STORE_FIELDS))
    if ids is not None:
        wanted = sorted({i for i in ids if i})
        if not wanted:
            return {}
        query = query.where(table.c.id.in_(wanted))
    stores = {}
    for row in session.execute(query.order_by(table.c.id)):
        store = dict(row._mapping)
        store["hours"] = stored_hours(store.get("hours"))
        stores[store["id"]] = store
    return stores


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _coordinates(value: Any) -> tuple[float, float] | None:
    """(lat, lon) of an object with ``latitude``/``longitude`` (or ``lat``/``lon``/``lng``)."""
    if not isinstance(value, Mapping):
        return None
    lat = _number(value.get("latitude", value.get("lat")))
    lon = _number(value.get("longitude", value.get("lon", value.get("lng"))))
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def _postal(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    code = re.sub(r"[^0-9A-Za-z]", "", value).upper()
    return code or None


def _trait_location(traits: Any) -> tuple[tuple[float, float] | None, str | None, str | None]:
    """(coordinates, postal code, country) a customer's traits give, each None when absent."""
    if not isinstance(traits, Mapping):
        return None, None, None
    address = traits.get("address") if isinstance(traits.get("address"), Mapping) else {}
    coordinates = _coordinates(traits) or _coordinates(traits.get("location")) or _coordinates(address)
    postal = None
    for source in (address, traits):
        for key in ("postal_code", "postalCode", "postcode", "zip", "zip_code", "zipCode"):
            postal = postal or _postal(source.get(key))
    country = None
    for source in (address, traits):
        value = source.get("country")
        if isinstance(value, str) and len(value.strip()) == 2:
            country = country or value.strip().upper()
    return coordinates, postal, country


def distance_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(h)))


def _nearest_by_coordinates(
    point: tuple[float, float], stores: Sequence[dict[str, Any]], max_km: float
) -> dict[str, Any] | None:
    best: tuple[float, str] | None = None
    chosen = None
    for store in stores:
        km = distance_km(point, (store["latitude"], store["longitude"]))
        if km <= max_km and (best is None or (km, store["id"]) < best):
            best, chosen = (km, store["id"]), store
    return chosen


def _nearest_by_postal(
    code: str, country: str | None, stores: Sequence[dict[str, Any]]
) -> dict[str, Any] | None:
    best: tuple[int, float, str] | None = None
    chosen = None
    for store in stores:
        store_country = (store.get("country") or "").upper() or None
        if country and store_country and country != store_country:
            continue
        other = _postal(store.get("postal_code"))
        if other is None:
            continue
        shared = len(code) if code == other else len(_common_prefix(code, other))
        if shared < min(POSTAL_PREFIX_MIN, len(code)) or shared == 0:
            continue
        gap = abs(int(code) - int(other)) if code.isdigit() and other.isdigit() else 0.0
        key = (-shared, gap, store["id"])
        if best is None or key < best:
            best, chosen = key, store
    return chosen


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def customer_stores(
    session: Session, customer_ids: Iterable[int], *, max_km: float = NEAREST_STORE_MAX_KM
) -> dict[int, dict[str, Any] | None]:
    """The store of each customer, the one rule for "which store is this customer's" — as a plain dict
    (the store's fields, ``hours`` in the per-day form, and ``source``: how it was chosen), or None:

    1. ``home``: their home store (``customers.home_store_id``), when it is a known store;
    2. ``purchase``: else the store of their latest in-store purchase or pickup order (an order on the
       ``store`` channel, or with fulfillment ``pickup`` / ``in_store``, whose ``store_id`` is a known
       store);
    3. ``nearest``: else the nearest store to where their profile says they are: coordinates in traits
       (``latitude``/``longitude``, at the top, in ``location`` or in ``address``) — the nearest store with
       coordinates within ``max_km``; else a postal code in traits (``address.postal_code`` /
       ``postalCode`` / ``zip``, or at the top) — the store with the same code, else the one sharing the
       longest leading part (at least :data:`POSTAL_PREFIX_MIN` characters, same country when both are
       known); else the ``context.location`` {latitude, longitude} of their latest event that has one;
    4. None: no store is theirs (templates use ``{% if store %}`` … ``{% else %}`` …).

    A few queries per 1,000 customers (all stores once, then customers, orders, traits, events only for
    the customers still without a store), whatever the batch size. Unknown customer ids map to None.
    """
    ids = list(dict.fromkeys(customer_ids))
    result: dict[int, dict[str, Any] | None] = dict.fromkeys(ids)
    if not ids:
        return result
    stores = load_stores(session)
    if not stores:
        return result
    located = [s for s in stores.values() if s.get("latitude") is not None and s.get("longitude") is not None]
    with_postal = [s for s in stores.values() if s.get("postal_code")]
    customers_t, orders_t, events_t = Customer.__table__, Order.__table__, Event.__table__

    def choose(customer_id: int, store: dict[str, Any], source: str) -> None:
        result[customer_id] = {**store, "hours": dict(store["hours"]), "source": source}

    for chunk in chunked(ids):
        left: list[int] = []
        for customer_id, home in session.execute(
            select(customers_t.c.id, customers_t.c.home_store_id).where(customers_t.c.id.in_(chunk))
        ):
            if home and home in stores:
                choose(customer_id, stores[home], "home")
            else:
                left.append(customer_id)
        if not left:
            continue
        latest: dict[int, tuple[Any, str]] = {}
        for customer_id, store_id, placed_at, order_id in session.execute(
            select(
                orders_t.c.customer_id, orders_t.c.store_id, orders_t.c.placed_at, orders_t.c.order_id
            ).where(
                orders_t.c.customer_id.in_(left),
                orders_t.c.store_id.is_not(None),
                or_(
                    orders_t.c.channel == Touchpoint.STORE.value,
                    orders_t.c.fulfillment.in_((Fulfillment.PICKUP.value, Fulfillment.IN_STORE.value)),
                ),
            )
        ):
            if store_id not in stores:
                continue
            key = (placed_at, order_id)
            if customer_id not in latest or key > latest[customer_id][0]:
                latest[customer_id] = (key, store_id)
        for customer_id, (_, store_id) in latest.items():
            choose(customer_id, stores[store_id], "purchase")
        left = [c for c in left if c not in latest]
        if not left or not (located or with_postal):
            continue
        by_events: list[int] = []
        for customer_id, traits in session.execute(
            select(customers_t.c.id, customers_t.c.traits).where(customers_t.c.id.in_(left))
        ):
            point, postal, country = _trait_location(traits)
            store = _nearest_by_coordinates(point, located, max_km) if point else None
            if store is None and postal:
                store = _nearest_by_postal(postal, country, with_postal)
            if store is not None:
                choose(customer_id, store, "nearest")
            else:
                by_events.append(customer_id)
        if not by_events or not located:
            continue
        latitude = events_t.c.context[("location", "latitude")].as_string()
        longitude = events_t.c.context[("location", "longitude")].as_string()
        ranked = (
            select(
                events_t.c.customer_id,
                latitude.label("latitude"),
                longitude.label("longitude"),
                func.row_number()
                .over(
                    partition_by=events_t.c.customer_id,
                    order_by=(events_t.c.occurred_at.desc(), events_t.c.id.desc()),
                )
                .label("rank"),
            )
            .where(events_t.c.customer_id.in_(by_events), latitude.is_not(None), longitude.is_not(None))
            .subquery()
        )
        for customer_id, lat, lon in session.execute(
            select(ranked.c.customer_id, ranked.c.latitude, ranked.c.longitude).where(ranked.c.rank == 1)
        ):
            point = _coordinates({"latitude": lat, "longitude": lon})
            store = _nearest_by_coordinates(point, located, max_km) if point else None
            if store is not None:
                choose(customer_id, store, "nearest")
    return result
