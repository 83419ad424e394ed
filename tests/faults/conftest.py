"""The fault-injection suite (docs/reliability.md): every test records what it injected into one table, printed
at the end of the session (and written as JSON to ``$MCDIST_FAULT_TABLE`` when set)."""

import json
import os

import pytest

import fault_injection


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every fault test on one thread (tests/conftest.py)."""
    yield


def pytest_terminal_summary(terminalreporter):
    rows = fault_injection.TABLE
    if not rows:
        return
    terminalreporter.section("faults injected")
    for line in fault_injection.format_table(rows):
        terminalreporter.write_line(line)
    path = os.environ.get("MCDIST_FAULT_TABLE")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2, sort_keys=True)
