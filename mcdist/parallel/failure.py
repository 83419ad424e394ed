"""No hangs: a rank that raises tells the others, which then fail naming it instead of waiting forever.

Every collective has the process group's timeout (ParallelConfig.timeout_s). ``guarded`` wraps a rank's work:
on an exception it records "rank R: error" in the process group's key-value store before re-raising; a rank
whose collective then times out (or fails) looks there and raises ``PeerFailure`` naming the failing rank. An
error that only reports another rank's failure (its message begins with :data:`PEER_ERROR_PREFIX`, e.g. the
trainer's "another rank could not resume") is never recorded: recorded first, it would make the rank with the
cause raise a PeerFailure naming the echo.
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch.distributed import distributed_c10d

FAILURE_KEY = "mcdist/failed_rank"
# how the error of a rank begins when it only reports that another rank failed (that rank's error names the cause)
PEER_ERROR_PREFIX = "another rank"


class PeerFailure(RuntimeError):
    """Another rank of the job failed; the message names it."""


def _store():
    try:
        return distributed_c10d._get_default_store()
    except Exception:  # no process group, or a torch without the helper
        return None


def record_failure(message: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.set(FAILURE_KEY, message)
        except Exception:
            pass


def recorded_failure():
    store = _store()
    if store is None:
        return None
    try:
        if store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    except Exception:
        return None
    return None


def guarded(fn):
    """Decorator for the per-rank body of a distributed job (see module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PeerFailure:
            raise
        except Exception as error:
            if str(error).startswith(PEER_ERROR_PREFIX):  # only an echo of another rank's failure: that rank,
                raise  # not this one, records the cause (an echo recorded first turned the cause into a PeerFailure)
            rank = dist.get_rank() if dist.is_initialized() else 0
            peer = recorded_failure()
            if peer is not None and not peer.startswith(f"rank {rank}:"):
                raise PeerFailure(f"rank {rank} stopped because {peer} (its own error: {error})") from error
            record_failure(f"rank {rank}: {type(error).__name__}: {error}")
            raise

    return wrapper
