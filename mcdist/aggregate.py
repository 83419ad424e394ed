"""Segment contexts, gate scores and the read of cached memories (SPEC §5–§6).

The read of a block of cached states returns a *partial* (out, lse): the block's softmax-weighted read and the
log-sum-exp of its gate scores. Partials merge exactly (``merge_partials``), so the online term, the local
cached states and blocks arriving from other ranks combine in any grouping (docs/architecture.md).

``cached_read_reference`` loops over tokens and states; ``cached_read_chunked`` is the batched CPU path; the
Triton kernel lives in ``mcdist.kernels.cached_read``. ``states`` is a tensor [B, Nb, H, Dout, Din] (a linear
map, read as M z) or, for deep memory, a pair (W1 [B, Nb, H, E, D], W2 [B, Nb, H, D, E]) read as the MLP
z + W2 φ(W1 z).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mcdist.kernels.merge import merge_all, merge_partials
from mcdist.memory.deep import mlp_read

States = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = ["segment_contexts", "online_scores", "cached_read_reference", "cached_read_chunked", "select_top_k",
           "residual_read_chunked", "merge_partials", "merge_all"]


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
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
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


def masked_softmax(scores: torch.Tensor, dim: int):
    """Softmax and log-sum-exp over ``dim`` where −inf marks excluded entries; all excluded gives weights 0 and
    lse −inf with finite gradients (no NaN)."""
    peak = scores.amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    exps = torch.exp(scores - peak)
    total = exps.sum(dim=dim, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, peak + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return exps / safe_total, lse.squeeze(dim)


def _num_states(states: States) -> int:
    return states.shape[1] if isinstance(states, torch.Tensor) else states[0].shape[1]


def _state_dtype(states: States) -> torch.dtype:
    return states.dtype if isinstance(states, torch.Tensor) else states[0].dtype


def _read_states(z: torch.Tensor, states: States, count: int) -> torch.Tensor:
    """Every state of [0, count) applied to every token: z [B, Tq, H, Din] -> [B, Tq, count, H, Dout]."""
    if isinstance(states, torch.Tensor):
        return torch.einsum("bnhoi,bthi->btnho", states[:, :count], z)
    w1, w2 = (w[:, :count] for w in states)
    zz = z[:, :, None].expand(-1, -1, count, -1, -1)
    return mlp_read(zz, w1[:, None], w2[:, None])


def _check_read_args(z, u, states, contexts, segment_len, selected):
    if z.dim() != 4 or u.dim() != 4 or z.shape[:3] != u.shape[:3]:
        raise ValueError(f"z and u must be [B, T, H, *] with one B, T, H; got {tuple(z.shape)}, {tuple(u.shape)}")
    n = _num_states(states)
    B, T, H = z.shape[:3]
    if contexts.dim() != 4 or tuple(contexts.shape[:3]) != (B, n, H) or contexts.shape[3] != u.shape[3]:
        raise ValueError(f"contexts must be [B, Nb, H, Dc] = {(B, n, H, u.shape[3])}; got {tuple(contexts.shape)}")
    if segment_len <= 0:
        raise ValueError(f"segment_len = {segment_len}; expected a positive integer")
    if selected is not None and (selected.dim() != 4 or tuple(selected.shape[:3]) != (B, T, H)):
        raise ValueError(f"selected must be [B, T, H, K] with (B, T, H) = {(B, T, H)}; got {tuple(selected.shape)}")


def _token_segments(T: int, query_offset: int, segment_len: int, device) -> torch.Tensor:
    return (torch.arange(T, device=device) + query_offset) // segment_len


def cached_read_reference(z, u, states: States, contexts, *, segment_len, gate_scale, query_offset=0,
                          segment_offset=0, selected=None):
    """Token and state loops; see ``cached_read_chunked`` for the contract."""
    _check_read_args(z, u, states, contexts, segment_len, selected)
    B, T, H = z.shape[:3]
    dtype = _state_dtype(states)
    n = _num_states(states)
    dout = states.shape[3] if isinstance(states, torch.Tensor) else z.shape[-1]
    out_rows, lse_rows = [], []
    for bi in range(B):
        for t in range(T):
            own = (query_offset + t) // segment_len
            for h in range(H):
                scores, reads = [], []
                for j in range(n):
                    index = segment_offset + j
                    if index >= own:
                        continue
                    if selected is not None and index not in selected[bi, t, h].tolist():
                        continue
                    scores.append(gate_scale * (u[bi, t, h].to(dtype) * contexts[bi, j, h].to(dtype)).sum())
                    if isinstance(states, torch.Tensor):
                        reads.append(states[bi, j, h] @ z[bi, t, h].to(dtype))
                    else:
                        reads.append(mlp_read(z[bi, t, h].to(dtype), states[0][bi, j, h], states[1][bi, j, h]))
                if scores:
                    weights = torch.softmax(torch.stack(scores), 0)
                    out_rows.append((weights[:, None] * torch.stack(reads)).sum(0))
                    lse_rows.append(torch.logsumexp(torch.stack(scores), 0))
                else:
                    out_rows.append(torch.zeros(dout, dtype=dtype, device=z.device))
                    lse_rows.append(torch.tensor(float("-inf"), dtype=dtype, device=z.device))
    out = torch.stack(out_rows).reshape(B, T, H, -1)
    lse = torch.stack(lse_rows).reshape(B, T, H)
    return out, lse


def _segment_read(zq, uq, states, contexts, chosen, visible, segment_offset, gate_scale):
    """Queries of one segment against the first ``visible`` states: (out [B, Tq, H, Dout], lse [B, Tq, H])."""
    scores = gate_scale * torch.einsum("bthc,bnhc->btnh", uq, contexts)  # [B, Tq, n, H]
    if chosen is not None:
        index = torch.arange(visible, device=zq.device) + segment_offset
        member = (chosen[:, :, None, :, :] == index[None, None, :, None, None]).any(-1)
        scores = scores.masked_fill(~member, float("-inf"))
    weights, lse = masked_softmax(scores, dim=2)  # [B, Tq, n, H], [B, Tq, H]
    reads = _read_states(zq, states, visible)  # [B, Tq, n, H, Dout]
    return torch.einsum("btnh,btnho->btho", weights, reads), lse


def cached_read_chunked(z, u, states: States, contexts, *, segment_len, gate_scale, query_offset=0,
                        segment_offset=0, selected=None):
    """Softmax-gated read of one block of cached states, as a partial.

    Args:
        z: [B, T, H, Din] vectors the states are applied to. u: [B, T, H, Dc] gate queries.
        states: [B, Nb, H, Dout, Din], or deep memory's (W1 [B, Nb, H, E, D], W2 [B, Nb, H, D, E]).
        contexts: [B, Nb, H, Dc]. segment_len: C. gate_scale: τ.
        query_offset: global position of token 0. segment_offset: global segment index of state 0.
        selected: optional [B, T, H, K] global segment indices (−1 = empty) each token may read (ssc).
    Returns:
        (out [B, T, H, Dout], lse [B, T, H]): out_t = Σ_j softmax_j(τ⟨u_t, c_j⟩) M_j(z_t) over the states
        visible to t (global index < t's segment, and selected if given); lse_t their log-sum-exp; tokens that
        see nothing get out 0, lse −inf.
    """
    _check_read_args(z, u, states, contexts, segment_len, selected)
    B, T, H = z.shape[:3]
    dtype = _state_dtype(states)
    n = _num_states(states)
    out_parts, lse_parts = [], []
    for start, stop, visible in _query_segments(T, query_offset, segment_len, segment_offset, n):
        zq = z[:, start:stop].to(dtype)
        if visible == 0:
            dout = states.shape[3] if isinstance(states, torch.Tensor) else zq.shape[-1]
            out_parts.append(zq.new_zeros(B, stop - start, H, dout))
            lse_parts.append(zq.new_full((B, stop - start, H), float("-inf")))
        else:
            chosen = selected[:, start:stop] if selected is not None else None
            args = (zq, u[:, start:stop].to(dtype), states, contexts[:, :visible].to(dtype), chosen, visible,
                    segment_offset, gate_scale)
            if torch.is_grad_enabled():
                # recompute in the backward: memory O(C · n · D) per segment instead of O(T · N · D) in all
                out, lse = checkpoint(_segment_read, *args, use_reentrant=False)
            else:
                out, lse = _segment_read(*args)
            out_parts.append(out)
            lse_parts.append(lse)
    return torch.cat(out_parts, 1), torch.cat(lse_parts, 1)


def _summed_reads(zq, states, visible):
    return _read_states(zq, states, visible).sum(2)


def residual_read_chunked(z, states: States, *, segment_len, query_offset=0, segment_offset=0):
    """Σ over visible cached states of M_j(z_t), unweighted (the `residual` aggregation). -> [B, T, H, Dout]."""
    dtype = _state_dtype(states)
    n = _num_states(states)
    linear = isinstance(states, torch.Tensor)
    if linear:
        # Linear maps sum first: prefix[:, i] = Σ_{j < i} M_j for i in [0, Nb], then one product per query
        # segment. Built without M_i itself, so later tokens never leak in.
        prefix = torch.cat([torch.zeros_like(states[:, :1]), torch.cumsum(states, dim=1)], 1)
    out_parts = []
    for start, stop, visible in _query_segments(z.shape[1], query_offset, segment_len, segment_offset, n):
        zq = z[:, start:stop].to(dtype)
        if linear:
            out_parts.append(torch.einsum("bhoi,bthi->btho", prefix[:, visible], zq))
        elif visible == 0:
            out_parts.append(torch.zeros_like(zq))
        elif torch.is_grad_enabled():
            out_parts.append(checkpoint(_summed_reads, zq, states, visible, use_reentrant=False))
        else:
            out_parts.append(_summed_reads(zq, states, visible))
    return torch.cat(out_parts, 1)


def _query_segments(T: int, query_offset: int, segment_len: int, segment_offset: int, n: int):
    """(start, stop, visible states) for each run of local tokens that share one global segment."""
    start = 0
    while start < T:
        own = (query_offset + start) // segment_len
        stop = min(T, start + segment_len - (query_offset + start) % segment_len)
        yield start, stop, max(0, min(n, own - segment_offset))
        start = stop


def select_top_k(u, contexts, *, segment_len, top_k, gate_scale, query_offset=0, token_block=4096):
    """Each token's top-k closed segments by gate score (SPEC §6, ssc); ties go to the lower index.

    Args:
        u: [B, T, H, D]; contexts: [B, N, H, D] of *all* segments from global index 0.
    Returns:
        [B, T, H, top_k] int64 global segment indices, −1 where fewer than top_k segments precede the token.
        Tokens are scored ``token_block`` at a time, so memory stays O(token_block · N).
    """
    T = u.shape[1]
    parts = [_select_top_k_rows(u[:, start:start + token_block], contexts, segment_len, top_k, gate_scale,
                                query_offset + start)
             for start in range(0, T, token_block)]
    return torch.cat(parts, 1)


def _select_top_k_rows(u, contexts, segment_len, top_k, gate_scale, query_offset):
    n = contexts.shape[1]
    segments = _token_segments(u.shape[1], query_offset, segment_len, u.device)
    scores = gate_scale * torch.einsum("bthc,bnhc->bthn", u.to(contexts.dtype), contexts)  # [B, T, H, N]
    visible = torch.arange(n, device=u.device)[None, :] < segments[:, None]  # [T, N]
    scores = scores.detach().masked_fill(~visible[None, :, None, :], float("-inf"))
    width = min(top_k, n)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :width]
    chosen = torch.where(torch.isfinite(torch.gather(scores, -1, order)), order, torch.full_like(order, -1))
    if width < top_k:
        chosen = F.pad(chosen, (0, top_k - width), value=-1)
    return chosen
