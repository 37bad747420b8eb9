"""The local outbox: the default connector of every channel, needing no credentials.

Each message is recorded in the store's ``outbox`` table exactly as it would have gone out (recipient,
subject, body, and the full message in ``payload``: HTML and text parts, push title and data, the
unsubscribe URL, an ad-audience action). ``omni outbox list [--channel C] [--json]`` shows them.

Recording is idempotent by delivery id: a message whose delivery id is already in the outbox is
reported ``sent`` again and not written twice. Limits: 1000 messages per batch (one driver-level INSERT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from connectors.base import Channel, Connector, Message, Result


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


class OutboxConnector(Connector):
    provider = "outbox"
    channel = Channel.EMAIL
    channels = frozenset(c.value for c in Channel)
    max_batch_size = 1000
    rate_per_second = None
    settings_used = ("OMNI_DATABASE_URL",)

    def __init__(self, *, engine: Engine, clock: Callable[[], datetime] | None = None) -> None:
        from profiles.db import utcnow

        self.engine = engine
        self.clock = clock or utcnow
        self.requests_made = 0

    @classmethod
    def from_settings(cls, settings: Any, *, engine: Engine | None = None, **kwargs: Any) -> OutboxConnector:
        if engine is None:
            from profiles.db import get_engine

            engine = get_engine(settings.database_url)
        return cls(engine=engine, clock=kwargs.get("clock"))

    def _repr_fields(self) -> dict[str, Any]:
        return {"database": self.engine.url.render_as_string(hide_password=True)}

    def send(self, batch: Sequence[Message]) -> list[Result]:
        from profiles.bulk import insert_rows
        from profiles.db import session_scope
        from profiles.models import OutboxMessage

        self.check_batch(batch)
        if not batch:
            return []
        table = OutboxMessage.__table__
        now = self.clock()
        rows = [
            {
                "delivery_id": m.delivery_id,
                "channel": m.channel,
                "customer_id": m.customer_id,
                "recipient": m.to,
                "template": m.template,
                "subject": m.subject if m.channel == Channel.EMAIL else m.title,
                "body": m.text if m.channel != Channel.ADS else m.action,
                "payload": message_payload(m),
                "sent_at": now,
            }
            for m in batch
        ]
        ids = [r["delivery_id"] for r in rows]
        for attempt in (1, 2):
            try:
                with session_scope(self.engine) as session:
                    existing = _recorded(session, ids)
                    new = [r for r in rows if r["delivery_id"] not in existing]
                    # Driver-level executemany: SQLAlchemy's per-row processing cost more than the INSERT.
                    insert_rows(session, table, new)
                break
            except IntegrityError:
                # Another writer recorded some of them between our SELECT and INSERT: look again once.
                if attempt == 2:
                    raise
        self.requests_made += 1
        return [Result.sent(m.delivery_id, f"outbox:{m.delivery_id}") for m in batch]


def _recorded(session: Any, ids: list[str]) -> set[str]:
    """The delivery ids among ``ids`` already in the outbox (one query, written for the driver)."""
    from profiles.models import OutboxMessage

    connection = session.connection()
    dialect = connection.dialect.name
    if dialect == "postgresql":
        query = "SELECT delivery_id FROM outbox WHERE delivery_id = ANY(%s::text[])"
        return {row[0] for row in connection.exec_driver_sql(query, (ids,))}
    if dialect == "sqlite":
        query = f"SELECT delivery_id FROM outbox WHERE delivery_id IN ({', '.join('?' * len(ids))})"
        return {row[0] for row in connection.exec_driver_sql(query, tuple(ids))}
    table = OutboxMessage.__table__
    return set(session.execute(select(table.c.delivery_id).where(table.c.delivery_id.in_(ids))).scalars())


def list_outbox(session: Any, *, channel: str | None = None, limit: int = 100, offset: int = 0) -> list[dict]:
    """Outbox rows, newest first, as ``{"channel", "customer_id", "to", "template", "subject", "body",
    "sent_at", "delivery_id", "payload"}``."""
    from profiles.models import OutboxMessage

    table = OutboxMessage.__table__
    query = select(table).order_by(table.c.sent_at.desc(), table.c.id.desc()).limit(limit).offset(offset)
    if channel:
        query = query.where(table.c.channel == channel)
    return [
        {
            "channel": row.channel,
            "customer_id": row.customer_id,
            "to": row.recipient,
            "template": row.template,
            "subject": row.subject,
            "body": row.body,
            "sent_at": row.sent_at,
            "delivery_id": row.delivery_id,
            "payload": row.payload,
        }
        for row in session.execute(query)
    ]
