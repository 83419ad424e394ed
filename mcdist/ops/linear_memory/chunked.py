"""Chunkwise-parallel linear memory (docs/math.md §12.1): intra-chunk causal part + chunk-to-chunk state; the CPU
fast path and the shape of the Triton kernel in ``mcdist.kernels.linear_memory``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcdist.ops.dtypes import in_state_precision, state_dtype
from mcdist.ops.linear_memory.contract import LinearMemoryPass, check_linear_memory_args


@in_state_precision
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
