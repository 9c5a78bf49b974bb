"""Shared by the optimization tests: whatever a test optimized, its module's ``pipe`` is reverted after it."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def always_revert(request):
    yield
    if "pipe" in request.fixturenames:
        p = request.getfixturevalue("pipe")
        if getattr(p, "optimization", None) is not None:
            p.optimization.revert()
