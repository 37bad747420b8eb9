"""The cyclic garbage collector around bulk work.

Bulk work (an ingest, a sequence tick) allocates millions of short-lived objects that reference
counting frees on its own; what they set off in the cyclic collector is full passes over every object
of the process, which measured 15 % of a tick and over half the cost of receiving a prepared ingest
batch from a parse worker. Two remedies, one per shape of work:
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collector's passes until the block ends.

    For a block that makes many short-lived objects: the ~100,000 objects that exist before it
    (imported modules, definitions, caches) are not re-scanned by each full collection inside it.
    ``gc.unfreeze()`` puts them back when the block ends, so garbage among them is collected then;
    objects made inside the block are collected as usual.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collections inside the block; the caller runs :func:`collect_now` at points of its
    choosing (between transactions, say), and one runs when the block ends.

    For a block that keeps large batches of objects alive for a while (queued prepared batches): each
    new batch would otherwise promote the last into the oldest generation and set off full passes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect(1)


def collect_now() -> None:
    """Collect the young generations (cycles made since the last call, e.g. a session's objects)."""
    gc.collect(1)
