"""Splitting work into chunks: the size of one ``IN (...)`` list, one provider request, one batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")

# Values per ``IN (...)`` list: under SQLite's default limit of bound parameters, and a plan PostgreSQL
# makes quickly.
CHUNK = 1000


def chunked(values: Sequence[T], size: int = CHUNK) -> Iterable[Sequence[T]]:
    """Consecutive slices of ``values`` of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, not {size}")
    for start in range(0, len(values), size):
        yield values[start : start + size]


__all__ = ["CHUNK", "chunked"]
