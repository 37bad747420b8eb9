"""The local outbox: the default connector of every channel, needing no credentials.

Each message is recorded in the store's ``outbox`` table exactly as it would have gone out (recipient,
subject, body, and the full message in ``payload``: HTML and text parts, push title and data, the
unsubscribe URL, an ad-audience action). ``omni outbox list [--channel C] [--json]`` shows them.

The connector never touches the store: it turns messages into :class:`OutboxRow` values and hands them
to the :class:`OutboxWriter` it was built with (``profiles.outbox.OutboxRecorder`` writes the table).
Recording is idempotent by delivery id: a message whose delivery id is already in the outbox is
reported ``sent`` again (``info["already_recorded"]``) and not written twice. Limits: 1000 messages per
batch (one driver-level INSERT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypedDict

from connectors.base import Connector, ConnectorConfigError, Message, Result
from omni.core.channels import SEND_CHANNELS, Channel, spec


class OutboxRow(TypedDict):
    """One message as the outbox records it (the writer adds ``sent_at``)."""

    delivery_id: str
    channel: str
    customer_id: int | None
    recipient: str
    template: str | None
    subject: str | None
    body: str | None
    payload: dict[str, Any]


class OutboxWriter(Protocol):
    def __call__(self, rows: Sequence[OutboxRow], /) -> set[str]:
        """Record ``rows`` idempotently by delivery id; returns the delivery ids newly recorded (a row whose
        delivery id is already recorded is left as it is)."""
        ...


def message_payload(message: Message) -> dict[str, Any]:
    """The message as JSON: what a provider would have received, in Omni's terms."""
    payload: dict[str, Any] = {
        "delivery_id": message.delivery_id,
        "channel": message.channel,
        "to": message.to,
    }
    for key in ("subject", "html", "text", "title", "unsubscribe_url", "action"):
        value = getattr(message, key)
        if value is not None:
            payload[key] = value
    if message.data:
        payload["data"] = dict(message.data)
    if message.categories:
        payload["categories"] = list(message.categories)
    if message.member is not None:
        # The outbox keeps no copy of identifiers: the customer id says who.
        payload["member"] = {"customer_id": message.member.customer_id}
    return payload


def outbox_row(message: Message) -> OutboxRow:
    """The row of ``message``: its subject is the email subject or the push title, its body the text,
    or for an audience sync the action (add / remove)."""
    facts = spec(message.channel)
    return {
        "delivery_id": message.delivery_id,
        "channel": message.channel,
        "customer_id": message.customer_id,
        "recipient": message.to,
        "template": message.template,
        "subject": message.subject if "subject" in facts.template_parts else message.title,
        "body": message.action if facts.delivery == "audience" else message.text,
        "payload": message_payload(message),
    }


class OutboxConnector(Connector):
    provider = "outbox"
    channel = Channel.EMAIL
    channels = frozenset(SEND_CHANNELS)
    max_batch_size = 1000
    rate_per_second = None

    def __init__(self, writer: OutboxWriter) -> None:
        self.writer = writer
        self.requests_made = 0

    @classmethod
    def from_writer(cls, writer: OutboxWriter | None) -> OutboxConnector:
        if writer is None:
            raise ConnectorConfigError(
                "the outbox connector records through the store's outbox writer: "
                "get_connector(channel, settings, outbox=profiles.outbox.OutboxRecorder(engine))"
            )
        return cls(writer)

    def _repr_fields(self) -> dict[str, Any]:
        return {"writer": self.writer}

    def send(self, batch: Sequence[Message]) -> list[Result]:
        self.check_batch(batch)
        if not batch:
            return []
        recorded = self.writer([outbox_row(m) for m in batch])
        self.requests_made += 1
        return [
            Result.sent(m.delivery_id, f"outbox:{m.delivery_id}")
            if m.delivery_id in recorded
            else Result.sent(m.delivery_id, f"outbox:{m.delivery_id}", already_recorded=True)
            for m in batch
        ]
