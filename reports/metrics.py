"""The report's metrics: each one SQL statement (or a few), set-based, the same on SQLite and PostgreSQL.

Every statement is bounded by time (the period, the previous period, the window) and driven from the
small side: orders, buyers, enrollments and deliveries of the period look up their customer's events
through the ``(customer_id, name, occurred_at)`` index; the one read of all the period's events is the
touchpoint activity count (definition 4), and the named support / feedback events are read through the
``(name, occurred_at)`` index. Python only turns the grouped counts into the model.

Touchpoints (definitions 4 to 7) are the customer's own: events on a touchpoint channel that Omni did not
write about them (:meth:`reports.sql.Sql.touchpoint`: ``profiles.models.is_touchpoint`` and
``omni.core.channels.TOUCHPOINTS``) — never a message Omni sent, a staff lookup (``Profile Viewed``) or
an operator's consent change on Omni's own channel.

Merged customers: a merge moves the loser's events, orders and deliveries to the survivor, not its
enrollments, so an enrollment's person is ``COALESCE(customers.merged_into, customers.id)``.

The definitions are the README's ("Reports"); each function's docstring says which one it computes.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

from omni.core.channels import MESSAGE_CHANNELS, PROFILE_VIEWED, TOUCHPOINTS, Channel, Touchpoint
from omni.core.settings import Settings
from omni.core.statuses import DeliveryStatus, EnrollmentStatus
from profiles.control import GLOBAL_CONTROL
from profiles.feedback import EMAIL_LINK_CLICKED, EMAIL_OPENED
from profiles.models import Delivery, Fulfillment
from profiles.segment import ORDER_COMPLETED
from reports import stats
from reports.model import (
    BANDS,
    NO_DATA,
    NOT_SIGNIFICANT,
    SIGNIFICANT,
    TOO_FEW,
    Aov,
    AovBand,
    AovGap,
    ChannelConversion,
    ExitCount,
    Fcr,
    Funnel,
    FunnelStep,
    GlobalControlLift,
    Group,
    JourneyLift,
    Lift,
    MessageChannelRow,
    OrdersRow,
    RateRow,
    Retention,
)
from reports.sql import Sql

# Provider feedback events (profiles.feedback writes them; ``properties.delivery_id`` is the delivery's
# dedupe key, the id handed to the provider) and the profile API's lookup event (profiles.lookup).
EMAIL_CLICKED = EMAIL_LINK_CLICKED

_HOLDOUT = EnrollmentStatus.HOLDOUT.value
_EXITED = EnrollmentStatus.EXITED.value
_SENT = DeliveryStatus.SENT.value
ORDER_EXIT = f"event: {ORDER_COMPLETED}"  # sequences.exits' reason for an exit on Order Completed


def has_feedback_columns() -> bool:
    """The store records provider feedback on deliveries (``delivered_at``, migration 0009)."""
    return "delivered_at" in Delivery.__table__.c


def _rows(conn: Connection, sql: Sql, statement: str) -> list[Any]:
    return list(conn.execute(text(statement), sql.params))


def _num(value: Any) -> float:
    return float(value) if value is not None else 0.0


def _rate(label: str, n: int, x: int) -> RateRow:
    estimate = stats.wilson(x, n)
    return RateRow(
        label,
        customers=n,
        converted=x,
        rate=estimate.value if estimate else None,
        low=estimate.low if estimate else None,
        high=estimate.high if estimate else None,
    )


def _order(label: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(label) if label in order else len(order), label)


# --- Definition 1: journey lift ------------------------------------------------------------------------

# Each (sequence, person)'s first enrollment in the period: its group and its time.
_FIRST_ENROLLMENTS = """
    SELECT sequence, person, enrolled_at, held FROM (
        SELECT e.sequence AS sequence, COALESCE(c.merged_into, c.id) AS person, e.enrolled_at AS enrolled_at,
               CASE WHEN e.status = '{holdout}' THEN 1 ELSE 0 END AS held,
               ROW_NUMBER() OVER (PARTITION BY e.sequence, COALESCE(c.merged_into, c.id)
                                  ORDER BY e.enrolled_at, e.id) AS rn
        FROM enrollments e JOIN customers c ON c.id = e.customer_id
        WHERE e.enrolled_at >= :since AND e.enrolled_at < :until AND e.enrolled_at <= :now
          AND (e.exit_reason IS NULL OR e.exit_reason <> '{global_control}')
    ) ranked WHERE rn = 1"""


def journey_lift(conn: Connection, sql: Sql, *, min_control: int) -> list[JourneyLift]:
    """Definition 1. Per sequence and group: customers, converted (an order in (enrolled_at, enrolled_at
    + window], at or before now), their orders and revenue in that window."""
    statement = f"""
        WITH firsts AS ({_FIRST_ENROLLMENTS.format(holdout=_HOLDOUT, global_control=GLOBAL_CONTROL)}),
        per_person AS (
            SELECT f.sequence AS sequence, f.person AS person, f.held AS held,
                   COUNT(o.order_id) AS orders, COALESCE(SUM(o.total), 0) AS revenue
            FROM firsts f LEFT JOIN orders o ON o.customer_id = f.person
                 AND o.placed_at > f.enrolled_at AND o.placed_at <= {sql.plus("f.enrolled_at")}
                 AND o.placed_at <= :now
            GROUP BY f.sequence, f.person, f.held
        )
        SELECT sequence, held, COUNT(*) AS customers,
               SUM(CASE WHEN orders > 0 THEN 1 ELSE 0 END) AS converted,
               SUM(orders) AS orders, SUM(revenue) AS revenue
        FROM per_person GROUP BY sequence, held ORDER BY sequence, held"""
    groups: dict[str, dict[int, Group]] = defaultdict(dict)
    for row in _rows(conn, sql, statement):
        groups[row.sequence][int(row.held)] = group(
            int(row.customers), int(row.converted), int(row.orders), _num(row.revenue)
        )
    return [
        JourneyLift(
            sequence,
            messaged=arms.get(0, Group()),
            held_out=arms.get(1, Group()),
            lift=lift(arms.get(0, Group()), arms.get(1, Group()), min_control=min_control),
        )
        for sequence, arms in sorted(groups.items())
    ]


def group(customers: int, converted: int, orders: int, revenue: float) -> Group:
    estimate = stats.wilson(converted, customers)
    return Group(
        customers=customers,
        converted=converted,
        orders=orders,
        revenue=revenue,
        rate=estimate.value if estimate else None,
        rate_low=estimate.low if estimate else None,
        rate_high=estimate.high if estimate else None,
        revenue_per_customer=revenue / customers if customers else None,
    )


def lift(messaged: Group, held_out: Group, *, min_control: int) -> Lift:
    """Messaged against held out (the Lift docstring in reports.model says what each figure is)."""
    if not messaged.customers and not held_out.customers:
        return Lift(verdict=NO_DATA)
    result = Lift()
    estimate = stats.newcombe(messaged.converted, messaged.customers, held_out.converted, held_out.customers)
    if estimate is not None:
        result.absolute, result.low, result.high = estimate.value, estimate.low, estimate.high
        result.p_value = estimate.p_value
        base = held_out.converted / held_out.customers
        if base > 0:
            result.relative = estimate.value / base
            result.relative_low, result.relative_high = estimate.low / base, estimate.high / base
        n = messaged.customers
        result.incremental_conversions = estimate.value * n
        result.incremental_orders = (messaged.orders / n - held_out.orders / held_out.customers) * n
        result.incremental_revenue = (messaged.revenue / n - held_out.revenue / held_out.customers) * n
    if held_out.customers < min_control or messaged.customers < min_control or estimate is None:
        result.verdict = TOO_FEW
    elif estimate.low > 0 or estimate.high < 0:
        result.verdict = SIGNIFICANT
    else:
        result.verdict = NOT_SIGNIFICANT
    return result


# --- Definition 2: the global control group ------------------------------------------------------------


def global_control(conn: Connection, sql: Sql, *, settings: Settings) -> GlobalControlLift:
    """Definition 2. Customers (every customer not merged into another): held out = in the
    ``global_control`` record at any time in the period, messaged = everyone else; converted = an order
    in the period."""
    share = settings.global_control_share
    result = GlobalControlLift(enabled=False, share=share, salt=settings.global_control_salt or None)
    rows = _rows(
        conn,
        sql,
        f"""
        WITH members AS (
            SELECT DISTINCT customer_id FROM global_control
            WHERE entered_at < :until AND entered_at <= :now AND (exited_at IS NULL OR exited_at > :since)
        ),
        buyers AS (
            SELECT o.customer_id AS customer_id, COUNT(*) AS orders, SUM(o.total) AS revenue
            FROM orders o WHERE {_PERIOD_ORDERS} GROUP BY o.customer_id
        )
        SELECT CASE WHEN m.customer_id IS NULL THEN 0 ELSE 1 END AS held, COUNT(*) AS customers,
               COUNT(b.customer_id) AS converted, COALESCE(SUM(b.orders), 0) AS orders,
               COALESCE(SUM(b.revenue), 0) AS revenue
        FROM customers c LEFT JOIN members m ON m.customer_id = c.id
             LEFT JOIN buyers b ON b.customer_id = c.id
        WHERE c.merged_into IS NULL
        GROUP BY 1""",
    )
    arms = {
        int(r.held): group(int(r.customers), int(r.converted), int(r.orders), _num(r.revenue)) for r in rows
    }
    result.messaged, result.held_out = arms.get(0, Group()), arms.get(1, Group())
    result.enabled = result.held_out.customers > 0 or share > 0
    if result.enabled:
        result.lift = lift(result.messaged, result.held_out, min_control=settings.report_min_control)
    return result


# --- Definition 3: journey funnels ---------------------------------------------------------------------

_PERIOD_ENROLLMENTS = "e.enrolled_at >= :since AND e.enrolled_at < :until AND e.enrolled_at <= :now"


def funnels(conn: Connection, sql: Sql, journeys: list[JourneyLift]) -> list[Funnel]:
    """Definition 3: per sequence, step and channel, the deliveries of the period's enrollments."""
    feedback = has_feedback_columns()
    delivered = (
        "COUNT(DISTINCT CASE WHEN d.delivered_at IS NOT NULL THEN d.customer_id END)" if feedback else "NULL"
    )
    steps = _rows(
        conn,
        sql,
        f"""
        SELECT e.sequence AS sequence, d.step_id AS step, d.channel AS channel,
               MIN(d.created_at) AS first_at,
               COUNT(DISTINCT d.customer_id) AS reached,
               COUNT(DISTINCT CASE WHEN d.status = '{_SENT}' THEN d.customer_id END) AS sent,
               {delivered} AS delivered
        FROM enrollments e JOIN deliveries d ON d.enrollment_id = e.id
        WHERE {_PERIOD_ENROLLMENTS}
        GROUP BY e.sequence, d.step_id, d.channel""",
    )
    sql.bind("opened_event", EMAIL_OPENED)
    sql.bind("clicked_event", EMAIL_CLICKED)
    sql.bind("delivery_key", "delivery_id")
    engaged = _rows(
        conn,
        sql,
        f"""
        SELECT e.sequence AS sequence, d.step_id AS step, d.channel AS channel, ev.name AS name,
               COUNT(DISTINCT d.customer_id) AS customers
        FROM events ev
        JOIN deliveries d ON d.dedupe_key = {sql.prop("ev.properties", "delivery_key")}
        JOIN enrollments e ON e.id = d.enrollment_id
        WHERE ev.name IN (:opened_event, :clicked_event) AND ev.occurred_at >= :since
          AND ev.occurred_at <= :now AND {_PERIOD_ENROLLMENTS}
        GROUP BY e.sequence, d.step_id, d.channel, ev.name""",
    )
    converted = _rows(
        conn,
        sql,
        f"""
        WITH sends AS (
            SELECT DISTINCT e.sequence AS sequence, d.step_id AS step, d.channel AS channel,
                   d.customer_id AS customer_id, d.sent_at AS sent_at
            FROM enrollments e JOIN deliveries d ON d.enrollment_id = e.id
            WHERE {_PERIOD_ENROLLMENTS} AND d.status = '{_SENT}' AND d.sent_at IS NOT NULL
        ),
        pairs AS (
            SELECT DISTINCT s.sequence AS sequence, s.step AS step, s.channel AS channel,
                   s.customer_id AS customer_id, o.order_id AS order_id, o.total AS total
            FROM sends s JOIN orders o ON o.customer_id = s.customer_id
                 AND o.placed_at > s.sent_at AND o.placed_at <= {sql.plus("s.sent_at")}
                 AND o.placed_at <= :now
        )
        SELECT sequence, step, channel, COUNT(DISTINCT customer_id) AS customers, COUNT(*) AS orders,
               SUM(total) AS revenue
        FROM pairs GROUP BY sequence, step, channel""",
    )
    exits = exit_counts(conn, sql)
    opened = {(r.sequence, r.step, r.channel, r.name): int(r.customers) for r in engaged}
    bought = {(r.sequence, r.step, r.channel): r for r in converted}
    by_sequence: dict[str, list[tuple[Any, FunnelStep]]] = defaultdict(list)
    for row in steps:
        key = (row.sequence, row.step, row.channel)
        email = row.channel == Channel.EMAIL.value
        sold = bought.get(key)
        step = FunnelStep(
            step=row.step,
            channel=row.channel,
            reached=int(row.reached),
            sent=int(row.sent),
            delivered=int(row.delivered) if row.delivered is not None else None,
            opened=opened.get((*key, EMAIL_OPENED), 0) if email else None,
            clicked=opened.get((*key, EMAIL_CLICKED), 0) if email else None,
            converted=int(sold.customers) if sold else 0,
            orders=int(sold.orders) if sold else 0,
            revenue=_num(sold.revenue) if sold else 0.0,
        )
        by_sequence[row.sequence].append((row.first_at, step))
    enrolled = {j.sequence: j.messaged.customers + j.held_out.customers for j in journeys}
    names = sorted(set(enrolled) | set(by_sequence) | set(exits))
    result = []
    for name in names:
        ordered = [
            step for _, step in sorted(by_sequence.get(name, []), key=lambda p: (str(p[0]), p[1].step))
        ]
        result.append(
            Funnel(
                sequence=name,
                enrolled=enrolled.get(name, 0),
                steps=ordered,
                exits=exits.get(name, []),
                feedback=feedback and any(s.delivered for s in ordered),
            )
        )
    return result


