"""Channel connectors: every message Omni sends leaves through here.

For the sequence engine (see ``connectors/base.py`` for the details):

- ``get_connector(channel, settings=None, *, engine=None, clock=None) -> Connector``: the connector
  configured for ``channel`` (``OMNI_<CHANNEL>_CONNECTOR``, ``outbox`` by default); raises
  ``ConnectorConfigError`` naming the missing setting when it cannot be built.
- ``send_batch(connector, messages, policy=..., sleep=...) -> SendReport`` (the one retry loop; the
  engine uses it, not ``connector.send``): results ``sent`` / ``retryable`` / ``failed`` / ``unknown``
  (may have been processed: never resend), and ``report.halted`` (the connector cannot send at all).
- ``at_most_once(channel)`` / ``AT_LEAST_ONCE_CHANNELS``: the one statement of each channel's delivery
  semantics (email, SMS, push at most once; ads, webhook at least once).
- ``sequences.effects.apply_effects(session, results, now=...)`` for provider side effects.
- ``MetaCustomAudience.add / remove(audience, members)`` for ad audiences (or ``send`` with ``ads``
  messages carrying ``action`` and ``member``).
"""

from __future__ import annotations

from typing import Any

from connectors.base import (
    AT_LEAST_ONCE_CHANNELS,
    AudienceMember,
    Channel,
    Connector,
    ConnectorConfigError,
    Effect,
    Message,
    Result,
    RetryPolicy,
    SendReport,
    Status,
    at_most_once,
    redact,
    register_basic_auth,
    register_secret,
    send_batch,
)
from connectors.fcm_push import FcmPush
from connectors.meta_audience import MetaCustomAudience
from connectors.outbox import OutboxConnector
from connectors.sendgrid_email import SendGridEmail
from connectors.twilio_sms import TwilioSms
from connectors.webhook import WebhookConnector

# The explicit registry, keyed by provider. Adding a provider adds one line here.
REGISTRY: dict[str, type[Connector]] = {
    c.provider: c
    for c in (OutboxConnector, SendGridEmail, MetaCustomAudience, TwilioSms, FcmPush, WebhookConnector)
}

# The setting that picks each channel's provider.
CHANNEL_SETTINGS = {
    Channel.EMAIL.value: "email_connector",
    Channel.SMS.value: "sms_connector",
    Channel.PUSH.value: "push_connector",
    Channel.ADS.value: "ads_connector",
    Channel.WEBHOOK.value: "webhook_connector",
}


def provider_for(channel: str, settings: Any = None) -> str:
    """The provider configured for ``channel``."""
    if settings is None:
        from omni.core.settings import get_settings

        settings = get_settings()
    if channel not in CHANNEL_SETTINGS:
        raise ConnectorConfigError(
            f"unknown channel {channel!r} (expected one of {', '.join(CHANNEL_SETTINGS)})"
        )
    return getattr(settings, CHANNEL_SETTINGS[channel]).strip().lower()


def get_connector(channel: str, settings: Any = None, **kwargs: Any) -> Connector:
    """Build the connector configured for ``channel``.

    Args:
        settings: an ``omni.core.settings.Settings`` (default: ``get_settings()``).
        kwargs: passed to ``from_settings``: ``engine`` (the outbox's store), ``clock`` (the outbox's
            ``sent_at``: the engine's ``now``).

    Raises:
        ConnectorConfigError: unknown provider, a provider that does not serve ``channel``, or a missing
            setting (the message names the ``OMNI_...`` variable).
    """
    if settings is None:
        from omni.core.settings import get_settings

        settings = get_settings()
    provider = provider_for(channel, settings)
    env = f"OMNI_{CHANNEL_SETTINGS[channel].upper()}"
    cls = REGISTRY.get(provider)
    if cls is None:
        raise ConnectorConfigError(
            f"{env}={provider!r} is not a known provider (one of {', '.join(REGISTRY)})"
        )
    if channel not in cls.channels:
        raise ConnectorConfigError(f"{env}={provider!r}: {provider} does not send {channel} messages")
    return cls.from_settings(settings, **kwargs)


__all__ = [
    "AT_LEAST_ONCE_CHANNELS",
    "CHANNEL_SETTINGS",
    "REGISTRY",
    "AudienceMember",
    "Channel",
    "Connector",
    "ConnectorConfigError",
    "Effect",
    "Message",
    "Result",
    "RetryPolicy",
    "SendReport",
    "Status",
    "at_most_once",
    "get_connector",
    "provider_for",
    "redact",
    "register_basic_auth",
    "register_secret",
    "send_batch",
]
