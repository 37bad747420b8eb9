"""The render time limit counts the rendering thread's CPU time, not time spent waiting for the CPU or
the GIL (several shard workers render in one process; under load a well-behaved template must not
fail)."""

from __future__ import annotations

import time

import pytest

from templates.sandbox import Budget, LimitExceeded


def test_time_spent_waiting_does_not_count():
    budget = Budget(0.2, 1000)
    budget.deadline = time.monotonic() - 5  # five seconds of wall clock passed, none of it on the CPU
    budget.check_time()  # does not raise
    assert budget.deadline > time.monotonic()  # the wall-clock bound moved by the time spent waiting


def test_cpu_time_spent_rendering_counts():
    budget = Budget(0.05, 1000)
    start = time.thread_time()
    with pytest.raises(LimitExceeded, match="longer than 0.05 s"):
        while True:
            sum(range(1000))  # CPU work, as a runaway template loop does
            budget.check_time()
    assert time.thread_time() - start >= 0.05


def _heap_collected_in_over(seconds: float) -> list:
    """Objects enough that a full collection of the process takes longer than ``seconds`` of CPU."""
    import gc

    heap: list = []
    while True:
        heap.extend([] for _ in range(200_000))
        start = time.thread_time()
        gc.collect()
        if time.thread_time() - start > seconds:
            return heap


def test_garbage_collection_during_a_render_does_not_count():
    """A full collection walks the whole process's heap (in a shard worker, a long test session): it
    runs in whichever thread allocated last, and must not fail that thread's render."""
    import gc

    heap = _heap_collected_in_over(0.06)
    start = time.thread_time()
    gc.collect()
    collection = time.thread_time() - start  # in a long test session, more than the heap above
    budget = Budget(collection / 2, 1000)  # within the allowance for collections (GC_ALLOWANCE budgets)
    start = time.thread_time()
    gc.collect()
    assert time.thread_time() - start > budget.seconds  # the collection alone is longer than the budget
    budget.deadline = time.monotonic() - 1
    budget.check_time()  # does not raise: the render itself used almost nothing
    assert budget.cpu_used() < budget.seconds
    del heap


def test_collections_are_forgiven_only_up_to_an_allowance():
    """A template cannot hide a runaway loop behind the collections it provokes."""
    import gc

    from templates.sandbox import GC_ALLOWANCE

    heap = _heap_collected_in_over(0.06)
    budget = Budget(0.05 / GC_ALLOWANCE, 1000)
    gc.collect()
    budget.deadline = time.monotonic() - 1
    with pytest.raises(LimitExceeded, match="longer than"):
        budget.check_time()
    del heap