def exit_counts(conn: Connection, sql: Sql) -> dict[str, list[ExitCount]]:
    """Exits of the period's enrollments by reason (customers). An exit on Order Completed is told apart
    by the first order after enrollment (at or before the exit): ``bought at the till`` (fulfillment
    in_store or the store channel), ``bought online, picked up in store`` (fulfillment pickup), else
    ``bought online``."""
    sql.bind("order_exit", ORDER_EXIT)
    rows = _rows(
        conn,
        sql,
        f"""
        WITH exits AS (
            SELECT e.id AS id, e.sequence AS sequence, COALESCE(c.merged_into, c.id) AS person,
                   e.enrolled_at AS enrolled_at, e.exited_at AS exited_at,
                   COALESCE(e.exit_reason, '') AS rule
            FROM enrollments e JOIN customers c ON c.id = e.customer_id
            WHERE {_PERIOD_ENROLLMENTS} AND e.status = '{_EXITED}'
        ),
        first_orders AS (
            SELECT x.id AS id, o.channel AS channel, o.fulfillment AS fulfillment,
                   ROW_NUMBER() OVER (PARTITION BY x.id ORDER BY o.placed_at, o.order_id) AS rn
            FROM exits x JOIN orders o ON o.customer_id = x.person
                 AND o.placed_at > x.enrolled_at AND o.placed_at <= x.exited_at
            WHERE x.rule = :order_exit
        )
        SELECT x.sequence AS sequence, x.rule AS rule,
               CASE WHEN x.rule <> :order_exit THEN x.rule
                    WHEN f.id IS NULL THEN x.rule
                    WHEN f.fulfillment = '{Fulfillment.IN_STORE.value}'
                         OR f.channel = '{Touchpoint.STORE.value}' THEN 'bought at the till'
                    WHEN f.fulfillment = '{Fulfillment.PICKUP.value}' THEN 'bought online, picked up in store'
                    ELSE 'bought online' END AS reason,
               COUNT(DISTINCT x.person) AS customers
        FROM exits x LEFT JOIN first_orders f ON f.id = x.id AND f.rn = 1
        GROUP BY x.sequence, x.rule, 3
        ORDER BY x.sequence, 4 DESC, 3""",
    )
    result: dict[str, list[ExitCount]] = defaultdict(list)
    for row in rows:
        result[row.sequence].append(ExitCount(reason=row.reason, customers=int(row.customers), rule=row.rule))
    return result


