"""Process groups: the dp × sp device mesh, and the one place that initialises torch.distributed."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mcdist.config import ParallelConfig


def init_distributed(backend: str = "auto", *, timeout_s: float = 300.0, rank: Optional[int] = None,
                     world_size: Optional[int] = None, init_method: Optional[str] = None) -> None:
    """Initialise the default process group once (torchrun, Ray Train or spawned processes).

    Does nothing when it is already initialised (Ray Train and torchrun may have done it). ``backend`` 'auto'
    picks NCCL when CUDA is available, else gloo. Rank and world size come from the arguments or from the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("torch.distributed needs MASTER_ADDR and MASTER_PORT in the environment (or an "
                           "init_method); launch with torchrun, Ray, or mcdist.parallel.spawn")
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method=init_method,
                            timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class Mesh:
    """The dp × sp mesh as seen from one rank. Ranks are laid out as rank = dp_rank · sp + sp_rank."""

    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    sp_group: object  # a ProcessGroup, or None for a single process
    dp_group: object
    sp_ranks: tuple  # global ranks of this rank's sp group, in sp order

    @property
    def distributed(self) -> bool:
        return self.sp_group is not None or self.dp_group is not None

    @classmethod
    def single(cls) -> "Mesh":
        return cls(1, 1, 0, 0, None, None, (0,))


def build_mesh(config: ParallelConfig) -> Mesh:
    """Create the sp and dp groups for ``config`` on an initialised process group.

    Every rank must call this (new_group is collective). Fails before any communication if dp·sp does not
    equal the world size.
    """
    if not dist.is_initialized():
        if config.world_size != 1:
            raise RuntimeError(f"parallel.dp·sp = {config.world_size} needs an initialised process group "
                               "(call init_distributed first)")
        return Mesh.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    if config.world_size != world:
        raise ValueError(f"parallel.dp·sp = {config.dp}·{config.sp} = {config.world_size} does not equal the "
                         f"world size {world}")
    sp_group = dp_group = None
    sp_ranks = ()
    timeout = datetime.timedelta(seconds=config.timeout_s)
    for d in range(config.dp):
        ranks = list(range(d * config.sp, (d + 1) * config.sp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            sp_group, sp_ranks = group, tuple(ranks)
    for s in range(config.sp):
        ranks = list(range(s, world, config.sp))
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp_group = group
    return Mesh(config.dp, config.sp, rank // config.sp, rank % config.sp, sp_group, dp_group, sp_ranks)
