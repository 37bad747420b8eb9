"""Apply what providers told us about recipients to the profile store.

Connectors never touch the database; they put :class:`connectors.base.Effect` values on their results.
The caller (the sequence engine, ``omni templates test-send``) hands them here inside its transaction:

- ``EffectKind.SMS_OPTED_OUT`` (Twilio 21610: the customer replied STOP): an SMS ``opted_out`` consent
  decision with source ``twilio:21610`` through the one suppression rule
  (:func:`profiles.suppression.record_consents`, as Twilio's status and inbound webhooks do), so nobody
  who opted out is texted again;
- ``EffectKind.DEVICE_TOKEN_INVALID`` (FCM ``UNREGISTERED`` / ``SENDER_ID_MISMATCH`` / invalid token):
  the ``device_token`` identity is deleted, so the token is not used again.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from connectors.base import Effect, EffectKind, Result
from omni.core.channels import Channel, Touchpoint
from omni.core.statuses import ConsentStatus
from profiles.consent import ConsentDecision
from profiles.models import Identity, IdentityKind
from profiles.suppression import record_consents


def apply_effects(session: Session, results: Iterable[Result | Effect], *, now: datetime) -> dict[str, int]:
    """Write the effects carried by ``results`` (or given directly). Returns counts per kind."""
    effects: list[Effect] = []
    for item in results:
        effects.extend(item.effects if isinstance(item, Result) else [item])
    decisions = [
        ConsentDecision(e.customer_id, Channel.SMS.value, ConsentStatus.OPTED_OUT.value, e.source, now)
        for e in effects
        if e.kind == EffectKind.SMS_OPTED_OUT and e.customer_id is not None
    ]
    if decisions:
        # The customer opted out at the provider (replied STOP): it always takes effect.
        record_consents(session, decisions, now=now, touchpoint=Touchpoint.SMS.value, operator=True)
    tokens = sorted({e.value for e in effects if e.kind == EffectKind.DEVICE_TOKEN_INVALID})
    removed = 0
    if tokens:
        table = Identity.__table__
        removed = session.execute(
            delete(table).where(table.c.kind == IdentityKind.DEVICE_TOKEN.value, table.c.value.in_(tokens))
        ).rowcount
    return {EffectKind.SMS_OPTED_OUT: len(decisions), EffectKind.DEVICE_TOKEN_INVALID: removed or 0}
