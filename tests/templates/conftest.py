"""Fixtures of the template tests; their data and helpers are in ``template_kit`` (a module of its own:
two test folders have a ``conftest``, so ``from conftest import ...`` depended on import order)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from template_kit import seed


@pytest.fixture
def customer_id(engine: Engine) -> int:
    return seed(engine)
