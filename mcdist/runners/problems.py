"""What a rank returns instead of its answer when the request does not fit (a missing checkpoint, a prompt the
model cannot read), so that every rank learns of it before anyone waits in a collective for a rank that gave
up, and the caller raises it again, naming the rank's machine."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from mcdist.checkpoint import CheckpointError

__all__ = ["check_count", "first_problem", "problem", "unpack"]


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


def check_count(name: str, value) -> None:
    """Refuse a count of ranks, workers or CPUs that is not a positive integer, naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r} is invalid; expected a positive integer")
