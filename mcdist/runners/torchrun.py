"""Run a rank function as this process's rank of a job ``torchrun`` started (it set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); every rank returns the result, so they all exit alike."""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mcdist.parallel.failure import guarded
from mcdist.parallel.mesh import init_distributed
from mcdist.runners.problems import unpack

__all__ = ["in_torchrun", "run_under_torchrun", "world_size_from_environment"]


def in_torchrun() -> bool:
    """Whether this process is one of torchrun's (it set TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE, MASTER_*)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def world_size_from_environment() -> int:
    """WORLD_SIZE as torchrun set it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_under_torchrun(rank_fn: Callable[..., dict], *args, what: str, device: str = "auto",
                       backend: Optional[str] = None, timeout_s: float = 600.0) -> dict:
    """``rank_fn`` as this process's rank; the result, on every rank (a rank's problem is raised on every rank).

    ``backend``: the process group's (``auto``, ``gloo``, ``nccl``); default from ``device``: ``cpu`` joins with
    gloo, otherwise NCCL and this rank's GPU (``LOCAL_RANK``) when CUDA is available, else gloo. ``timeout_s``:
    how long a collective waits for another rank. The process group is destroyed afterwards.
    """
    if backend is None:
        backend = "gloo" if device == "cpu" or not torch.cuda.is_available() else "nccl"
    init_distributed(backend, timeout_s=timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    here = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    try:
        payload = guarded(rank_fn)(rank, world_size, here, f" (on rank {rank}, host {socket.gethostname()})", *args)
    finally:
        dist.destroy_process_group()
    return unpack(payload, f"{what} under torchrun on {world_size} processes")
