"""Where a process computes: the device a ``device`` setting names, and what the forward runs under."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from mcdist.config import ConfigError

__all__ = ["autocast_for", "check_cuda", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: ``device`` names no device, or a CUDA device this process cannot use (:func:`check_cuda`).
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device = {device!r} is invalid; expected auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda":
        check_cuda(device, resolved.index)
    return resolved


def check_cuda(device, index: int | None = None) -> None:
    """Refuse a CUDA device this process cannot use, at once and naming why (a CPU-only build of torch, no GPU
    visible, or an index past the GPUs there are), instead of a failure deep in a kernel or in NCCL.

    Raises:
        ConfigError: naming ``device`` and the reason.
    """
    if not torch.backends.cuda.is_built():
        raise ConfigError(f"device = {str(device)!r} but this torch ({torch.__version__}) is built without CUDA; "
                          "expected device auto or cpu, or a CUDA build of torch")
    if not torch.cuda.is_available():
        raise ConfigError(f"device = {str(device)!r} but no CUDA GPU is visible to this process "
                          f"(CUDA_VISIBLE_DEVICES = {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                          "expected device auto or cpu here")
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device = {str(device)!r} but this process sees {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); expected one of them")


def autocast_for(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What the forward runs under: autocast to bfloat16 for ``dtype = "bfloat16"`` (``train.dtype``) on a GPU,
    else nothing (a CPU runs bfloat16 runs in float32)."""
    if dtype == "bfloat16" and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