# --- Definition 4: conversion by channel ---------------------------------------------------------------

_PERIOD_ORDERS = "o.placed_at >= :since AND o.placed_at < :until AND o.placed_at <= :now"
# Orders a message or an activity of the period can have led to (within the window after it).
_ATTRIBUTABLE_ORDERS = "o.placed_at > :since AND o.placed_at <= :until_plus_window AND o.placed_at <= :now"


def _event_in_period(alias: str) -> str:
    return f"{alias}.occurred_at >= :since AND {alias}.occurred_at < :until AND {alias}.occurred_at <= :now"


# The orders a touchpoint event of the period can have led to (attributable: placed in (since, until +
# window]) and the orders of the period (whose paths are counted): both sets, each order flagged.
_NEAR_ORDERS = "o.placed_at >= :since AND o.placed_at <= :until_plus_window AND o.placed_at <= :now"


def _order_touches(sql: Sql) -> str:
    """CTEs ``near`` (the orders of :data:`_NEAR_ORDERS`, each with ``window_start`` = placed_at − window
    and the flags ``in_period`` and ``attributable``) and ``touches`` (order_id, customer_id, channel,
    occurred_at, placed_at, in_period, attributable): the customer's touchpoint events in [placed_at −
    window, placed_at] (at or before now), looked up by customer through the ``(customer_id, name,
    occurred_at)`` index: driven from the orders, not from a scan of the events, and done once for both
    the touchpoint conversions and the paths."""
    return f"""
        near AS MATERIALIZED (
            SELECT o.order_id AS order_id, o.customer_id AS customer_id, o.channel AS channel,
                   o.total AS total, o.placed_at AS placed_at, {sql.minus("o.placed_at")} AS window_start,
                   CASE WHEN {_PERIOD_ORDERS} THEN 1 ELSE 0 END AS in_period,
                   CASE WHEN {_ATTRIBUTABLE_ORDERS} THEN 1 ELSE 0 END AS attributable
            FROM orders o WHERE {_NEAR_ORDERS}
        ),
        touches AS MATERIALIZED (
            SELECT n.order_id AS order_id, n.customer_id AS customer_id, ev.channel AS channel,
                   ev.occurred_at AS occurred_at, n.placed_at AS placed_at, n.in_period AS in_period,
                   n.attributable AS attributable
            FROM near n CROSS JOIN events ev
            WHERE ev.customer_id = n.customer_id AND ev.occurred_at >= n.window_start
              AND ev.occurred_at <= n.placed_at AND ev.occurred_at <= :now AND {sql.touchpoint("ev")}
        )"""


