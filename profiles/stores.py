"""Physical stores: loaded from a file of store records (``omni stores load``), used for a customer's
home store, pickup orders, store hours in messages and as a timezone fallback."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from profiles.models import Store
from profiles.segment import valid_timezone


class StoreRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=200)
    address: str | None = None
    city: str | None = None
    region: str | None = None
    postal_code: str | None = None
    country: str | None = Field(default=None, min_length=2, max_length=2)
    phone: str | None = None
    email: str | None = None
    timezone: str | None = None
    hours: dict[str, str] = Field(default_factory=dict)
    latitude: float | None = None
    longitude: float | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None and not valid_timezone(value):
            raise ValueError(f"{value!r} is not an IANA timezone name")
        return value


def parse_store(value: Any) -> StoreRecord:
    """Raises ValueError with a readable reason."""
    try:
        return StoreRecord.model_validate(value)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'store'}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(reasons) from None


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
