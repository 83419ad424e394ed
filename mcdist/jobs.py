"""Run one function on every rank of a job: on local processes or on Ray Train workers; return rank 0's result.

Inference (:mod:`mcdist.infer_job`) and evaluation (:mod:`mcdist.evaluation`) run the same way: every rank
loads the saved model itself and computes its part; rank 0's result, a JSON-safe dict, comes back to the
caller. A *rank function* is a module-level function

    rank_fn(rank, world_size, device, where, *args) -> dict

called on every rank of an initialised process group (``device``: where this rank computes, ``"cpu"`` or the
GPU Ray gave it; ``where``: text naming this rank's machine, appended to error messages). A rank that finds a
problem (a missing checkpoint, a request that does not fit the model) returns :func:`problem` of the error;
:func:`first_problem` lets every rank learn of it before anyone waits in a collective for a rank that gave up.
The driver raises it again (:func:`unpack`), naming the rank's node.

* :func:`run_local`: ``nprocs`` fresh processes on this machine (gloo on CPUs, :func:`mcdist.parallel.spawn.spawn`).
* :func:`run_ray`: one Ray Train worker per rank (gloo on CPUs, NCCL on GPUs), connected as ``mcdist train --ray``
  connects (:mod:`mcdist.train.ray_job`).
* :func:`run_torchrun`: this process is one rank of a job ``torchrun`` started (it set RANK, WORLD_SIZE,
  MASTER_ADDR/PORT); every rank returns the result.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import tempfile
import uuid
from typing import Callable, Optional

import torch.distributed as dist

from mcdist.checkpoint import CheckpointError
from mcdist.config import write_text_atomic

__all__ = ["first_problem", "in_torchrun", "problem", "run_local", "run_ray", "run_torchrun", "unpack"]

RESULT_FILE = "result.json"


def problem(error: Exception, where: str = "") -> dict:
    """The result a rank returns instead of its answer when ``error`` (a ValueError or CheckpointError) stops it."""
    return {"error": f"{error}{where}", "type": type(error).__name__}


def first_problem(mine: Optional[dict], group=None) -> Optional[dict]:
    """Every rank's problem (a :func:`problem` dict, or ``None``) gathered over ``group`` (default: the world):
    the first one, the same on every rank. A collective: every rank of the group calls it."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, mine, group=group)
    return next((item for item in problems if item is not None), None)


def unpack(payload: Optional[dict], what: str) -> dict:
    """Rank 0's result; raises the error a rank reported (CheckpointError or ValueError, its message kept)."""
    if payload is None:
        raise RuntimeError(f"{what} returned no result (rank 0 wrote none)")
    if "error" in payload:
        raise (CheckpointError if payload["type"] == "CheckpointError" else ValueError)(payload["error"])
    return payload


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r} is invalid; expected a positive integer")


# -- local processes -----------------------------------------------------------------------------------------------


def _local_entry(rank: int, world_size: int, rank_fn: Callable[..., dict], args: tuple, result_path: str) -> None:
    payload = rank_fn(rank, world_size, "cpu", "", *args)
    if rank == 0:
        write_text_atomic(result_path, json.dumps(payload))


def run_local(rank_fn: Callable[..., dict], nprocs: int, *args, what: str, timeout_s: float = 600.0) -> dict:
    """``rank_fn`` on ``nprocs`` new local processes (gloo, CPU); rank 0's result.

    The whole run is bounded by ``timeout_s`` (TimeoutError after every process is terminated); a collective
    waits as long for another rank. ``what`` names the job in errors.
    """
    from mcdist.parallel.spawn import spawn

    _check_count("nprocs", nprocs)
    with tempfile.TemporaryDirectory(prefix="mcdist-job-") as folder:
        result_path = os.path.join(folder, RESULT_FILE)
        spawn(_local_entry, nprocs, rank_fn, args, result_path, timeout_s=timeout_s, collective_timeout_s=timeout_s)
        payload = None
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as handle:
                payload = json.load(handle)
    return unpack(payload, f"{what} on {nprocs} local processes")


# -- torchrun ----------------------------------------------------------------------------------------------------------