def channel_conversion(conn: Connection, sql: Sql) -> ChannelConversion:
    """Definition 4."""
    # The one read of the period's events: who was active on each touchpoint channel.
    active = _rows(
        conn,
        sql,
        f"""
        SELECT ev.channel AS channel, COUNT(DISTINCT ev.customer_id) AS customers
        FROM {sql.scan("events", "ev")} WHERE {_event_in_period("ev")} AND {sql.touchpoint("ev")}
        GROUP BY ev.channel""",
    )
    # Who of them bought within the window after one of those events (driven from the orders a period's
    # event can have led to, each looking up its customer's events of the window before it), and the
    # period's orders by their path, from the same look-ups.
    converted: dict[str, int] = {}
    path_rows: dict[str, Any] = {}
    for r in _rows(
        conn,
        sql,
        f"""
        WITH {_order_touches(sql)},
        touched AS (
            SELECT order_id, channel FROM touches WHERE in_period = 1
            UNION
            SELECT order_id, channel FROM near WHERE in_period = 1
        ),
        counted AS (SELECT order_id, COUNT(*) AS channels FROM touched GROUP BY order_id)
        SELECT 'converted' AS part, channel AS label, COUNT(DISTINCT customer_id) AS customers,
               NULL AS orders, NULL AS revenue
        FROM touches
        WHERE attributable = 1 AND occurred_at < placed_at AND {_event_in_period("touches")}
        GROUP BY channel
        UNION ALL
        SELECT 'path' AS part, CASE WHEN n.channels >= 2 THEN 'cross' ELSE 'single' END AS label,
               COUNT(DISTINCT po.customer_id) AS customers, COUNT(*) AS orders, SUM(po.total) AS revenue
        FROM near po JOIN counted n ON n.order_id = po.order_id
        GROUP BY 2""",
    ):
        if r.part == "converted":
            converted[r.label] = int(r.customers)
        else:
            path_rows[r.label] = r
    touchpoints = [
        _rate(r.channel, int(r.customers), converted.get(r.channel, 0))
        for r in sorted(active, key=lambda r: _order(r.channel, TOUCHPOINTS))
    ]
    placed = [
        OrdersRow(
            r.channel,
            customers=int(r.customers),
            orders=int(r.orders),
            revenue=_num(r.revenue),
            aov=_num(r.revenue) / int(r.orders) if r.orders else None,
        )
        for r in sorted(
            _rows(
                conn,
                sql,
                f"""
                SELECT o.channel AS channel, COUNT(DISTINCT o.customer_id) AS customers, COUNT(*) AS orders,
                       SUM(o.total) AS revenue
                FROM orders o WHERE {_PERIOD_ORDERS} GROUP BY o.channel""",
            ),
            key=lambda r: _order(r.channel, TOUCHPOINTS),
        )
    ]
    return ChannelConversion(
        touchpoints=touchpoints, placed=placed, messages=message_channels(conn, sql), paths=paths(path_rows)
    )


