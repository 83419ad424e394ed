"""ssc's top-k selection in PyTorch: scores of a block of tokens in memory, torch.topk (docs/math.md §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcdist.ops.dtypes import in_state_precision


def _token_segments(T: int, query_offset: int, segment_len: int, device) -> torch.Tensor:
    return (torch.arange(T, device=device) + query_offset) // segment_len


def _select_top_k_rows(u, contexts, segment_len, top_k, gate_scale, query_offset):
    n = contexts.shape[1]
    segments = _token_segments(u.shape[1], query_offset, segment_len, u.device)
    scores = gate_scale * torch.einsum("bthc,bnhc->bthn", u.to(contexts.dtype), contexts)  # [B, T, H, N]
    visible = torch.arange(n, device=u.device)[None, :] < segments[:, None]  # [T, N]
    scores = scores.detach().masked_fill(~visible[None, :, None, :], float("-inf"))
    width = min(top_k, n)
    if width == 0:
        return torch.full((*u.shape[:3], top_k), -1, dtype=torch.int64, device=u.device)
    # torch.topk does not promise which of several equal scores it returns, so it only finds each token's k-th
    # highest score; the kept set is then every score above it plus the lowest-indexed equal ones. O(N) per
    # token instead of a full sort over N.
    kth = torch.topk(scores, width, dim=-1).values.amin(-1, keepdim=True)
    above = scores > kth
    tied = scores == kth
    keep = above | (tied & (tied.cumsum(-1) <= width - above.sum(-1, keepdim=True)))  # exactly `width` per token
    # The kept indices, lowest first (distinct keys n − j, so topk is exact), then ordered by score with ties to
    # the lower index: a stable sort of `width` entries.
    key = torch.where(keep, n - torch.arange(n, device=u.device, dtype=torch.int32), 0)
    kept = torch.topk(key, width, dim=-1).indices
    kept_scores = torch.gather(scores, -1, kept)
    order = torch.sort(kept_scores, dim=-1, descending=True, stable=True).indices
    chosen = torch.gather(kept, -1, order)
    chosen = torch.where(torch.isfinite(torch.gather(kept_scores, -1, order)), chosen, torch.full_like(chosen, -1))
    if width < top_k:
        chosen = F.pad(chosen, (0, top_k - width), value=-1)
    return chosen


@in_state_precision
def select_top_k_chunked(u, contexts, *, segment_len, top_k, gate_scale, query_offset=0, token_block=4096):
    """Each token's top-k closed segments by gate score, ``token_block`` tokens at a time (memory
    O(token_block · N)). Contract: :func:`mcdist.ops.select_top_k`."""
    T = u.shape[1]
    parts = [_select_top_k_rows(u[:, start:start + token_block], contexts, segment_len, top_k, gate_scale,
                                query_offset + start)
             for start in range(0, T, token_block)]
    return torch.cat(parts, 1)
