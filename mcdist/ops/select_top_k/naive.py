"""ssc's top-k selection token by token (docs/math.md §6, "ssc selection")."""

from __future__ import annotations

import torch


def select_top_k_reference(u, contexts, *, segment_len, top_k, gate_scale, query_offset=0):
    """Token by token: the visible segments sorted by (−score, index), the first top_k, −1 padding. Scores are
    rounded as ``select_top_k`` rounds them (u in the contexts' dtype, the product and τ times it in that dtype),
    so both see the same ties."""
    B, T, H, _ = u.shape
    scores = (gate_scale * torch.einsum("bthc,bnhc->bthn", u.to(contexts.dtype), contexts)).double().cpu()
    out = torch.full((B, T, H, top_k), -1, dtype=torch.int64)
    for b in range(B):
        for t in range(T):
            visible = min((query_offset + t) // segment_len, contexts.shape[1])
            for h in range(H):
                ranked = sorted(range(visible), key=lambda j: (-scores[b, t, h, j].item(), j))[:top_k]
                out[b, t, h, :len(ranked)] = torch.tensor(ranked, dtype=torch.int64)
    return out
