"""Run a rank function on fresh local processes joined in one process group (gloo on CPUs, NCCL on GPUs).

:func:`run_spawned` starts the processes (:func:`mcdist.parallel.spawn.spawn`), waits for them within a time
limit and returns rank 0's result. A rank that raises records its error in a file first (and, through
:func:`mcdist.parallel.failure.guarded`, in the process group's store, so its peers fail naming it instead of
waiting); the caller then raises the failing rank's own error again as its type when it is one of
:data:`RAISED_AS_THEIR_TYPE` (so ``mcdist train`` on two processes refuses a corrupt checkpoint as one process
does), else the spawn failure.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Optional

import torch

from mcdist.checkpoint import CheckpointError
from mcdist.config import ConfigError, write_text_atomic
from mcdist.data.tokens import TokenFileError
from mcdist.parallel.failure import PEER_ERROR_PREFIX, PeerFailure, guarded
from mcdist.parallel.spawn import spawn
from mcdist.runners.problems import check_count, unpack

__all__ = ["RAISED_AS_THEIR_TYPE", "raise_rank_error", "rank_error", "run_spawned"]

RESULT_FILE = "result.json"
# errors a spawned rank reports by type and message, raised again in the caller as if the rank ran in-process
RAISED_AS_THEIR_TYPE = {cls.__name__: cls for cls in (ConfigError, CheckpointError, TokenFileError,
                                                       FloatingPointError, ValueError, FileNotFoundError)}


def _rank_entry(rank: int, world_size: int, rank_fn: Callable[..., dict], args: tuple, folder: str,
                backend: str) -> None:
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    try:
        payload = guarded(rank_fn)(rank, world_size, device, "", *args)
    except Exception as error:
        write_text_atomic(os.path.join(folder, f"error-{rank}.json"),
                          json.dumps({"type": type(error).__name__, "message": str(error)}))
        raise
    if rank == 0:
        write_text_atomic(os.path.join(folder, RESULT_FILE), json.dumps(payload))


def rank_error(reports: list[dict]) -> Optional[Exception]:
    """The first rank's own error (not a peer's report of it) among ranks' ``{"type", "message"}`` reports, as
    its type when that is one of :data:`RAISED_AS_THEIR_TYPE`; ``None`` when there is none of those types."""
    own = [report for report in reports if report["type"] != PeerFailure.__name__] or list(reports)
    own.sort(key=lambda report: report["message"].startswith(PEER_ERROR_PREFIX))  # the rank with the cause first
    if own and own[0]["type"] in RAISED_AS_THEIR_TYPE:
        return RAISED_AS_THEIR_TYPE[own[0]["type"]](own[0]["message"])
    return None


def raise_rank_error(folder: str, failure: BaseException) -> None:
    """Raise :func:`rank_error` of the ``error-<rank>.json`` files in ``folder``; return when there is none (the
    caller raises ``failure``)."""
    reports = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("error-"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                reports.append(json.load(handle))
    error = rank_error(reports)
    if error is not None:
        raise error from failure


def run_spawned(rank_fn: Callable[..., dict], nprocs: int, *args, what: str, timeout_s: Optional[float] = 600.0,
                backend: str = "gloo", collective_timeout_s: Optional[float] = None,
                threads_per_rank: int = 1) -> dict:
    """``rank_fn`` on ``nprocs`` new local processes; rank 0's result.

    Args:
        rank_fn: a module-level rank function (:mod:`mcdist.runners`); ``args`` follow its first four arguments
            and travel by pickling.
        what: names the job in errors.
        timeout_s: bound of the whole run (TimeoutError after every process is terminated); ``None``: none.
        backend: ``gloo`` (ranks compute on the CPU) or ``nccl`` (rank r on GPU r).
        collective_timeout_s: how long a collective waits for another rank; default ``timeout_s``.
        threads_per_rank: torch threads of each process.

    Raises:
        The failing rank's own error (:func:`raise_rank_error`), ValueError / CheckpointError that a rank
        returned as a problem (:func:`mcdist.runners.problems.unpack`), TimeoutError, or the spawn failure.
    """
    check_count("nprocs", nprocs)
    limit = math.inf if timeout_s is None else timeout_s
    with tempfile.TemporaryDirectory(prefix="mcdist-spawned-") as folder:
        try:
            spawn(_rank_entry, nprocs, rank_fn, args, folder, backend, timeout_s=limit, backend=backend,
                  collective_timeout_s=limit if collective_timeout_s is None else collective_timeout_s,
                  threads_per_rank=threads_per_rank)
        except Exception as failure:
            raise_rank_error(folder, failure)
            raise
        payload = None
        result_path = os.path.join(folder, RESULT_FILE)
        if os.path.isfile(result_path):
            with open(result_path, encoding="utf-8") as handle:
                payload = json.load(handle)
    return unpack(payload, f"{what} on {nprocs} local processes")
