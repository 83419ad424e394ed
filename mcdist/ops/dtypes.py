"""The dtype memory states are kept in."""

from __future__ import annotations

import contextlib
import functools

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and cumulative decays are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_state_precision(fn):
    """Run the op ``fn`` with autocast off (on every device type where it is on): the op casts its inputs to the
    state dtype itself (:func:`state_dtype`), and autocast would otherwise run its einsums and matmuls in bfloat16
    whatever their inputs' dtype (docs/kernels.md, "Dtypes")."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return run
