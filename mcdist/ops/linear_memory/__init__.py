"""The linear memory pass: `linear` and `gated` (docs/math.md §3.1), token loop, chunked PyTorch and the Triton
kernel (``mcdist.kernels.linear_memory``) behind one dispatching function."""

from __future__ import annotations

import torch.nn.functional as F

from mcdist.ops.dispatch import check_choice, kernel_module, resolve_impl, run_kernel
from mcdist.ops.linear_memory.chunked import linear_memory_chunked
from mcdist.ops.linear_memory.contract import LinearMemoryPass, check_linear_memory_args
from mcdist.ops.linear_memory.naive import linear_memory_reference

__all__ = ["linear_memory", "linear_memory_chunked", "linear_memory_reference", "LinearMemoryPass",
           "check_linear_memory_args", "WALKS"]

# How the Triton kernel carries the chunk-start states across chunks: 'sequential' (one tl.dot per chunk, the
# measured default) or 'scan' (docs/kernels.md, "Two-level scan").
WALKS = ("sequential", "scan")


def linear_memory(q, k, v, log_decay=None, *, segment_len, chunk_len, state_init, initial_state=None,
                  impl="auto", walk="sequential") -> LinearMemoryPass:
    """The linear memory pass (docs/architecture.md, "Linear memory pass").

    Args:
        q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state: see ``linear_memory_chunked``.
        impl: 'auto', 'chunked', 'reference' (the token loop) or 'triton' (mcdist.ops.dispatch).
        walk: the Triton kernel's walk over chunks, 'sequential' or 'scan' (used where impl resolves to 'triton').
    Returns:
        LinearMemoryPass(online_out [B, T, H, D], cached_states [B, N, H, D, D], final_state [B, H, D, D]).
    """
    check_choice("walk", walk, WALKS)
    requested = impl
    impl = resolve_impl(impl, q, kernels=("linear_memory",))
    kwargs = dict(segment_len=segment_len, chunk_len=chunk_len, state_init=state_init, initial_state=initial_state)
    if impl == "reference":
        return linear_memory_reference(q, k, v, log_decay, **kwargs)
    if impl == "chunked":
        return linear_memory_chunked(q, k, v, log_decay, **kwargs)

    def kernel():
        T = q.shape[1]
        pad = (-T) % chunk_len
        qp, kp, vp, gp = q, k, v, log_decay
        if pad:  # k = v = 0 and no decay on the padding: the states are unchanged (exact)
            qp, kp, vp = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
            gp = F.pad(log_decay, (0, 0, 0, pad)) if log_decay is not None else None
        result = kernel_module("linear_memory").linear_memory_triton(qp, kp, vp, gp, walk=walk, **kwargs)
        return LinearMemoryPass(result[0][:, :T], result[1], result[2])

    return run_kernel(requested, "linear_memory", kernel,
                      lambda: linear_memory_chunked(q, k, v, log_decay, **kwargs))