def message_channels(conn: Connection, sql: Sql) -> list[MessageChannelRow]:
    """Definition 4, message channels: sent deliveries (sequences and campaigns) of the period."""
    channels = sql.literals(MESSAGE_CHANNELS)
    sent_in_period = (
        f"d.status = '{_SENT}' AND d.channel IN ({channels}) AND d.sent_at >= :since "
        "AND d.sent_at < :until AND d.sent_at <= :now"
    )
    messaged = {
        r.channel: int(r.customers)
        for r in _rows(
            conn,
            sql,
            f"""SELECT d.channel AS channel, COUNT(DISTINCT d.customer_id) AS customers
                FROM deliveries d WHERE {sent_in_period} GROUP BY d.channel""",
        )
    }
    touches = {
        r.channel: r
        for r in _rows(
            conn,
            sql,
            f"""
            WITH touches AS (
                SELECT o.order_id AS order_id, o.customer_id AS customer_id, o.total AS total,
                       d.channel AS channel,
                       ROW_NUMBER() OVER (PARTITION BY o.order_id ORDER BY d.sent_at DESC, d.id DESC) AS rn
                FROM orders o JOIN deliveries d ON d.customer_id = o.customer_id
                WHERE {_ATTRIBUTABLE_ORDERS} AND {sent_in_period}
                  AND d.sent_at < o.placed_at AND d.sent_at >= {sql.minus("o.placed_at")}
            ),
            per_order AS (
                SELECT channel, order_id, customer_id, total, MAX(CASE WHEN rn = 1 THEN 1 ELSE 0 END) AS last
                FROM touches GROUP BY channel, order_id, customer_id, total
            )
            SELECT channel, COUNT(DISTINCT customer_id) AS converted, COUNT(*) AS any_orders,
                   SUM(total) AS any_revenue, SUM(last) AS last_orders, SUM(last * total) AS last_revenue
            FROM per_order GROUP BY channel""",
        )
    }
    rows = []
    for channel in MESSAGE_CHANNELS:
        n = messaged.get(channel, 0)
        touch = touches.get(channel)
        rate = _rate(channel, n, int(touch.converted) if touch else 0)
        rows.append(
            MessageChannelRow(
                channel,
                messaged=n,
                converted=rate.converted,
                rate=rate.rate,
                low=rate.low,
                high=rate.high,
                last_touch_orders=int(touch.last_orders) if touch else 0,
                last_touch_revenue=_num(touch.last_revenue) if touch else 0.0,
                any_touch_orders=int(touch.any_orders) if touch else 0,
                any_touch_revenue=_num(touch.any_revenue) if touch else 0.0,
            )
        )
    return rows


