"""Shared setup of the trainer tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every trainer test on one thread (tests/conftest.py)."""
    yield
