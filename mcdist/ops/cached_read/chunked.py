"""The batched read of cached states, the CPU path (docs/math.md §6; docs/architecture.md, "Cached read").

Each run of tokens sharing a segment reads its visible states READ_BLOCK_STATES at a time, a few large GEMMs per
block, and merges the block partials (``mcdist.ops.merge``); linear states have a hand-written backward (the one
of ``mcdist.kernels.cached_read``), deep states are recomputed block by block under activation checkpointing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from mcdist.ops.cached_read.contract import States, check_read_args, num_states, states_dtype
from mcdist.ops.dtypes import in_state_precision
from mcdist.ops.merge import masked_softmax, merge_partials


# Number of cached states one step of the chunked read takes at a time. Temporaries are [B, H, Tq, block, D]
# whatever the segment index, so memory stays flat along the sequence (benchmarks/cpu_read.py chose the size).
READ_BLOCK_STATES = 32


def _state_blocks(count: int):
    """(first, stop) of the blocks of at most READ_BLOCK_STATES states covering [0, count)."""
    return [(first, min(count, first + READ_BLOCK_STATES)) for first in range(0, count, READ_BLOCK_STATES)]


def _block_scores(uq, contexts_t, chosen_t, first_index, gate_scale):
    """Gate scores of a block of states, −inf where a state is not selected.

    uq [B, H, Tq, Dc], contexts_t [B, H, Dc, nb], chosen_t [B, H, Tq, K] or None -> [B, H, Tq, nb].
    """
    scores = gate_scale * torch.matmul(uq, contexts_t)
    if chosen_t is not None:
        index = torch.arange(first_index, first_index + contexts_t.shape[-1], device=uq.device)
        member = (chosen_t[..., None, :] == index[:, None]).any(-1)  # [B, H, Tq, nb]
        scores = scores.masked_fill(~member, float("-inf"))
    return scores


def _weighted_outer(weights, zq, workspace=None):
    """X[t, (j, i)] = w_tj z_ti: weights [B, H, Tq, nb], zq [B, H, Tq, D] -> [B, H, Tq, nb·D].

    Written into the front of ``workspace`` (a flat buffer) when given.
    """
    shape = (*weights.shape, zq.shape[-1])
    out = _in_workspace(workspace, shape)
    if out is None:
        return (weights[..., None] * zq[..., None, :]).flatten(-2)
    return torch.mul(weights[..., None], zq[..., None, :], out=out).flatten(-2)


def _in_workspace(workspace, shape):
    """A contiguous tensor of ``shape`` over the front of the flat buffer ``workspace`` (None: no workspace).

    The blocked read's large temporaries reuse one buffer per call: fresh multi-MiB temporaries per block make
    glibc map, fault in and trim pages again and again (about a quarter of the forward's CPU time at 128K
    tokens, measured with benchmarks/cpu_read.py's inputs).
    """
    return None if workspace is None else workspace[:math.prod(shape)].view(shape)


class _LinearCachedRead(torch.autograd.Function):
    """cached_read_chunked for linear states, with the backward of kernels/cached_read.py written out.

    Layout inside: [B, H, T, D] tokens, and every state stored transposed and stacked, [B, H, N, Din, Dout], so
    that one block of nb states is the [nb·Din, Dout] matrix of ``Σ_j w_tj M_j z_t = X_t · stack`` with X the
    weighted outer product above: each block is one large GEMM per (b, h). The forward merges block partials
    with ``merge_partials``; the backward recomputes the scores block by block and uses the final lse, so no
    O(T · N · D) tensor is ever stored.
    """

    @staticmethod
    def forward(ctx, z, u, states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset):
        B, T, H = z.shape[:3]
        n, dout = states.shape[1], states.shape[3]
        zt, ut, stacked, contexts_t, chosen_t = _linear_layouts(z, u, states, contexts, selected)
        out = z.new_zeros(B, H, T, dout)
        lse = z.new_full((B, H, T), float("-inf"))
        workspace = z.new_empty(_workspace_size(z, states, segment_len))
        for start, stop, visible in _query_segments(T, query_offset, segment_len, segment_offset, n):
            if visible == 0:
                continue
            zq, uq = zt[:, :, start:stop], ut[:, :, start:stop]
            chosen = chosen_t[:, :, start:stop] if chosen_t is not None else None
            merged = None
            for first, last in _state_blocks(visible):
                scores = _block_scores(uq, contexts_t[..., first:last], chosen, segment_offset + first, gate_scale)
                weights, block_lse = masked_softmax(scores, dim=-1)
                part = (torch.matmul(_weighted_outer(weights, zq, workspace),
                                     stacked[:, :, first:last].flatten(2, 3)), block_lse)
                merged = part if merged is None else merge_partials(merged, part)
            out[:, :, start:stop], lse[:, :, start:stop] = merged
        ctx.save_for_backward(z, u, states, contexts, selected, out, lse)
        ctx.settings = (segment_len, gate_scale, query_offset, segment_offset)
        return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        z, u, states, contexts, selected, out, lse = ctx.saved_tensors
        segment_len, gate_scale, query_offset, segment_offset = ctx.settings
        grads = _linear_read_backward(grad_out, grad_lse.transpose(1, 2), z, u, states, contexts, selected, out, lse,
                                      segment_len, gate_scale, query_offset, segment_offset, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None)


def cached_read_backward_chunked(grad_out, grad_lse, z, u, states, contexts, out, lse, *, segment_len, gate_scale,
                                 query_offset=0, segment_offset=0, selected=None):
    """Gradients (dz, du, dstates, dcontexts) of a read of linear states, from the output statistics directly.

    ``out`` [B, T, H, Dout] and ``lse`` [B, T, H] are those of the *whole* read the states took part in (this
    block merged with any others), ``grad_out`` and ``grad_lse`` their gradients. The gradient of a merged read
    with respect to one block's inputs has the block's own form with the merged (out, lse) in place of the
    block's partial (dr_tj = p_tj(⟨dout_t, M_j z_t⟩ − δ_t), p_tj = exp(r_tj − lse_t), δ_t = ⟨dout_t, out_t⟩ −
    dlse_t), so a ring's backward needs no recomputation of the block's partial. Arguments as for
    :func:`cached_read_chunked`; the gradients have the dtypes of the read's inputs cast to the states' dtype.
    """
    check_read_args(z, u, states, contexts, segment_len, selected)
    if not isinstance(states, torch.Tensor):
        raise TypeError("cached_read_backward_chunked: linear states only (a tensor [B, Nb, H, Dout, Din])")
    dtype = states.dtype
    return _linear_read_backward(grad_out.to(dtype), grad_lse.to(dtype).transpose(1, 2), z.to(dtype),
                                 u.to(dtype), states, contexts.to(dtype), selected, out.to(dtype).transpose(1, 2),
                                 lse.to(dtype).transpose(1, 2), segment_len, gate_scale, query_offset,
                                 segment_offset, (True, True, True, True))


def _linear_read_backward(grad_out, grad_lse, z, u, states, contexts, selected, out, lse, segment_len, gate_scale,
                          query_offset, segment_offset, needs):
    """grad_out [B, T, H, Dout], grad_lse [B, H, T]; out [B, H, T, Dout] and lse [B, H, T] of the whole read."""
    B, T, H = z.shape[:3]
    n = states.shape[1]
    zt, ut, stacked, contexts_t, chosen_t = _linear_layouts(z, u, states, contexts, selected)
    grad_out = grad_out.transpose(1, 2).contiguous()  # [B, H, T, Dout]
    delta = (grad_out * out).sum(-1) - grad_lse  # [B, H, T]
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # lse −inf: every p below is 0
    grad_z, grad_u, grad_contexts = torch.zeros_like(zt), torch.zeros_like(ut), torch.zeros_like(contexts_t)
    # dM_j = Σ_t p_tj dout_t z_tᵀ for a block is doutᵀ X, [Dout, nb·Din]: kept in that layout
    grad_states = z.new_zeros(B, H, states.shape[3], n * states.shape[4])  # [B, H, Dout, N·Din]
    din = states.shape[4]
    outer_space, projected_space = (z.new_empty(_workspace_size(z, states, segment_len)) for _ in range(2))
    need_z, need_u, need_states, need_contexts = needs
    for start, stop, visible in _query_segments(T, query_offset, segment_len, segment_offset, n):
        if visible == 0:
            continue
        zq, uq, gq = zt[:, :, start:stop], ut[:, :, start:stop], grad_out[:, :, start:stop]
        chosen = chosen_t[:, :, start:stop] if chosen_t is not None else None
        for first, last in _state_blocks(visible):
            block_contexts = contexts_t[..., first:last]  # [B, H, Dc, nb]
            block_states = stacked[:, :, first:last].flatten(2, 3)  # [B, H, nb·Din, Dout]
            scores = _block_scores(uq, block_contexts, chosen, segment_offset + first, gate_scale)
            p = torch.exp(scores - shift[:, :, start:stop, None])  # [B, H, Tq, nb]
            if need_states:
                grad_states[..., first * din:last * din] += torch.matmul(gq.transpose(-1, -2),
                                                                         _weighted_outer(p, zq, outer_space))
            # projected[t, j] = M_jᵀ dout_t, [B, H, Tq, nb, Din]
            projected = torch.matmul(gq, block_states.transpose(-1, -2), out=_in_workspace(
                projected_space, (B, H, stop - start, (last - first) * din))).unflatten(-1, (last - first, -1))
            if need_z:  # dz_t = Σ_j p_tj M_jᵀ dout_t
                grad_z[:, :, start:stop] += torch.einsum("bhtj,bhtji->bhti", p, projected)
            if need_u or need_contexts:  # dr_tj = p_tj (⟨dout_t, M_j z_t⟩ − δ_t)
                agreement = torch.einsum("bhtji,bhti->bhtj", projected, zq)  # [B, H, Tq, nb]
                grad_scores = gate_scale * p * (agreement - delta[:, :, start:stop, None])
                grad_u[:, :, start:stop] += torch.matmul(grad_scores, block_contexts.transpose(-1, -2))
                grad_contexts[..., first:last] += torch.matmul(uq.transpose(-1, -2), grad_scores)
    return (grad_z.transpose(1, 2) if need_z else None, grad_u.transpose(1, 2) if need_u else None,
            grad_states.unflatten(-1, (n, din)).permute(0, 3, 1, 2, 4) if need_states else None,
            grad_contexts.permute(0, 3, 1, 2) if need_contexts else None)


def _workspace_size(z, states, segment_len):
    """Elements of one [B, H, Tq, nb, Din] temporary at the largest query run and block."""
    B, T, H = z.shape[:3]
    return B * H * min(T, segment_len) * min(READ_BLOCK_STATES, states.shape[1]) * states.shape[4]


def _linear_layouts(z, u, states, contexts, selected):
    """The [B, H, ...] layouts _LinearCachedRead works in (one copy of each input)."""
    zt = z.transpose(1, 2).contiguous()  # [B, H, T, Din]
    ut = u.transpose(1, 2).contiguous()  # [B, H, T, Dc]
    stacked = states.permute(0, 2, 1, 4, 3).contiguous()  # [B, H, N, Din, Dout]
    contexts_t = contexts.permute(0, 2, 3, 1).contiguous()  # [B, H, Dc, N]
    chosen_t = selected.transpose(1, 2) if selected is not None else None  # [B, H, T, K]
    return zt, ut, stacked, contexts_t, chosen_t


def _deep_layouts(states):
    """Deep states as [B, H, N, E, D] both (W2 transposed), so a block flattens to [nb·E, D] without a copy."""
    w1, w2 = states
    return w1.permute(0, 2, 1, 3, 4).contiguous(), w2.permute(0, 2, 1, 4, 3).contiguous()


def _deep_block_sum(zq, w1_block, w2_block, weights):
    """Σ_j w_tj M_j(z_t) = z_t Σ_j w_tj + Σ_j w_tj W2_j φ(W1_j z_t) over one block of deep states, as two GEMMs.

    zq [B, H, Tq, D], w1_block and w2_block (W2 transposed) [B, H, nb, E, D], weights [B, H, Tq, nb]
    -> [B, H, Tq, D].
    """
    hidden = F.gelu(torch.matmul(zq, w1_block.flatten(2, 3).transpose(-1, -2)))  # [B, H, Tq, nb·E]
    mixed = (weights[..., None] * hidden.unflatten(-1, (weights.shape[-1], -1))).flatten(-2)
    return zq * weights.sum(-1, keepdim=True) + torch.matmul(mixed, w2_block.flatten(2, 3))


def _deep_block_partial(zq, uq, w1_block, w2_block, block_contexts, chosen, first_index, gate_scale):
    """Partial (out [B, H, Tq, D], lse [B, H, Tq]) of one block of deep states."""
    weights, lse = masked_softmax(_block_scores(uq, block_contexts, chosen, first_index, gate_scale), dim=-1)
    return _deep_block_sum(zq, w1_block, w2_block, weights), lse


def _maybe_checkpoint(function, *args):
    if torch.is_grad_enabled():
        # recompute in the backward: memory O(Tq · block · E) at a time instead of O(T · N · E) in all
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _deep_cached_read(z, u, states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset):
    B, T, H, D = z.shape
    n = states[0].shape[1]
    zt, ut = z.transpose(1, 2), u.transpose(1, 2)  # [B, H, T, D], [B, H, T, Dc]
    w1_t, w2_t = _deep_layouts(states)
    contexts_t = contexts.permute(0, 2, 3, 1)  # [B, H, Dc, N]
    chosen_t = selected.transpose(1, 2) if selected is not None else None
    out_parts, lse_parts = [], []
    for start, stop, visible in _query_segments(T, query_offset, segment_len, segment_offset, n):
        zq, uq = zt[:, :, start:stop], ut[:, :, start:stop]
        if visible == 0:
            out_parts.append(torch.zeros_like(zq))
            lse_parts.append(zq.new_full(zq.shape[:3], float("-inf")))
            continue
        chosen = chosen_t[:, :, start:stop] if chosen_t is not None else None
        merged = None
        for first, last in _state_blocks(visible):
            part = _maybe_checkpoint(_deep_block_partial, zq, uq, w1_t[:, :, first:last], w2_t[:, :, first:last],
                                     contexts_t[..., first:last], chosen, segment_offset + first, gate_scale)
            merged = part if merged is None else merge_partials(merged, part)
        out_parts.append(merged[0])
        lse_parts.append(merged[1])
    return torch.cat(out_parts, 2).transpose(1, 2), torch.cat(lse_parts, 2).transpose(1, 2)


@in_state_precision
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

    Each run of tokens sharing a segment reads its visible states READ_BLOCK_STATES at a time (a few large
    GEMMs per block) and merges the blocks' partials, so memory does not grow with the segment index; the
    backward recomputes block by block. ssc evaluates every visible state and masks the unselected ones.
    """
    check_read_args(z, u, states, contexts, segment_len, selected)
    dtype = states_dtype(states)
    args = (z.to(dtype), u.to(dtype), states, contexts.to(dtype), selected, segment_len, gate_scale, query_offset,
            segment_offset)
    if isinstance(states, torch.Tensor):
        return _LinearCachedRead.apply(*args)
    return _deep_cached_read(*args)


