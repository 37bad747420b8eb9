"""API keys of ``omni serve``: created, listed, revoked, and checked.

A key is ``omni_<scope letter>_<43 url-safe characters>`` (256 random bits). Only its sha256 is stored,
with its first characters (``prefix``) to name it in ``omni keys list``; the plain key is shown once, when
it is created. A key is checked by hashing what the client sent and looking the hash up, then comparing
the hashes with :func:`hmac.compare_digest`, so the time taken does not depend on how much of a guess is
right.

- ``write`` keys send events to the tracking API; each names the ``source`` its events are recorded with
  (``web``, ``app``, ``pos-lisbon`` ...).
- ``read`` keys read the profile API and the customer page.

A revoked key (``revoked_at`` set) is refused like an unknown one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from omni.core.clock import utcnow
from profiles.models import ApiKey as ApiKeyRow

PREFIX_LENGTH = 12
SOURCE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")


class KeyScope(StrEnum):
    WRITE = "write"
    READ = "read"


class KeyError_(ValueError):
    """A key request that cannot be honoured (bad source or scope, unknown key)."""


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    id: int
    prefix: str
    source: str
    scope: KeyScope
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prefix": self.prefix,
            "source": self.source,
            "scope": str(self.scope),
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def key_hash(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def _of(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        prefix=row.prefix,
        source=row.source,
        scope=KeyScope(row.scope),
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def create_key(
    session: Session, *, source: str, scope: str = KeyScope.WRITE, now: datetime | None = None
) -> tuple[ApiKey, str]:
    """A new key for ``source`` with ``scope``; returns it and its plain text (never stored)."""
    if not SOURCE_PATTERN.match(source or ""):
        raise KeyError_(
            f"source {source!r} must be 1-100 letters, digits, '.', '_', ':' or '-', starting with a letter "
            "or digit"
        )
    try:
        scope = KeyScope(scope)
    except ValueError:
        raise KeyError_(f"scope {scope!r} must be one of: {', '.join(s.value for s in KeyScope)}") from None
    plaintext = f"omni_{scope.value[0]}_{secrets.token_urlsafe(32)}"
    row = ApiKeyRow(
        prefix=plaintext[:PREFIX_LENGTH],
        key_hash=key_hash(plaintext),
        source=source,
        scope=scope.value,
        created_at=now or utcnow(),
    )
    session.add(row)
    session.flush()
    return _of(row), plaintext


def authenticate(session: Session, plaintext: str | None, scope: str) -> ApiKey | None:
    """The active key ``plaintext`` names, if it has ``scope``; else None (unknown, revoked, other
    scope, or empty)."""
    if not plaintext:
        return None
    wanted = key_hash(plaintext)
    table = ApiKeyRow.__table__
    row = session.execute(select(table).where(table.c.key_hash == wanted)).first()
    if row is None or not hmac.compare_digest(row.key_hash, wanted):
        return None
    if row.revoked_at is not None or row.scope != KeyScope(scope).value:
        return None
    return _of(row)


def list_keys(session: Session, *, include_revoked: bool = True) -> list[ApiKey]:
    """Every key, oldest first."""
    query = select(ApiKeyRow).order_by(ApiKeyRow.id)
    if not include_revoked:
        query = query.where(ApiKeyRow.revoked_at.is_(None))
    return [_of(row) for row in session.execute(query).scalars()]


def revoke_key(session: Session, key: str, *, now: datetime | None = None) -> ApiKey:
    """Revoke the key named by its id, its prefix or its plain text; revoking twice is harmless."""
    table = ApiKeyRow.__table__
    if key.isdigit():
        where = table.c.id == int(key)
    elif len(key) > PREFIX_LENGTH:
        where = table.c.key_hash == key_hash(key)
    else:
        where = table.c.prefix == key
    rows = session.execute(select(table.c.id).where(where)).scalars().all()
    if not rows:
        raise KeyError_(f"no key {key!r} (give its id or prefix from `omni keys list`, or the key itself)")
    if len(rows) > 1:
        raise KeyError_(f"{key!r} names {len(rows)} keys; give the id from `omni keys list`")
    session.execute(
        update(table)
        .where(table.c.id == rows[0], table.c.revoked_at.is_(None))
        .values(revoked_at=now or utcnow())
    )
    return _of(session.get(ApiKeyRow, rows[0]))
