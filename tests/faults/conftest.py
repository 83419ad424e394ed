"""The fault-injection suite (docs/reliability.md): every test records what it injected into one table, printed
at the end of the session (and written as JSON to ``$MCDIST_FAULT_TABLE`` when set) by tests/conftest.py, which
also gathers the tables of pytest-xdist's workers."""

import pytest

import fault_injection


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every fault test on one thread (tests/conftest.py)."""
    yield
