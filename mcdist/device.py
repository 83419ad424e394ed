"""Where a process computes: the device a ``device`` setting names, and what the forward runs under."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from mcdist.config import ConfigError

__all__ = ["autocast_for", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: ``device`` names no device (naming it).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device = {device!r} is invalid; expected auto, cpu, cuda or cuda:N") from error


def autocast_for(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What the forward runs under: autocast to bfloat16 for ``dtype = "bfloat16"`` (``train.dtype``) on a GPU,
    else nothing (a CPU runs bfloat16 runs in float32)."""
    if dtype == "bfloat16" and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
