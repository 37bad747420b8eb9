"""The report in words and terminal tables."""

from __future__ import annotations

from typing import Any


def lift_sentence(journey: Any) -> str:
    raise NotImplementedError