@in_state_precision
def residual_read_chunked(z, states: States, *, segment_len, query_offset=0, segment_offset=0):
    """Σ over visible cached states of M_j(z_t), unweighted (the `residual` aggregation). -> [B, T, H, Dout]."""
    dtype = states_dtype(states)
    n = num_states(states)
    if isinstance(states, torch.Tensor):
        # Linear maps sum first: prefix[:, i] = Σ_{j < i} M_j for i in [0, Nb], then one product per query
        # segment. Built without M_i itself, so later tokens never leak in.
        prefix = torch.cat([torch.zeros_like(states[:, :1]), torch.cumsum(states, dim=1)], 1)
        out_parts = [torch.einsum("bhoi,bthi->btho", prefix[:, visible], z[:, start:stop].to(dtype))
                     for start, stop, visible in _query_segments(z.shape[1], query_offset, segment_len,
                                                                 segment_offset, n)]
        return torch.cat(out_parts, 1)
    zt = z.to(dtype).transpose(1, 2)  # [B, H, T, D]
    w1_t, w2_t = _deep_layouts(states)
    out_parts = []
    for start, stop, visible in _query_segments(z.shape[1], query_offset, segment_len, segment_offset, n):
        zq = zt[:, :, start:stop]
        total = torch.zeros_like(zq)
        for first, last in _state_blocks(visible):
            ones = zq.new_ones(*zq.shape[:3], last - first)
            total = total + _maybe_checkpoint(_deep_block_sum, zq, w1_t[:, :, first:last], w2_t[:, :, first:last],
                                              ones)
        out_parts.append(total)
    return torch.cat(out_parts, 2).transpose(1, 2)


def _query_segments(T: int, query_offset: int, segment_len: int, segment_offset: int, n: int):
    """(start, stop, visible states) for each run of local tokens that share one global segment."""
    start = 0
    while start < T:
        own = (query_offset + start) // segment_len
        stop = min(T, start + segment_len - (query_offset + start) % segment_len)
        yield start, stop, max(0, min(n, own - segment_offset))
        start = stop
