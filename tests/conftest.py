"""Shared test setup: Triton runs under its interpreter (no GPU here) and torch uses two threads (one per
pytest-xdist worker when `make test` runs two); the fault suite's table (tests/faults) is printed here, with the
rows of every xdist worker."""

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs two xdist workers on the two cores: a thread each, not two contended ones
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# Modules whose module-scoped fixtures spawn process groups for tens of seconds: under xdist each runs whole on one
# worker, so the fixture is computed once rather than once per worker. (A test's own xdist_group, "ray", wins.)
ONE_WORKER_MODULES = {"test_sequence_parallel.py", "test_data_parallel.py", "test_inference_sp.py",
                      "test_packing_sp.py", "test_attention_sp.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ONE_WORKER_MODULES and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


_WORKER_FAULT_ROWS: list[dict] = []  # the fault tables xdist's workers handed back (controller only)


def _fault_table() -> dict:
    """This process's fault rows (tests/faults/fault_injection.TABLE, if the suite ran here) plus the workers'."""
    rows: dict[str, dict] = {}
    injection = sys.modules.get("fault_injection")
    for table in [getattr(injection, "TABLE", {})] + _WORKER_FAULT_ROWS:
        for kind, counts in table.items():
            row = rows.setdefault(kind, {key: 0 for key in counts})
            for key, count in counts.items():
                row[key] = row.get(key, 0) + count
    return rows


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)  # set on an xdist worker only
    if workeroutput is not None:
        injection = sys.modules.get("fault_injection")
        workeroutput["fault_rows"] = json.dumps(getattr(injection, "TABLE", {}))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: a worker is done; keep its fault rows for the summary."""
    rows = getattr(node, "workeroutput", {}).get("fault_rows")
    if rows:
        _WORKER_FAULT_ROWS.append(json.loads(rows))


def pytest_terminal_summary(terminalreporter):
    rows = _fault_table()
    if not rows or getattr(terminalreporter.config, "workeroutput", None) is not None:
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "faults"))  # not collected on xdist's controller
    import fault_injection  # noqa: PLC0415

    terminalreporter.section("faults injected")
    for line in fault_injection.format_table(rows):
        terminalreporter.write_line(line)
    path = os.environ.get("MCDIST_FAULT_TABLE")
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2, sort_keys=True)


@pytest.fixture
def one_thread():
    """Tiny matmuls run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
