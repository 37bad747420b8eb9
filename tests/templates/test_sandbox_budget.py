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
