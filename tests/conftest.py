"""Shared test setup: Triton runs under its interpreter (no GPU here) and torch uses two threads."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
