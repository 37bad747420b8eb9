"""Dependencies every router of ``omni serve`` shares: the store, the settings, and API-key checks.

Keys travel as Segment sends them: the key is the HTTP Basic user name with an empty password (curl
``-u KEY:``). ``require_key(scope)`` answers 401 with a JSON reason, and a ``WWW-Authenticate`` header so a
browser asks for it, when the key is missing, unknown, revoked or of another scope.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

from fastapi import HTTPException, Request
from sqlalchemy import Engine

from omni.core.settings import Settings
from profiles.apikeys import ApiKey, authenticate
from profiles.db import session_scope


def store_engine(request: Request) -> Engine:
    return request.app.state.engine


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def now_of(request: Request) -> datetime:
    """The time now by the app's clock (``app.state.clock``: ``utcnow``, or a fixed clock a test sets)."""
    return request.app.state.clock()


def basic_user(request: Request) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (Segment's write key), or None."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, _password = decoded.partition(":")
    return user or None


def check_key(request: Request, plaintext: str | None, scope: str) -> ApiKey:
    """The active key of ``scope`` named by ``plaintext``; else 401."""
    with session_scope(store_engine(request)) as session:
        key = authenticate(session, plaintext, scope)
    if key is None:
        reason = "missing API key" if not plaintext else f"unknown or revoked {scope} key"
        raise HTTPException(
            status_code=401,
            detail=reason,
            headers={"WWW-Authenticate": 'Basic realm="omni"'},
        )
    return key


def require_key(scope: str):
    """A dependency: the active ``scope`` key sent as the Basic-auth user name."""

    def dependency(request: Request) -> ApiKey:
        return check_key(request, basic_user(request), scope)

    return dependency
