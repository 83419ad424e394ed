"""The linear memory token loop (docs/math.md §3.1, §4): line by line the recurrence."""

from __future__ import annotations

import torch

from mcdist.ops.dtypes import state_dtype
from mcdist.ops.linear_memory.contract import LinearMemoryPass, check_linear_memory_args


def linear_memory_reference(q, k, v, log_decay=None, *, segment_len, chunk_len=None, state_init="checkpoint",
                            initial_state=None) -> LinearMemoryPass:
    """Token loop: M_t = exp(g_t) M_{t-1} + v_t k_tᵀ, o_t = M_t q_t, with segment restarts.

    Args: see ``linear_memory_chunked`` (``chunk_len`` is accepted and ignored).
    Returns: LinearMemoryPass(online_out [B, T, H, D], cached_states [B, N, H, D, D], final_state [B, H, D, D]).
    """
    check_linear_memory_args(q, k, v, log_decay, segment_len, chunk_len or segment_len, state_init, initial_state)
    B, T, H, D = q.shape
    sdt = state_dtype(q.dtype)
    zeros = q.new_zeros(B, H, D, D, dtype=sdt)
    state = initial_state.to(sdt) if initial_state is not None else zeros
    outputs, cached = [], []
    for t in range(T):
        if t % segment_len == 0 and state_init == "independent":
            state = zeros
        if log_decay is not None:
            state = torch.exp(log_decay[:, t].to(sdt))[:, :, None, None] * state
        state = state + v[:, t, :, :, None].to(sdt) * k[:, t, :, None, :].to(sdt)  # [B, H, D, D]
        outputs.append(torch.einsum("bhij,bhj->bhi", state, q[:, t].to(sdt)))
        if (t + 1) % segment_len == 0 or t == T - 1:
            cached.append(state)
    return LinearMemoryPass(torch.stack(outputs, 1).to(q.dtype), torch.stack(cached, 1), state)
