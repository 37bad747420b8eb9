"""One tick over many workers: the due work of a tick split into shards by customer.

**Shards.** Shard ``k`` of ``n`` (:class:`Shard`) is every customer whose ``customer_id % n == k``. All
of a customer's enrollments and deliveries belong to one shard, so everything the engine decides per
customer (the frequency cap, quiet hours, an enrollment parked at its send step, a fallback, an exit)
is decided by the one worker that holds that shard. ``shards=1`` (the default) is today's tick, and on
SQLite a tick always runs as one shard (:func:`shard_count`): SQLite has a single writer, so workers
would only queue behind each other's locks.

**What runs once per tick, and what per shard** (:func:`sequences.tick.run_tick`):

- once, before the shards, in the tick's own run: rebuilding the trigger audiences (one set-based
  statement per audience over every customer), :func:`~sequences.deliveries.recover_interrupted`,
  enrolling new entrants and exiting enrollments (one ``INSERT ... SELECT`` and a few set-based
  statements per sequence: splitting them would only repeat each scan ``n`` times), then the planner's
  statistics when those stages changed enough rows, so that no worker plans on tables as they were
  before the tick enrolled thousands of customers;
- per shard, in any number of workers at once (:func:`sequences.tick.run_shard`): walking due
  enrollments (``walk_due(..., shard=...)``) and dispatching due deliveries
  (``dispatch_due(..., shard=...)``),
  round after round until nothing moves, as a one-shard tick does: the part that grows with the
  messages sent, renders templates and calls providers;
- once, after the shards: the planner's statistics (:func:`profiles.db.refresh_statistics`) when the
  shards together changed enough rows, and failing the tick when a channel halted in any shard.

**Claiming a shard** (:func:`shard_lease`). A worker takes a PostgreSQL session-level advisory lock named
by ``(n, k)`` with ``pg_try_advisory_lock`` on a connection of its own, kept for the whole shard, and
unlocks it when done. A second worker given the same shard (a retried run, a slow shard of the previous
tick still running when the next tick fans out) does not wait: the try fails, it raises
:class:`ShardBusy` and the tick counts that shard as done by its holder; whatever the holder does not
reach stays due for the next tick. Inside a shard, rows are still claimed row by row, so even two
overlapping shard counts (a tick with ``n=4`` next to one with ``n=2``) never double-send: due
enrollments are read ``FOR UPDATE OF enrollments SKIP LOCKED`` in the transaction that walks them (a
row another worker is walking is skipped, not waited for, and is due again for the next round), and a
delivery is only sent after the atomic claim ``pending`` → ``sending``
(:func:`sequences.deliveries.claim`) that one worker wins.

**A worker that dies mid-shard.** Its connections close, so PostgreSQL drops its lease and rolls back
its open batch: enrollments it was walking are still due, deliveries it had not claimed still pending,
and the next tick takes them. Deliveries it had claimed stay ``sending``: after
``policy.sending_timeout`` the next tick's :func:`~sequences.deliveries.recover_interrupted` makes an
email, SMS or push ``unknown`` (never resent: the provider may have it) and puts an ad-audience sync or a
webhook back to ``pending`` (at least once, as today). So nothing is sent twice, and nothing is left
behind beyond one tick. The tick itself ends failed, naming the shard, after the other shards finished.

**Reports.** Each shard counts what it did in a :class:`~sequences.reports.TickReport` of its own and
hands it back (a worker in another process as ``TickReport.shard_dict()``); the tick adds them to the
report it started with the audiences, enrollments and exits (``TickReport.merge``), so the
``sequences-tick`` artifact and the CLI show one tick whatever the number of shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, select

# The first key of a shard's advisory lock: "om" and the number of shards (the second key is the shard).
_LEASE_NAMESPACE = 0x6F6D0000
MAX_SHARDS = 0xFFFF


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the customers whose ``customer_id % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: need 0 <= index < count <= {MAX_SHARDS}")

    @classmethod
    def all(cls, count: int) -> list[Shard]:
        return [cls(index, count) for index in range(count)]

    def owns(self, customer_id: Any) -> ColumnElement:
        """The SQL condition: ``customer_id`` (a column) belongs to this shard."""
        return customer_id % self.count == self.index

    def __str__(self) -> str:
        return f"shard {self.index}/{self.count}"


class ShardBusy(RuntimeError):
    """Another worker holds the shard's lease."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        super().__init__(f"{shard} is being worked on by another worker")


def shard_count(engine: Engine, requested: int) -> int:
    """The shards a tick on ``engine`` runs: ``requested`` on PostgreSQL, 1 on SQLite (one writer)."""
    if requested < 1:
        raise ValueError(f"shards must be at least 1, not {requested}")
    if requested > MAX_SHARDS:
        raise ValueError(f"shards must be at most {MAX_SHARDS}, not {requested}")
    return requested if engine.dialect.name == "postgresql" else 1


@contextmanager
def shard_lease(engine: Engine, shard: Shard) -> Iterator[None]:
    """Hold ``shard`` for the block, or raise :class:`ShardBusy` at once when another worker holds it.

    PostgreSQL: a session-level advisory lock on a connection kept for the block (autocommit, so it
    is never idle in a transaction), released on exit and by the server when the worker's connection
    dies. SQLite (one shard, one writer): nothing to hold.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    keys = (_LEASE_NAMESPACE + shard.count, shard.index)
    with engine.connect() as raw:
        conn = raw.execution_options(isolation_level="AUTOCOMMIT")
        if not conn.execute(select(func.pg_try_advisory_lock(*keys))).scalar():
            raise ShardBusy(shard)
        try:
            yield
        finally:
            try:
                conn.execute(select(func.pg_advisory_unlock(*keys)))
            except Exception:
                raw.invalidate()  # a connection that may still hold the lock never goes back to the pool
                raise
