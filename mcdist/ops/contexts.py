"""Segment contexts and the online gate score (docs/math.md §5, §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcdist.ops.dtypes import state_dtype


def segment_contexts(k: torch.Tensor, segment_len: int, pool: str = "mean"):
    """Contexts of the closed segments and the causal context of each token's own (online) segment.

    Args:
        k: [B, T, H, D] keys. segment_len: C. pool: 'mean' or 'sum'.
    Returns:
        (closed [B, N, H, D], online [B, T, H, D]) in float32 (float64 for float64 keys). closed[:, i] pools all
        tokens of segment i (the last, possibly partial, segment pools the tokens it has); online[:, t] pools
        the tokens of t's segment up to and including t.
    """
    if pool not in ("mean", "sum"):
        raise ValueError(f"pool = {pool!r}; expected 'mean' or 'sum'")
    B, T, H, D = k.shape
    dtype = state_dtype(k.dtype)
    n_segments = -(-T // segment_len)
    pad = n_segments * segment_len - T
    kp = F.pad(k.to(dtype), (0, 0, 0, 0, 0, pad)).reshape(B, n_segments, segment_len, H, D)
    running = torch.cumsum(kp, dim=2)  # [B, N, C, H, D]
    closed = running[:, :, -1]
    online = running.reshape(B, n_segments * segment_len, H, D)[:, :T]
    if pool == "mean":
        counts = torch.arange(1, segment_len + 1, device=k.device, dtype=dtype).repeat(n_segments)[:T]
        online = online / counts[None, :, None, None]
        sizes = torch.full((n_segments,), float(segment_len), device=k.device, dtype=dtype)
        sizes[-1] = T - (n_segments - 1) * segment_len
        closed = closed / sizes[None, :, None, None]
    return closed, online


def online_scores(u: torch.Tensor, online_context: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """r_t(online) = τ ⟨u_t, online context_t⟩. u, online_context [B, T, H, D] -> [B, T, H]."""
    return gate_scale * (u.to(online_context.dtype) * online_context).sum(-1)