def paths(found: dict[str, Any]) -> list[OrdersRow]:
    """Definition 4, paths: each order of the period by the distinct channels of its path (the customer's
    touchpoint events in [placed_at − window, placed_at], and the channel it was placed on): ``found``
    maps ``single`` / ``cross`` to its row (customers, orders, revenue)."""
    result = []
    for kind in ("single", "cross"):
        r = found.get(kind)
        orders = int(r.orders) if r else 0
        revenue = _num(r.revenue) if r else 0.0
        result.append(
            OrdersRow(
                kind,
                customers=int(r.customers) if r else 0,
                orders=orders,
                revenue=revenue,
                aov=revenue / orders if orders else None,
            )
        )
    return result


# --- Definitions 5 and 6: retention and AOV by distinct touchpoint channels --------------------------------

_BAND = "CASE WHEN n.channels >= 3 THEN '3+' WHEN n.channels = 2 THEN '2' ELSE '1' END"


def _channels_used(sql: Sql, orders_cte: str, since: str, until: str) -> str:
    """CTEs ``used`` and ``counted`` (customer_id, channels): the distinct touchpoint channels of the
    customers of ``orders_cte`` in [since, until): their touchpoint events' and their orders'. Driven from
    the buyers: each looks up its own events through the ``(customer_id, name, occurred_at)`` index."""
    return f"""
        buyers AS MATERIALIZED (SELECT DISTINCT customer_id FROM {orders_cte}),
        used AS (
            SELECT b.customer_id AS customer_id, ev.channel AS channel
            FROM buyers b CROSS JOIN events ev
            WHERE ev.customer_id = b.customer_id AND ev.occurred_at >= {since} AND ev.occurred_at < {until}
              AND ev.occurred_at <= :now AND {Sql.touchpoint("ev")}
            UNION
            SELECT customer_id, channel FROM {orders_cte}
        ),
        counted AS (SELECT customer_id, COUNT(*) AS channels FROM used GROUP BY customer_id)"""


