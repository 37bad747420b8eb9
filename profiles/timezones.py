"""The customer's timezone: the one rule, as a SQL expression and as a lookup built on it.

A customer's timezone is, in order: their own (``traits.timezone``), the latest ``context.timezone``
their events carried, their home store's, else the default (``OMNI_DEFAULT_TIMEZONE``, UTC). Quiet
hours, "today" in a message and every local time shown to the customer read it from here. (Which store
a message *talks about* — home, else last pickup or till purchase, else nearest — is another rule:
:func:`profiles.stores.customer_stores`.)

Ingest and ``omni stores load`` keep only valid IANA names, so the first non-empty candidate is the
timezone; :func:`zone` still falls back to the default for a name this machine's tz database lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import ColumnElement, FromClause, func, select
from sqlalchemy.orm import Session

from omni.core.batching import chunked
from profiles.models import Customer, Store

DEFAULT_TIMEZONE = "UTC"


def customer_timezone_sql(customers: Any = None, home_stores: Any = None) -> ColumnElement:
    """SQL: the customer's timezone name, or NULL when none of theirs is known (the caller's default
    applies). ``home_stores`` is the ``stores`` table (or an alias) joined on the customer's home store
    (:func:`with_home_store`)."""
    customers = Customer.__table__ if customers is None else customers
    home_stores = Store.__table__ if home_stores is None else home_stores
    return func.coalesce(customers.c.timezone, customers.c.context_timezone, home_stores.c.timezone)


def with_home_store(customers: Any = None, home_stores: Any = None) -> FromClause:
    """``customers`` LEFT JOIN their home store, the FROM :func:`customer_timezone_sql` reads."""
    customers = Customer.__table__ if customers is None else customers
    home_stores = Store.__table__ if home_stores is None else home_stores
    return customers.outerjoin(home_stores, home_stores.c.id == customers.c.home_store_id)


@lru_cache(maxsize=1024)
def zone(name: str | None, default: str = DEFAULT_TIMEZONE) -> ZoneInfo:
    """The ZoneInfo of ``name``; the default's when ``name`` is empty or unknown on this machine."""
    for candidate in (name, default, DEFAULT_TIMEZONE):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo(DEFAULT_TIMEZONE)


def customer_timezones(session: Session, customer_ids: Iterable[int], default: str) -> dict[int, str]:
    """customer id -> timezone name of each of ``customer_ids`` (``default`` when none is known)."""
    customers = Customer.__table__
    expression = customer_timezone_sql(customers)
    zones: dict[int, str] = {}
    for chunk in chunked(sorted(set(customer_ids))):
        rows = session.execute(
            select(customers.c.id, expression)
            .select_from(with_home_store(customers))
            .where(customers.c.id.in_(chunk))
        )
        for customer_id, name in rows:
            zones[customer_id] = zone(name, default).key
    return zones
