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
                     world_size: Optional[int] = None, init_method: Optional[str] = None, store=None) -> None:
    """Initialise the default process group once (torchrun, Ray Train or spawned processes).

    Does nothing when it is already initialised (Ray Train and torchrun may have done it). ``backend`` 'auto'
    picks NCCL when CUDA is available, else gloo. Rank and world size come from the arguments or from the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); ``store``: a rendezvous store to join instead
    (:func:`mcdist.parallel.spawn.spawn` passes a client of the store its driver holds).
    """
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if init_method is None and store is None and "MASTER_ADDR" not in os.environ:
        raise RuntimeError("torch.distributed needs MASTER_ADDR and MASTER_PORT in the environment (or an "
                           "init_method); launch with torchrun, Ray, or mcdist.parallel.spawn")
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, init_method=init_method,
                            store=store, timeout=datetime.timedelta(seconds=timeout_s))


@dataclass
class Mesh:
    """The dp × sp mesh as seen from one rank. Ranks are laid out as rank = dp_rank · sp + sp_rank.

    ``device_mesh`` is torch's ``DeviceMesh`` of shape (dp, sp) with dimensions named "dp" and "sp" (``None`` in
    one process); ``sp_group`` and ``dp_group`` are its two dimensions' process groups. ``dp_sp_mesh`` is the
    same ranks flattened into one dimension "dp_sp": the group over which data parallelism (DDP or FSDP2,
    :mod:`mcdist.parallel.data_parallel`) sums gradients, a process group of its own, never the sp group.
    """

    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    sp_group: object  # a ProcessGroup, or None for a single process
    dp_group: object
    sp_ranks: tuple  # global ranks of this rank's sp group, in sp order
    device_mesh: object = None  # DeviceMesh (dp, sp), or None for a single process
    dp_sp_mesh: object = None  # DeviceMesh (dp·sp,): every rank, for gradient reduction

    @property
    def distributed(self) -> bool:
        return self.sp_group is not None or self.dp_group is not None

    @classmethod
    def single(cls) -> "Mesh":
        return cls(1, 1, 0, 0, None, None, (0,))


def _backend_options(backend: str, timeout: datetime.timedelta):
    """(backend, options) for a mesh dimension: a new process group with the run's collective timeout."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return backend, options
    from torch._C._distributed_c10d import Backend as BackendOptions  # DeviceMesh's own type for these options

    return backend, BackendOptions.Options(backend, timeout)


def build_mesh(config: ParallelConfig) -> Mesh:
    """The (dp, sp) device mesh of ``config`` on an initialised process group (``init_device_mesh``).

    Every rank must call this (creating groups is collective). Each mesh dimension, and the flattened "dp_sp"
    one, gets a process group of its own with ``config.timeout_s`` (none is the default group, so a gradient
    all-reduce never queues behind, or in front of, the ring of sequence parallelism). Fails before any
    communication if dp·sp does not equal the world size.
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
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
    options = _backend_options("nccl" if device_type == "cuda" else "gloo",
                               datetime.timedelta(seconds=config.timeout_s))
    device_mesh = init_device_mesh(device_type, (config.dp, config.sp), mesh_dim_names=("dp", "sp"),
                                   backend_override={"dp": options, "sp": options})
    dp_sp_mesh = device_mesh["dp", "sp"]._flatten("dp_sp", backend_override=options)  # torchtitan's way
    sp_mesh = device_mesh["sp"]
    return Mesh(config.dp, config.sp, device_mesh.get_local_rank("dp"), device_mesh.get_local_rank("sp"),
                sp_mesh.get_group(), device_mesh["dp"].get_group(), tuple(sp_mesh.mesh.tolist()), device_mesh,
                dp_sp_mesh)