def retention(conn: Connection, sql: Sql) -> Retention:
    """Definition 5."""
    rows = _rows(
        conn,
        sql,
        f"""
        WITH before AS (
            SELECT o.customer_id AS customer_id, o.channel AS channel FROM orders o
            WHERE o.placed_at >= :prev_since AND o.placed_at < :since AND o.placed_at <= :now
        ),
        {_channels_used(sql, "before", ":prev_since", ":since")},
        again AS (SELECT DISTINCT o.customer_id AS customer_id FROM orders o WHERE {_PERIOD_ORDERS})
        SELECT {_BAND} AS band, COUNT(*) AS customers,
               SUM(CASE WHEN a.customer_id IS NOT NULL THEN 1 ELSE 0 END) AS retained
        FROM counted n LEFT JOIN again a ON a.customer_id = n.customer_id
        GROUP BY 1""",
    )
    found = {r.band: (int(r.customers), int(r.retained)) for r in rows}
    bands = [_rate(band, *found.get(band, (0, 0))) for band in BANDS]
    single = found.get("1", (0, 0))
    multi = tuple(sum(found.get(band, (0, 0))[i] for band in BANDS[1:]) for i in (0, 1))
    estimate = stats.newcombe(multi[1], multi[0], single[1], single[0])
    return Retention(
        previous_since=None,
        previous_until=None,
        bands=bands,
        difference=estimate.value if estimate else None,
        low=estimate.low if estimate else None,
        high=estimate.high if estimate else None,
        p_value=estimate.p_value if estimate else None,
    )


def aov(conn: Connection, sql: Sql) -> Aov:
    """Definition 6."""
    rows = _rows(
        conn,
        sql,
        f"""
        WITH po AS (
            SELECT o.customer_id AS customer_id, o.channel AS channel, o.total AS total FROM orders o
            WHERE {_PERIOD_ORDERS}
        ),
        {_channels_used(sql, "po", ":since", ":until")}
        SELECT {_BAND} AS band, COUNT(DISTINCT po.customer_id) AS customers, COUNT(*) AS orders,
               SUM(po.total) AS revenue, SUM(po.total * po.total) AS squares
        FROM po JOIN counted n ON n.customer_id = po.customer_id
        GROUP BY 1""",
    )
    found = {r.band: r for r in rows}
    moments: dict[str, stats.Moments] = {}
    bands = []
    for band in BANDS:
        r = found.get(band)
        m = (
            stats.Moments(int(r.orders), _num(r.revenue), _num(r.squares))
            if r
            else stats.Moments(0, 0.0, 0.0)
        )
        moments[band] = m
        bands.append(
            AovBand(
                band,
                customers=int(r.customers) if r else 0,
                orders=m.n,
                revenue=m.total,
                aov=m.mean,
                sd=m.sd,
            )
        )
    moments["2+"] = stats.Moments(
        moments["2"].n + moments["3+"].n,
        moments["2"].total + moments["3+"].total,
        moments["2"].squares + moments["3+"].squares,
    )
    gaps = []
    for label in ("2+", "2", "3+"):
        estimate = stats.welch(moments[label], moments["1"])
        gaps.append(
            AovGap(
                label,
                "1",
                difference=estimate.value if estimate else None,
                low=estimate.low if estimate else None,
                high=estimate.high if estimate else None,
                p_value=estimate.p_value if estimate else None,
            )
        )
    return Aov(bands=bands, gaps=gaps)


# --- Definition 7: first-contact resolution ------------------------------------------------------------


