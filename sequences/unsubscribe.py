"""Signed unsubscribe links.

A token names a customer and a channel and is signed with HMAC-SHA256 under the unsubscribe secret:
``OMNI_UNSUBSCRIBE_SECRET`` when set, else a random secret that ``omni init`` generates once and keeps in
the store (``omni_metadata``, key ``unsubscribe_secret``), so the default set-up needs no configuration.

- ``ensure_unsubscribe_secret(session_or_engine) -> None``: store a secret if there is none (idempotent).
- ``unsubscribe_secret(session, settings) -> SecretStr``: the secret in force.
- ``make_token(secret, customer_id, channel) -> str`` / ``verify_token(secret, token) -> (customer_id,
  channel)`` (raises :class:`InvalidToken` on any tampering).
- ``unsubscribe_url(base_url, token) -> str``: ``<OMNI_UNSUBSCRIBE_BASE_URL>?token=<token>``, the target of
  the email's one-click ``List-Unsubscribe`` header and of the link in the footer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from urllib.parse import urlencode, urlsplit, urlunsplit

from pydantic import SecretStr
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from omni.core.clock import utcnow
from omni.core.settings import Settings
from profiles.db import session_scope
from profiles.models import StoreMetadata

METADATA_KEY = "unsubscribe_secret"
VERSION = "v1"


class InvalidToken(ValueError):
    """An unsubscribe token that is malformed or whose signature does not match."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def ensure_unsubscribe_secret(session: Session | Engine) -> None:
    """Generate and store the unsubscribe secret once; later calls keep the existing one.

    Given an engine (``omni init``), it runs in a transaction of its own.
    """
    if isinstance(session, Engine):
        with session_scope(session) as own:
            ensure_unsubscribe_secret(own)
        return

    table = StoreMetadata.__table__
    if session.execute(select(table.c.key).where(table.c.key == METADATA_KEY)).first() is not None:
        return
    try:
        with session.begin_nested():
            session.execute(
                insert(table).values(key=METADATA_KEY, value=secrets.token_urlsafe(32), updated_at=utcnow())
            )
    except IntegrityError:
        pass  # another process stored one first: keep theirs


def unsubscribe_secret(session: Session, settings: Settings) -> SecretStr:
    """``OMNI_UNSUBSCRIBE_SECRET`` if set, else the store's generated secret (created on first use)."""
    configured = settings.unsubscribe_secret
    if configured is not None and configured.get_secret_value():
        return configured
    table = StoreMetadata.__table__
    query = select(table.c.value).where(table.c.key == METADATA_KEY)
    value = session.execute(query).scalar()
    if value is None:
        ensure_unsubscribe_secret(session)
        value = session.execute(query).scalar_one()
    return SecretStr(value)


def _signature(secret: SecretStr | str, payload: str) -> str:
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
    mac = hmac.new(key.encode(), f"{VERSION}.{payload}".encode(), hashlib.sha256).digest()
    return _b64encode(mac)


def make_token(secret: SecretStr | str, customer_id: int, channel: str) -> str:
    payload = _b64encode(f"{int(customer_id)}:{channel}".encode())
    return f"{payload}.{_signature(secret, payload)}"


# A token is ``<base64url payload>.<base64url signature>``, unpadded; anything else is malformed.
MAX_TOKEN_CHARS = 1024
_TOKEN = re.compile(r"[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{43}")
_CUSTOMER_ID = re.compile(r"-?[0-9]{1,19}")


def verify_token(secret: SecretStr | str, token: object) -> tuple[int, str]:
    """The (customer id, channel) a token names; :class:`InvalidToken` if it was not signed by ``secret``.

    Every malformed input (not a string, bytes, empty, too long, non-ASCII, wrong padding, extra dots,
    a payload that is not ``<id>:<channel>``) raises :class:`InvalidToken`, never another error.
    """
    if not isinstance(token, str):
        raise InvalidToken("malformed unsubscribe token")
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_CHARS or not _TOKEN.fullmatch(token):
        raise InvalidToken("malformed unsubscribe token")
    payload, signature = token.split(".")
    if not hmac.compare_digest(_signature(secret, payload).encode(), signature.encode()):
        raise InvalidToken("unsubscribe token signature does not match")
    try:
        customer, channel = _b64decode(payload).decode("utf-8").split(":", 1)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidToken("malformed unsubscribe token") from None
    if not _CUSTOMER_ID.fullmatch(customer) or not channel:
        raise InvalidToken("malformed unsubscribe token")
    return int(customer), channel


def unsubscribe_url(base_url: str, token: str) -> str:
    parts = urlsplit(base_url)
    query = (parts.query + "&" if parts.query else "") + urlencode({"token": token})
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