def in_torchrun() -> bool:
    """Whether this process is one of torchrun's (it set TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE, MASTER_*)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def world_size_from_environment() -> int:
    """WORLD_SIZE as torchrun set it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_torchrun(rank_fn: Callable[..., dict], *args, what: str, device: str = "auto",
                 timeout_s: float = 600.0) -> dict:
    """``rank_fn`` as this process's rank of the job torchrun started; the result, on every rank (a rank's problem
    is raised on every rank, so they all exit alike).

    ``device``: ``cpu`` joins with gloo and computes on the CPU; otherwise NCCL and this rank's GPU
    (``LOCAL_RANK``) when CUDA is available, else gloo. The process group is destroyed afterwards.
    """
    import torch

    from mcdist.parallel.mesh import init_distributed

    backend = "gloo" if device == "cpu" or not torch.cuda.is_available() else "nccl"
    init_distributed(backend, timeout_s=timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    here = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    try:
        payload = rank_fn(rank, world_size, here, f" (on rank {rank}, host {socket.gethostname()})", *args)
    finally:
        dist.destroy_process_group()
    return unpack(payload, f"{what} under torchrun on {world_size} processes")


# -- Ray ---------------------------------------------------------------------------------------------------------------


def _ray_entry(loop_config: dict) -> None:
    """What every Ray Train worker runs: its rank of the job; rank 0 writes the result file."""
    import ray
    import ray.train

    from mcdist.train.ray_job import write_text

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = "cpu"
    if loop_config["use_gpu"]:
        import ray.train.torch

        device = str(ray.train.torch.get_device())  # the GPU Ray gave this worker
    where = f" (on the Ray worker of rank {rank}, node {ray.util.get_node_ip_address()})"
    payload = loop_config["rank_fn"](rank, world_size, device, where, *loop_config["args"])
    if rank == 0:
        write_text(loop_config["result_uri"], json.dumps(payload))


def run_ray(rank_fn: Callable[..., dict], *args, workers: int, what: str, name: str, describe: str = "",
            address: Optional[str] = None, use_gpu: bool = False, device: str = "auto", cpus_per_worker: int = 1,
            storage_path: Optional[str] = None, timeout_s: float = 600.0,
            log: Optional[Callable[[str], None]] = print) -> dict:
    """``rank_fn`` on ``workers`` Ray Train workers (one per rank); rank 0's result.

    Args:
        workers: Ray workers = ranks.
        what: names the job in errors; ``name``: prefix of the Ray run's name (a timestamp and a random suffix
            follow); ``describe``: what the driver's log line says the job is.
        address: the Ray cluster as ``ray.address`` takes it: ``None``/``""`` joins this machine's running Ray or
            starts a local one (``workers × cpus_per_worker`` CPUs, stopped afterwards), ``auto``, ``host:port``,
            ``ray://host:port`` (probed first: an unreachable one fails in seconds, naming it).
        use_gpu, device: one GPU per worker when ``use_gpu`` or ``device`` is ``cuda``, or ``device`` is ``auto``
            and the cluster has a GPU per worker (NCCL then, else gloo on CPUs).
        storage_path: Ray Train's run folder (rank 0 writes the result file there); default a temporary folder
            here, removed afterwards. On a cluster of several machines it must be shared (NFS, ``s3://``).
        timeout_s: how long a collective may wait for another rank (a rank that died fails the run then).
        log: receives the driver's lines (which Ray, how many workers); ``None`` is silent.

    Raises:
        ValueError, CheckpointError: a rank reported one (the message names its node). RayConnectionError:
        ``address`` cannot be reached. ImportError: no Ray Train. RuntimeError: a worker failed otherwise.
    """
    from mcdist.train import ray_job

    say = log or (lambda line: None)
    _check_count("workers", workers)
    _check_count("cpus_per_worker", cpus_per_worker)
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise ValueError(f"device = {device!r} is invalid; expected auto, cpu or cuda (each worker takes the GPU "
                         "Ray gives it)")
    ray_job.require_ray_train(what)
    session = ray_job._RaySession(address or "", workers * cpus_per_worker, say)
    owned_storage = storage_path is None
    storage = tempfile.mkdtemp(prefix="mcdist-job-ray-") if owned_storage else storage_path
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    try:
        gpus = ray_job.wants_gpu(use_gpu, device, workers)
        backend = "nccl" if gpus else "gloo"
        run_name = name + datetime.datetime.now().strftime("-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        say(f"ray: {describe or what} on {workers} worker(s), {'1 GPU' if gpus else 'no GPU'} + {cpus_per_worker} "
            f"CPU each, {backend}")
        loop_config = {"rank_fn": rank_fn, "args": list(args), "use_gpu": gpus}
        _, text = ray_job.run_workers(_ray_entry, loop_config, workers=workers, use_gpu=gpus,
                                      cpus_per_worker=cpus_per_worker, backend=backend, timeout_s=timeout_s,
                                      storage_path=storage, name=run_name, max_failures=0)
    finally:
        session.close()
        if owned_storage:
            shutil.rmtree(storage, ignore_errors=True)
    return unpack(json.loads(text) if text else None, f"{what} on {workers} Ray worker(s)")
