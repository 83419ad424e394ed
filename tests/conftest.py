"""Shared test setup: Triton runs under its interpreter (no GPU here) and torch uses two threads."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
