"""Channel connectors: every message Omni sends leaves through here.

For the sequence engine (see ``connectors/base.py`` for the details):

- ``get_connector(channel, settings, *, outbox=None) -> Connector``: the connector configured for
  ``channel`` (``OMNI_<CHANNEL>_CONNECTOR``, ``outbox`` by default); ``outbox`` is the writer the outbox
  connector records through (``profiles.outbox.OutboxRecorder``). Raises ``ConnectorConfigError`` naming
  the missing setting when it cannot be built. ``settings`` carry resolved credentials
  (``flows.secrets.resolve_secrets``; ``configured_secrets(settings)`` names the ones to resolve).
- ``send_batch(connector, messages, policy=..., sleep=...) -> SendReport`` (the one retry policy; the
  engine uses it, not ``connector.send``): results ``sent`` / ``retryable`` / ``failed`` / ``unknown``
  (may have been processed: never resend), and ``report.halted`` (the connector cannot send at all).
- Delivery semantics are the channel's: ``omni.core.channels.at_most_once(channel)``.
- ``sequences.effects.apply_effects(session, results, now=...)`` for provider side effects.
- ``MetaCustomAudience.add / remove(audience, members)`` for ad audiences (or ``send`` with ``ads``
  messages carrying ``action`` and ``member``).
"""

from __future__ import annotations

from connectors.base import (
    AudienceMember,
    Connector,
    ConnectorConfigError,
    Effect,
    EffectKind,
    Message,
    Result,
    RetryPolicy,
    SendReport,
    Status,
    redact,
    register_basic_auth,
    register_secret,
    send_batch,
)
from connectors.fcm_push import FcmPush
from connectors.meta_audience import MetaCustomAudience
from connectors.outbox import OutboxConnector, OutboxRow, OutboxWriter
from connectors.sendgrid_email import SendGridEmail
from connectors.twilio_sms import TwilioSms
from connectors.webhook import WebhookConnector
from omni.core.channels import SEND_CHANNELS
from omni.core.settings import Settings

# The explicit registry, keyed by provider. Adding a provider adds one line here.
REGISTRY: dict[str, type[Connector]] = {
    c.provider: c
    for c in (OutboxConnector, SendGridEmail, MetaCustomAudience, TwilioSms, FcmPush, WebhookConnector)
}


def provider_setting(channel: str) -> str:
    """The setting that picks ``channel``'s provider (``email`` -> ``email_connector``)."""
    if channel not in SEND_CHANNELS:
        known = ", ".join(SEND_CHANNELS)
        raise ConnectorConfigError(f"unknown channel {channel!r} (expected one of {known})")
    return f"{channel}_connector"


def provider_for(channel: str, settings: Settings) -> str:
    """The provider configured for ``channel``."""
    return getattr(settings, provider_setting(channel)).strip().lower()


def configured_secrets(settings: Settings) -> tuple[str, ...]:
    """The credential settings the providers configured for the channels read (``Settings`` fields):
    the ones to resolve before building them. An unknown provider reads none (building it fails)."""
    providers = sorted({provider_for(channel, settings) for channel in SEND_CHANNELS} & REGISTRY.keys())
    return tuple(dict.fromkeys(name for p in providers for name in REGISTRY[p].secret_settings))


def get_connector(channel: str, settings: Settings, *, outbox: OutboxWriter | None = None) -> Connector:
    """Build the connector configured for ``channel``.

    Args:
        settings: the settings, credentials resolved (``flows.secrets.resolve_secrets``).
        outbox: the writer the outbox connector records through (the store's: the engine's
            ``profiles.outbox.OutboxRecorder``); required when the outbox is the channel's provider.

    Raises:
        ConnectorConfigError: unknown provider, a provider that does not serve ``channel``, or a missing
            setting (the message names the ``OMNI_...`` variable).
    """
    provider = provider_for(channel, settings)
    env = f"OMNI_{provider_setting(channel).upper()}"
    cls = REGISTRY.get(provider)
    if cls is None:
        raise ConnectorConfigError(
            f"{env}={provider!r} is not a known provider (one of {', '.join(REGISTRY)})"
        )
    if channel not in cls.channels:
        raise ConnectorConfigError(f"{env}={provider!r}: {provider} does not send {channel} messages")
    if cls is OutboxConnector:
        # The one connector that records instead of sending: it writes through the writer it is handed.
        return OutboxConnector.from_writer(outbox)
    return cls.from_settings(settings)


__all__ = [
    "REGISTRY",
    "AudienceMember",
    "Connector",
    "ConnectorConfigError",
    "Effect",
    "EffectKind",
    "Message",
    "OutboxRow",
    "OutboxWriter",
    "Result",
    "RetryPolicy",
    "SendReport",
    "Status",
    "configured_secrets",
    "get_connector",
    "provider_for",
    "provider_setting",
    "redact",
    "register_basic_auth",
    "register_secret",
    "send_batch",
]
