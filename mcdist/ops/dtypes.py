"""The dtype memory states are kept in."""

from __future__ import annotations

import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and cumulative decays are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