def fcr(conn: Connection, sql: Sql, *, contact: str, resolved: str, ticket: str) -> Fcr:
    """Definition 7. Tickets first resolved in the period that have at least one contact at or before
    that resolution."""
    sql.bind("contact_event", contact)
    sql.bind("resolved_event", resolved)
    sql.bind("ticket_key", ticket)
    sql.bind("profile_viewed", PROFILE_VIEWED)
    contact_ticket = sql.prop("c.properties", "ticket_key")
    resolved_ticket = sql.prop("r.properties", "ticket_key")
    rows = _rows(
        conn,
        sql,
        f"""
        WITH resolutions AS (
            SELECT {resolved_ticket} AS ticket, MIN(r.occurred_at) AS resolved_at
            FROM events r WHERE r.name = :resolved_event AND r.occurred_at <= :now
            GROUP BY {resolved_ticket}
        ),
        resolved AS (
            SELECT ticket, resolved_at FROM resolutions
            WHERE ticket IS NOT NULL AND resolved_at >= :since AND resolved_at < :until
        ),
        contact_events AS MATERIALIZED (
            SELECT {contact_ticket} AS ticket, c.id AS id, c.customer_id AS customer_id, c.channel AS channel,
                   c.occurred_at AS occurred_at
            FROM events c WHERE c.name = :contact_event AND c.occurred_at <= :now
        ),
        contacts AS (
            SELECT t.ticket AS ticket, t.resolved_at AS resolved_at, c.customer_id AS customer_id,
                   c.channel AS channel, c.occurred_at AS occurred_at,
                   ROW_NUMBER() OVER (PARTITION BY t.ticket ORDER BY c.occurred_at, c.id) AS rn,
                   COUNT(*) OVER (PARTITION BY t.ticket) AS contacts
            FROM contact_events c JOIN resolved t ON t.ticket = c.ticket
            WHERE c.occurred_at <= t.resolved_at
        ),
        tickets AS (
            SELECT f.ticket AS ticket, f.channel AS channel, f.contacts AS contacts,
                   CASE WHEN EXISTS (
                       SELECT 1 FROM events p WHERE p.customer_id = f.customer_id AND p.name = :contact_event
                          AND p.channel <> f.channel AND {sql.touchpoint("p")}
                          AND p.occurred_at < f.occurred_at
                          AND p.occurred_at >= {sql.minus("f.occurred_at", "recent")}
                   ) THEN 1 ELSE 0 END AS followed,
                   CASE WHEN EXISTS (
                       SELECT 1 FROM events v WHERE v.customer_id = f.customer_id AND v.name = :profile_viewed
                          AND v.occurred_at >= f.occurred_at AND v.occurred_at <= f.resolved_at
                   ) THEN 1 ELSE 0 END AS context
            FROM contacts f WHERE f.rn = 1
        )
        SELECT channel, followed, context, COUNT(*) AS tickets,
               SUM(CASE WHEN contacts = 1 THEN 1 ELSE 0 END) AS first_contact
        FROM tickets GROUP BY channel, followed, context""",
    )
    by_channel: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    split = {key: [0, 0] for key in ("all", "followed", "not_followed", "context", "no_context")}
    for r in rows:
        n, x = int(r.tickets), int(r.first_contact)
        keys = ["all", "followed" if r.followed else "not_followed", "context" if r.context else "no_context"]
        for key in keys:
            split[key][0] += n
            split[key][1] += x
        by_channel[r.channel][0] += n
        by_channel[r.channel][1] += x
    return Fcr(
        overall=_rate("all", *split["all"]),
        by_channel=[
            _rate(ch, *by_channel[ch]) for ch in sorted(by_channel, key=lambda c: _order(c, TOUCHPOINTS))
        ],
        after_other_channel=_rate("after another channel", *split["followed"]),
        no_recent_contact=_rate("no recent contact", *split["not_followed"]),
        with_context=_rate("with context", *split["context"]),
        without_context=_rate("without context", *split["no_context"]),
    )


def bind_period(
    sql: Sql, *, since: datetime, until: datetime, now: datetime, window: timedelta, recent: timedelta
) -> None:
    """The parameters every statement uses."""
    from reports.sql import whole_seconds  # noqa: PLC0415

    window = whole_seconds(window)
    sql.bind_time("since", since)
    sql.bind_time("until", until)
    sql.bind_time("now", now)
    sql.bind_time("prev_since", since - (until - since))
    sql.bind_time("until_plus_window", until + window)
    sql.bind_span("window", window)
    sql.bind_span("recent", recent)
