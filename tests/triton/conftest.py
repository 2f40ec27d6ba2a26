"""Shared setup of the Triton tests: every kernel output starts as NaN (an element a kernel forgets to
write fails the comparison)."""

import pytest


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("LINCOMP_POISON_OUTPUTS", "1")
