"""Write-behind: a tick's batch written by the database while the next batch is read and worked out.

A tick walks and dispatches in batches, each read, worked out in Python (the walk's steps, the gate,
rendering) and written. On PostgreSQL the writes are the server's work and the rest this process's, so
done one after the other each waits for the other. :class:`WriteBehind` runs a batch's writes in a
thread of its own, on a connection of its own, while the caller goes on with the next batch: at most one
batch is being written at a time, :meth:`WriteBehind.write` first waits for the one before (and raises
its error, if any), and leaving the ``with`` block waits for the last. What may be written behind, and
what the caller must wait for before going on, is the caller's rule: :func:`sequences.walking.walk_due`
(a batch of enrollments locked and walked in its own transaction) and :func:`sequences.dispatch.
dispatch_due` (nothing of the next batch claimed before the batch before is recorded) say theirs.

On SQLite (in-process, one writer) every write is done at once, in the caller's thread.

A write reports what it counted in a :class:`~sequences.reports.TickReport` of its own, which the caller's
report takes in (``TickReport.merge``) once the write is done, in the caller's thread: reports are never
shared between threads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine

from sequences.reports import TickReport


class WriteBehind:
    """Writes of a batch, one at a time, behind the reading of the next (PostgreSQL); see the module."""

    def __init__(self, engine: Engine, report: TickReport, *, name: str) -> None:
        self.report = report
        self.background = engine.dialect.name == "postgresql"
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._writing: Future[TickReport] | None = None

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_exc: Any) -> None:
        try:
            if kind is None:
                self.wait()
            else:  # the error under way is the one raised; what was handed over is still written
                try:
                    self.wait()
                except Exception:  # noqa: BLE001, S110 - the caller's error is the one to raise
                    pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    @property
    def busy(self) -> bool:
        """Whether a write is under way."""
        return self._writing is not None

    def wait(self) -> None:
        """Until the write under way is done; its error, if any, is raised here."""
        if self._writing is None:
            return
        writing, self._writing = self._writing, None
        self.report.merge(writing.result())

    def write(self, write: Callable[..., TickReport], *args: Any, behind: bool = True) -> None:
        """Once the write before is done, ``write(*args, report)`` (``report``: a fresh TickReport it counts
        in, taken into the caller's when done): in the background on PostgreSQL when ``behind``, else
        now."""
        self.wait()
        scratch = TickReport(now=self.report.now)
        if not (self.background and behind):
            self.report.merge(write(*args, scratch))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"omni-{self.name}")
        self._writing = self._pool.submit(write, *args, scratch)
