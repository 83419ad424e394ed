"""Linear memory (matrix state): `linear` and `gated` (SPEC §3.1).

Two implementations with one contract (docs/architecture.md, "Linear memory pass"):

- ``linear_memory_reference``: the token loop, line by line the recurrence.
- ``linear_memory_chunked``: the chunkwise-parallel form (intra-chunk causal part + chunk-to-chunk state),
  the CPU fast path and the shape of the Triton kernel in ``mcdist.kernels.linear_memory``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LinearMemoryPass(NamedTuple):
    online_out: torch.Tensor  # [B, T, H, D]
    cached_states: torch.Tensor  # [B, N, H, D, D]
    final_state: torch.Tensor  # [B, H, D, D]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and cumulative decays are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_linear_memory_args(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D]; got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, H, D = q.shape
    if log_decay is not None and tuple(log_decay.shape) != (B, T, H):
        raise ValueError(f"log_decay must be [B, T, H] = {(B, T, H)}; got {tuple(log_decay.shape)}")
    if segment_len <= 0 or chunk_len <= 0 or segment_len % chunk_len != 0:
        raise ValueError(f"chunk_len = {chunk_len} must be a positive divisor of segment_len = {segment_len}")
    if state_init not in ("checkpoint", "independent"):
        raise ValueError(f"state_init = {state_init!r}; expected 'checkpoint' or 'independent'")
    if initial_state is not None:
        if state_init == "independent":
            raise ValueError("initial_state is only meaningful for state_init = 'checkpoint'; every segment starts "
                             "from zeros under 'independent'")
        if tuple(initial_state.shape) != (B, H, D, D):
            raise ValueError(f"initial_state must be [B, H, D, D] = {(B, H, D, D)}; got {tuple(initial_state.shape)}")


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


def linear_memory_chunked(q, k, v, log_decay=None, *, segment_len, chunk_len, state_init="checkpoint",
                          initial_state=None) -> LinearMemoryPass:
    """Chunkwise-parallel linear memory.

    Args:
        q, k, v: [B, T, H, D]. Any T: the tail is padded to a chunk with k = v = 0 and no decay (exact).
        log_decay: [B, T, H], ≤ 0, or None for plain `linear` memory.
        segment_len: C; chunk_len: c, a divisor of C.
        state_init: 'checkpoint' (carry the state across segments) or 'independent' (restart at zeros).
        initial_state: [B, H, D, D] incoming state under 'checkpoint' (zeros if None).
    Returns:
        LinearMemoryPass(online_out [B, T, H, D] in q's dtype, cached_states [B, N, H, D, D] (N = ceil(T / C)),
        final_state [B, H, D, D]); states in float32 (float64 for float64 inputs).
    """
    check_linear_memory_args(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state)
    B, T, H, D = q.shape
    sdt = state_dtype(q.dtype)
    c = chunk_len
    pad = (-T) % c
    n_chunks = (T + pad) // c
    chunks_per_segment = segment_len // c

    def to_chunks(x):  # [B, T, H, D] -> [B, H, NC, c, D]
        x = F.pad(x.to(sdt), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, n_chunks, c, H, D).permute(0, 3, 1, 2, 4)

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    if log_decay is None:
        cum = qc.new_zeros(B, H, n_chunks, c)
    else:
        g = F.pad(log_decay.to(sdt), (0, 0, 0, pad)).reshape(B, n_chunks, c, H).permute(0, 3, 1, 2)
        cum = torch.cumsum(g, dim=-1)  # [B, H, NC, c]: log-decay from the chunk start through token i

    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    rel = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
    scores = torch.einsum("bhnid,bhnjd->bhnij", qc, kc) * torch.exp(rel)  # [B, H, NC, c, c]
    intra = torch.einsum("bhnij,bhnjd->bhnid", scores, vc)  # [B, H, NC, c, D]

    chunk_decay = torch.exp(cum[..., -1])  # [B, H, NC]
    to_end = torch.exp(cum[..., -1:] - cum)  # [B, H, NC, c]: decay from token j to the chunk end
    chunk_update = torch.einsum("bhnjv,bhnjk->bhnvk", vc * to_end[..., None], kc)  # [B, H, NC, D, D]

    zeros = qc.new_zeros(B, H, D, D)
    state = initial_state.to(sdt) if initial_state is not None else zeros
    incoming, cached = [], []
    # unbind, not indexing: the backward of n indexings would zero-fill n full-size gradients (quadratic in T)
    for n, (decay, update) in enumerate(zip(chunk_decay.unbind(2), chunk_update.unbind(2))):
        if n % chunks_per_segment == 0 and state_init == "independent":
            state = zeros
        incoming.append(state)
        state = decay[:, :, None, None] * state + update
        if (n + 1) % chunks_per_segment == 0 or n == n_chunks - 1:
            cached.append(state)
    incoming = torch.stack(incoming, dim=2)  # [B, H, NC, D, D]
    inter = torch.einsum("bhnvk,bhnik->bhniv", incoming, qc) * torch.exp(cum)[..., None]
    out = (intra + inter).permute(0, 2, 3, 1, 4).reshape(B, n_chunks * c, H, D)[:, :T]
    return LinearMemoryPass(out.to(q.dtype), torch.stack(cached, dim=1), state)
