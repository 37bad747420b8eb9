"""One-off campaigns: an audience, a channel, a template and a time to send.

``send_campaign`` builds the audience at ``now``, creates one delivery per member (unique per campaign
and customer, so sending twice sends nothing new) and dispatches them through the same dispatcher as
sequences: the same consent, quiet-hours, frequency-cap and exactly-once guarantees. Messages postponed
by quiet hours or the cap go out with a later ``run-sequences`` tick (or the next ``send_campaign``).
Members of the global control group (:mod:`profiles.control`) get a delivery recorded as ``skipped``
with the reason ``global_control``, and nothing is sent to them.
"""

from __future__ import annotations

import time as time_module
from collections.abc import Callable, Mapping
from datetime import datetime

from sqlalchemy import Engine, String, and_, case, cast, literal, select
from sqlalchemy.orm import Session

from audiences import build_audiences, load_audiences
from connectors import Connector, RetryPolicy
from omni.core.channels import spec
from omni.core.collector import frozen_heap
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus
from profiles.bulk import dialect_insert
from profiles.control import GLOBAL_CONTROL, GlobalControl, in_control_sql, record_control
from profiles.db import session_scope
from profiles.models import AudienceMembership, Customer, Delivery
from sequences.definitions import CampaignDefinition, SequenceDefinition, load_campaigns, load_sequences
from sequences.deliveries import provider_of, recover_interrupted
from sequences.dispatch import Dispatcher, dispatch_due
from sequences.gate import DeliveryPolicy
from sequences.reports import DeliveryHalted, TickReport


class UnknownCampaign(KeyError):
    def __str__(self) -> str:
        known = ", ".join(self.args[1]) or "none: add campaigns/<name>.yaml"
        return f"unknown campaign {self.args[0]!r} (known: {known})"


def create_campaign_deliveries(
    session: Session,
    campaign: CampaignDefinition,
    *,
    now: datetime,
    settings: Settings,
    control: GlobalControl | None = None,
) -> int:
    """One pending delivery per current member of the campaign's audience; existing ones are kept. A
    member of the global ``control`` group gets a ``skipped`` one (reason ``global_control``) instead.
    Returns the pending deliveries created."""
    members = AudienceMembership.__table__
    customers = Customer.__table__
    deliveries = Delivery.__table__
    controlled = in_control_sql(members.c.customer_id, control)
    pending = DeliveryStatus.PENDING.value
    chosen = (
        select(
            literal(f"campaign:{campaign.name}:") + cast(members.c.customer_id, String),
            literal(campaign.name),
            literal("send"),
            members.c.customer_id,
            literal(campaign.channel),
            literal(provider_of(campaign.channel, settings)),
            literal(campaign.template),
            case((controlled, literal(DeliveryStatus.SKIPPED.value)), else_=literal(pending)),
            case((controlled, literal(GLOBAL_CONTROL)), else_=literal(None, type_=deliveries.c.error.type)),
            literal(0),
            literal(spec(campaign.channel).marketing),
            literal(now, type_=deliveries.c.next_attempt_at.type),
            literal(now, type_=deliveries.c.created_at.type),
            literal(now, type_=deliveries.c.updated_at.type),
        )
        .join(customers, and_(customers.c.id == members.c.customer_id, customers.c.merged_into.is_(None)))
        .where(members.c.audience == campaign.audience, members.c.exited_at.is_(None))
    )
    statement = (
        dialect_insert(session, deliveries)
        .from_select(
            [
                "dedupe_key",
                "campaign",
                "step_id",
                "customer_id",
                "channel",
                "connector",
                "template",
                "status",
                "error",
                "attempts",
                "marketing",
                "next_attempt_at",
                "created_at",
                "updated_at",
            ],
            chosen,
        )
        .on_conflict_do_nothing()
        .returning(deliveries.c.status)
    )
    return sum(1 for (status,) in session.execute(statement).all() if status == pending)


def send_campaign(
    engine: Engine,
    name: str,
    *,
    now: datetime,
    settings: Settings,
    policy: DeliveryPolicy | None = None,
    retry_policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time_module.sleep,
    campaigns: Mapping[str, CampaignDefinition] | None = None,
    sequences: Mapping[str, SequenceDefinition] | None = None,
    connectors: Mapping[str, Connector] | None = None,
) -> tuple[int, TickReport]:
    """Send campaign ``name`` at ``now``; returns (deliveries created, report).

    Args:
        settings: the settings (credentials resolved); the definitions' folders, the delivery policy
            and the connectors come from them unless given here.
        campaigns, sequences: definitions (default: loaded from the settings' folders). The sequences
            are those whose enrollments move on when a send a crash interrupted is recovered here.
    """
    definitions = campaigns if campaigns is not None else load_campaigns(settings.campaigns_dir)
    if name not in definitions:
        raise UnknownCampaign(name, sorted(definitions))
    campaign = definitions[name]
    audience_definitions = load_audiences(settings.audiences_dir)
    if campaign.audience not in audience_definitions:
        raise UnknownCampaign(f"{name}: its audience {campaign.audience!r} is not defined", [])
    if sequences is None:
        sequences = load_sequences(settings.sequences_dir, audiences=audience_definitions)
    policy = policy or DeliveryPolicy.from_settings(settings)
    report = TickReport(now=now)
    built = build_audiences(engine, names=[campaign.audience], now=now, definitions=audience_definitions)
    report.audiences = {key: result.as_dict() for key, result in built.items()}
    report.campaigns[name]  # noqa: B018 - the campaign appears in the report even with nothing to send
    with session_scope(engine) as session:
        recover_interrupted(session, now=now, policy=policy, report=report, sequences=sequences)
        control = GlobalControl.of(settings)
        record_control(session, control, now=now)
        created = create_campaign_deliveries(session, campaign, now=now, settings=settings, control=control)
    dispatcher = Dispatcher(
        engine=engine,
        now=now,
        settings=settings,
        policy=policy,
        sequences=sequences,
        campaigns=definitions,
        report=report,
        retry_policy=retry_policy,
        sleep=sleep,
        connectors=dict(connectors or {}),
    )
    try:
        # Fallback deliveries are created while dispatching: go round until nothing is due.
        with frozen_heap():
            while dispatch_due(dispatcher, campaign=name):
                pass
    finally:
        dispatcher.close()
    if report.halted:  # nothing lost: those deliveries stay due for the first send after the fix
        halted = DeliveryHalted(report)
        halted.created = created
        raise halted
    return created, report
