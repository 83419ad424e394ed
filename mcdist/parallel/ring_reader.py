"""The ring reader: a Memory Caching layer's reader under sequence parallelism (docs/distributed.md).

``parallelize`` gives each layer a :class:`SequenceShard`; the layer asks it for a :class:`RingReader` and runs
its one computation path (``MemoryCachingLayer.compute``: projections → memory pass → aggregation → output) on
this rank's pieces of the sequence (``layout``). The reader communicates only where the mathematics needs another
rank's data:

- memory pass: ``independent`` needs nothing; ``checkpoint`` over linear memory gathers one (A, B) pair per piece
  (M_out = A·M_in + B) and scans them; ``checkpoint`` over deep memory gathers k, v, θ and recomputes the
  running state over the prefix (as slow as a serial hand-off; docs/distributed.md).
- read: a ring carries each rank's cached states and contexts to every other rank (``ring_read``); partials
  merge by log-sum-exp. ``residual`` over linear memory is an exclusive prefix sum of per-piece state sums.
  ``ssc`` all-gathers the contexts first and selects each token's top-k globally.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from mcdist import ops
from mcdist.parallel.comm import Exchange, SPGroup, all_gather_tensor, all_gather_with_grad
from mcdist.parallel.layout import check_sequence_length, last_piece_owner, rank_pieces
from mcdist.readers import LayerCache, MemoryResult, Projections, Reader, cat_states, fill_cache


@dataclass
class Shard:
    """Where this rank's tokens lie in the whole sequence."""

    sp: SPGroup
    layout: str
    seq_len: int
    segment_len: int

    def pieces(self, rank: Optional[int] = None) -> List[Tuple[int, int]]:
        return rank_pieces(self.seq_len, self.sp.size, self.sp.rank if rank is None else rank, self.layout)

    def local_pieces(self):
        """(local offset, global start, length) of each local piece."""
        offset, out = 0, []
        for start, length in self.pieces():
            out.append((offset, start, length))
            offset += length
        return out

    def global_order(self):
        """(rank, local piece index) of every piece of the sequence, in sequence order."""
        entries = [(start, rank, j) for rank in range(self.sp.size) for j, (start, _) in enumerate(self.pieces(rank))]
        return [(rank, j) for _, rank, j in sorted(entries)]


def sp_project(layer, x: torch.Tensor, shard: Shard, *, with_tail: bool = False):
    """``layer.project`` of this rank's pieces x [B, T_local, d_model]. With a short convolution (``conv_size`` = w),
    each piece's first tokens read the w − 1 tokens before it, which another rank holds: every rank sends the last
    w − 1 rows of ``qkv`` of each of its pieces to all (one all-gather, with its gradient).

    ``with_tail``: also return the ``qkv`` rows of the sequence's last w − 1 tokens (every rank; for the inference
    cache), else ``None``."""
    w = layer.config.conv_size
    if not w:
        return layer.project(x), None
    raw = layer.qkv(x)  # [B, T_local, 3HD]
    pieces = shard.local_pieces()
    tails = torch.stack([raw[:, offset + length - (w - 1):offset + length] for offset, _, length in pieces], 1)
    gathered = all_gather_with_grad(tails, shard.sp, "conv")  # [P, B, pieces, w - 1, 3HD]
    # one table of every piece's tail, then zeros (what the sequence's first piece reads): every rank reads the
    # gathered tensor, so every rank runs its backward (a collective) even when its only piece starts the sequence
    table = torch.cat([gathered.transpose(0, 1).flatten(1, 2), tails.new_zeros(tails[:, :1].shape)], 1)
    row = {start + length: rank * len(pieces) + j for rank in range(shard.sp.size)
           for j, (start, length) in enumerate(shard.pieces(rank))}
    row[0] = table.shape[1] - 1
    mixed = [layer.short_conv(raw[:, offset:offset + length], table[:, row[start]])
             for offset, start, length in pieces]
    last = table[:, row[shard.seq_len]] if with_tail else None
    return layer.project(x, mixed=torch.cat(mixed, 1)), last


def _slice(p: Projections, offset: int, length: int) -> Projections:
    return Projections(*(None if x is None else x[:, offset:offset + length] for x in p))


# -- memory pass ---------------------------------------------------------------------------------------------


def sp_memory_pass(layer, p: Projections, shard: Shard, impl: str) -> MemoryResult:
    cfg = layer.config
    if cfg.is_deep and cfg.state_init == "checkpoint":
        return _deep_checkpoint_pass(layer, p, shard, impl)
    previous = [None] * len(shard.local_pieces())
    if cfg.memory == "swla" and cfg.state_init == "checkpoint":  # under independent a piece opens a segment
        previous = _previous_tokens(p, shard)
    results = [layer.memory_pass(_slice(p, offset, length), impl=impl, previous=before)
               for (offset, _, length), before in zip(shard.local_pieces(), previous)]
    if cfg.state_init == "checkpoint":
        results = _linear_prefix_scan(p, results, shard)
    minibatch = None
    if cfg.is_deep:
        minibatch = cat_states([r.minibatch_weights for r in results])
    return MemoryResult(torch.cat([r.online_out for r in results], 1),
                        cat_states([r.cached_states for r in results]), None, minibatch, cfg.minibatch_len)


def _previous_tokens(p: Projections, shard: Shard) -> list:
    """swla: (k, v) [B, H, D] of the token before each local piece (zeros for the sequence's first piece), which
    another rank may hold: every rank sends its pieces' last (k, v) to all (one all-gather, with its gradient), as
    ``sp_project`` sends the short convolution's rows."""
    pieces = shard.local_pieces()
    tails = torch.stack([torch.stack([p.k[:, offset + length - 1], p.v[:, offset + length - 1]], 1)
                         for offset, _, length in pieces], 1)  # [B, pieces, 2, H, D]
    gathered = all_gather_with_grad(tails, shard.sp, "swla")  # [P, B, pieces, 2, H, D]
    # every piece's last token, then zeros (what the sequence's first piece reads): every rank reads the gathered
    # tensor, so every rank runs its backward (a collective) even when its only piece starts the sequence
    table = torch.cat([gathered.transpose(0, 1).flatten(1, 2), tails.new_zeros(tails[:, :1].shape)], 1)
    row = {start + length: rank * len(pieces) + j for rank in range(shard.sp.size)
           for j, (start, length) in enumerate(shard.pieces(rank))}
    row[0] = table.shape[1] - 1
    return [(table[:, row[start], 0], table[:, row[start], 1]) for _, start, _ in pieces]


def _linear_prefix_scan(p: Projections, results, shard: Shard):
    """Correct piece-local results (computed from a zero state) with each piece's true incoming state."""
    C = shard.segment_len
    B, _, H, D = p.q.shape
    log_a, finals = [], []
    for (offset, _, length), result in zip(shard.local_pieces(), results):
        if p.log_decay is None:
            log_a.append(p.q.new_zeros(B, H, dtype=result.final_state.dtype))
        else:
            log_a.append(p.log_decay[:, offset:offset + length].sum(1).to(result.final_state.dtype))
        finals.append(result.final_state)
    incoming = piece_scan(torch.stack(log_a), torch.stack(finals), shard)  # [pieces, B, H, D, D]
    corrected = []
    for j, ((offset, _, length), result) in enumerate(zip(shard.local_pieces(), results)):
        m_in = incoming[j]  # [B, H, D, D]
        if p.log_decay is None:
            cum = m_in.new_zeros(B, length, H)
        else:
            cum = torch.cumsum(p.log_decay[:, offset:offset + length].to(m_in.dtype), 1)  # [B, T_piece, H]
        q = p.q[:, offset:offset + length].to(m_in.dtype)
        online = result.online_out + (torch.exp(cum)[..., None] * torch.einsum("bhij,bthj->bthi", m_in, q)).to(
            result.online_out.dtype)
        segment_end = torch.exp(cum[:, C - 1::C])  # [B, n_segments, H]
        cached = result.cached_states + segment_end[..., None, None] * m_in[:, None]
        corrected.append(MemoryResult(online, cached, None))
    return corrected


class _PieceScan(torch.autograd.Function):
    """State before every local piece of the recurrence M_next = exp(log_a)·M + b over all pieces of the
    sequence in order, from M = 0. Forward gathers every piece's (log_a, b); backward gathers the gradients of
    every piece's incoming state and runs the scan backwards. One autograd node, used on every rank, so every
    rank joins the backward collective."""

    @staticmethod
    def forward(ctx, shard: Shard, log_a, b):
        all_log_a = all_gather_tensor(log_a, shard.sp, "prefix")  # [P, pieces, B, H]
        all_b = all_gather_tensor(b, shard.sp, "prefix")  # [P, pieces, B, H, D, D]
        order = shard.global_order()
        incoming, state = {}, torch.zeros_like(b[0])
        for rank, j in order:
            incoming[(rank, j)] = state
            state = torch.exp(all_log_a[rank, j])[..., None, None] * state + all_b[rank, j]
        ctx.shard, ctx.order, ctx.incoming = shard, order, incoming
        ctx.save_for_backward(all_log_a)
        return torch.stack([incoming[(shard.sp.rank, j)] for j in range(b.shape[0])])

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        (all_log_a,) = ctx.saved_tensors
        all_grad = all_gather_tensor(grad, shard.sp, "prefix_backward")
        grad_log_a = torch.zeros_like(all_log_a[shard.sp.rank])
        grad_b = torch.zeros_like(grad)
        after = torch.zeros_like(grad[0])  # gradient of the state after the piece
        for rank, j in reversed(ctx.order):
            decay = torch.exp(all_log_a[rank, j])
            if rank == shard.sp.rank:
                grad_b[j] = after
                grad_log_a[j] = decay * (after * ctx.incoming[(rank, j)]).sum((-1, -2))
            after = all_grad[rank, j] + decay[..., None, None] * after
        return None, grad_log_a, grad_b


def piece_scan(log_a: torch.Tensor, b: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Incoming state of each local piece: log_a [pieces, B, H], b [pieces, B, H, D, D] -> [pieces, B, H, D, D]."""
    return _PieceScan.apply(shard, log_a, b)


def _assemble(gathered: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The full sequence [B, L, ...] from an all-gathered [P, B, T_local, ...] tensor."""
    placed = []
    for rank in range(shard.sp.size):
        offset = 0
        for start, length in shard.pieces(rank):
            placed.append((start, gathered[rank][:, offset:offset + length]))
            offset += length
    return torch.cat([x for _, x in sorted(placed, key=lambda item: item[0])], 1)


def _deep_checkpoint_pass(layer, p: Projections, shard: Shard, impl: str) -> MemoryResult:
    cfg = layer.config
    k, v, theta = (_assemble(all_gather_with_grad(x, shard.sp, "prefix_inputs"), shard) for x in (p.k, p.v, p.theta))
    end = max(start + length for _, start, length in shard.local_pieces())
    run = ops.deep_memory(k[:, :end], v[:, :end], theta[:, :end], segment_len=cfg.segment_len,
                          minibatch_len=cfg.minibatch_len, state_init="checkpoint", impl=impl,
                          **layer.deep_parameters())
    b, C = cfg.minibatch_len, cfg.segment_len
    online, cached, minibatch = [], [], []
    for offset, start, length in shard.local_pieces():
        weights = tuple(w[:, start // b:(start + length) // b] for w in run.minibatch_weights)
        minibatch.append(weights)
        cached.append(tuple(w[:, start // C:(start + length) // C] for w in run.cached_states))
        online.append(ops.deep_online_read(p.q[:, offset:offset + length], weights, b))
    # run.final_state is the running state after this rank's last token (a prefill keeps it)
    return MemoryResult(torch.cat(online, 1), cat_states(cached), run.final_state, cat_states(minibatch), b)


# -- the ring read -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RingPlan:
    """Which of every rank's cached states travel on which hop of the ring (docs/distributed.md §5).

    Rank o's block (its cached states and contexts, in local order) visits the ranks o + d, o + 2d, ... (hops
    1 .. P−1, d = ``direction``). On hop h it carries only its first ``carry[o][h]`` states: those the rank of
    that hop or a later one can see (a state is visible to a rank iff its segment precedes the rank's last
    token's segment). Every layout here orders a block's states by position, so what any rank needs is a prefix.
    ``carry[o][0]`` is the whole block (the owner reads it) and ``carry[o][P]`` is 0. The direction is the one
    that moves fewer states: zigzag runs r → r−1 (a rank's late piece is wanted only by lower ranks, so it stops
    at rank 0), contiguous runs r → r+1 (a block stops at the last rank); either way every rank receives exactly
    the states it reads.
    """

    size: int
    direction: int
    carry: tuple

    def origin(self, rank: int, step: int) -> int:
        """Owner of the block ``rank`` holds at ``step`` (hop ``step`` of that block)."""
        return (rank - step * self.direction) % self.size

    def hop(self, origin: int, step: int) -> int:
        """Rank that holds ``origin``'s block at ``step``."""
        return (origin + step * self.direction) % self.size

    def next(self, rank: int) -> int:
        return (rank + self.direction) % self.size

    def previous(self, rank: int) -> int:
        return (rank - self.direction) % self.size


@functools.lru_cache(maxsize=64)
def ring_plan(seq_len: int, size: int, layout: str, segment_len: int) -> RingPlan:
    """The :class:`RingPlan` of one sequence layout (a pure function of it: every rank computes the same)."""
    C = segment_len
    pieces = [rank_pieces(seq_len, size, rank, layout) for rank in range(size)]
    last_segment = [max((start + length - 1) // C for start, length in own) for own in pieces]

    def needed(origin: int, reader: int) -> int:
        """Length of the shortest prefix of ``origin``'s block holding every state ``reader`` can see."""
        prefix, position = 0, 0
        for start, length in pieces[origin]:
            first, n = start // C, length // C
            visible = min(n, max(0, last_segment[reader] - first))
            if visible:
                prefix = position + visible
            position += n
        return prefix

    best = None
    for direction in (1, -1):
        carry = []
        for origin in range(size):
            row = [sum(length for _, length in pieces[origin]) // C] + [0] * size
            for step in range(size - 1, 0, -1):  # what this hop or a later one needs
                row[step] = max(row[step + 1], needed(origin, (origin + step * direction) % size))
            carry.append(tuple(row))
        moved = sum(sum(row[1:size]) for row in carry)
        if best is None or moved < best[0]:
            best = (moved, RingPlan(size, direction, tuple(carry)))
    return best[1]


def _plan_of(shard: Shard) -> RingPlan:
    return ring_plan(shard.seq_len, shard.sp.size, shard.layout, shard.segment_len)


def _head(tensors, n: int) -> list:
    """The first n states of each block tensor ([B, N, ...])."""
    return [t[:, :n] for t in tensors]


def _empty_states(tensors, n: int) -> list:
    """Receive buffers for n states shaped like each block tensor."""
    return [t.new_empty((t.shape[0], n, *t.shape[2:])) for t in tensors]


@dataclass
class _RingSpec:
    shard: Shard
    gate_scale: float
    selected: Optional[torch.Tensor]
    impl: str
    deep: bool  # block holds (W1, W2) read as an MLP, else one linear map


def _unpack(block, deep):
    """Block tensors -> (states, contexts)."""
    return ((block[0], block[1]) if deep else block[0]), block[-1]


def _block_reads(block, origin: int, spec: _RingSpec):
    """The reads one block (from rank ``origin``) takes part in: for every local query piece, the pieces of the
    block that some of its tokens can see, as (offset, start, length, chosen, piece states, piece contexts,
    state slice, first global segment index), and the local pieces that see none of the block."""
    shard = spec.shard
    C = shard.segment_len
    states, contexts = _unpack(block, spec.deep)
    in_hand = contexts.shape[1]  # the ring carries only the leading states some rank ahead can see (RingPlan)
    for offset, start, length in shard.local_pieces():
        chosen = spec.selected[:, offset:offset + length] if spec.selected is not None else None
        last_segment = (start + length - 1) // C
        reads, first = [], 0
        for state_start, state_length in shard.pieces(origin):
            n = min(state_length // C, in_hand - first)
            first_index = state_start // C
            piece = slice(first, first + n)
            first += n
            if n <= 0 or first_index > last_segment:
                continue  # every state of this piece lies after every token here
            if chosen is not None and not ((chosen >= first_index) & (chosen < first_index + n)).any():
                continue  # ssc: no token here selected any of these segments
            piece_states = (states[0][:, piece], states[1][:, piece]) if spec.deep else states[:, piece]
            reads.append((piece_states, contexts[:, piece], piece, first_index))
        yield offset, start, length, chosen, reads


def _block_partial(z, u, block, origin: int, spec: _RingSpec):
    """Partial read of every local query piece against the pieces of the block that came from ``origin``."""
    C = spec.shard.segment_len
    states, contexts = _unpack(block, spec.deep)
    B, _, H = z.shape[:3]
    dout = z.shape[-1] if spec.deep else states.shape[3]
    outs, lses = [], []
    for offset, start, length, chosen, reads in _block_reads(block, origin, spec):
        zq, uq = z[:, offset:offset + length], u[:, offset:offset + length]
        partials = [ops.cached_read(zq, uq, piece_states, piece_contexts, segment_len=C, gate_scale=spec.gate_scale,
                                    query_offset=start, segment_offset=first_index, selected=chosen, impl=spec.impl)
                    for piece_states, piece_contexts, _, first_index in reads]
        if partials:
            out, lse = ops.merge_all(partials)
        else:
            out = zq.new_zeros(B, length, H, dout, dtype=contexts.dtype)
            lse = zq.new_full((B, length, H), float("-inf"), dtype=contexts.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _direct_backward(spec: _RingSpec) -> bool:
    """Linear states on the chunked or Triton path: a block's gradients come straight from the merged (out, lse)
    (``ops.cached_read_backward``), without recomputing its partial."""
    return not spec.deep and spec.impl in ("chunked", "triton", "auto")


def _block_gradients(z, u, block, origin, spec, out, lse, grad_out, grad_lse, grad_z, grad_u, accumulated):
    """Linear states: the merged read's gradients with respect to one block, from the merged statistics (added
    into grad_z, grad_u and the block's accumulator)."""
    C = spec.shard.segment_len
    grad_states, grad_contexts = accumulated
    for offset, start, length, chosen, reads in _block_reads(block, origin, spec):
        rows = slice(offset, offset + length)
        for piece_states, piece_contexts, piece, first_index in reads:
            dz, du, dstates, dcontexts = ops.cached_read_backward(
                grad_out[:, rows], grad_lse[:, rows], z[:, rows], u[:, rows], piece_states, piece_contexts,
                out[:, rows], lse[:, rows], segment_len=C, gate_scale=spec.gate_scale, query_offset=start,
                segment_offset=first_index, selected=chosen, impl=spec.impl)
            grad_z[:, rows] += dz.to(z.dtype)
            grad_u[:, rows] += du.to(u.dtype)
            grad_states[:, piece] += dstates.to(grad_states.dtype)
            grad_contexts[:, piece] += dcontexts.to(grad_contexts.dtype)


class _RingRead(torch.autograd.Function):
    """Read every rank's cached states: P−1 ring steps forward (each block trimmed to what ranks ahead can see,
    :class:`RingPlan`); backward runs the ring again and brings the gradients of each block's states and contexts
    home, each part as soon as no rank ahead adds to it."""

    @staticmethod
    def forward(ctx, spec: _RingSpec, z, u, *block):
        sp = spec.shard.sp
        plan = _plan_of(spec.shard)
        in_hand = [t.detach() for t in block]
        out = lse = None
        for step in range(sp.size):
            origin = plan.origin(sp.rank, step)
            exchange = None
            if step < sp.size - 1:  # posted before the compute, which it overlaps
                arriving = plan.carry[plan.origin(sp.rank, step + 1)][step + 1]
                leaving = _head(in_hand, plan.carry[origin][step + 1])
                exchange = Exchange(
                    [(t, plan.next(sp.rank), tag) for tag, t in enumerate(leaving)],
                    [(t, plan.previous(sp.rank), tag) for tag, t in enumerate(_empty_states(in_hand, arriving))],
                    sp, "ring")
            part = _block_partial(z, u, in_hand, origin, spec)
            out, lse = part if out is None else ops.merge_partials((out, lse), part)
            if exchange is not None:
                in_hand = exchange.wait()
        ctx.spec = spec
        ctx.save_for_backward(z, u, out, lse, *block)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        spec = ctx.spec
        sp = spec.shard.sp
        plan = _plan_of(spec.shard)
        rank = sp.rank
        z, u, out, lse, *block = ctx.saved_tensors
        k = len(block)
        grad_out = grad_out if grad_out is not None else torch.zeros_like(out)
        grad_lse = grad_lse if grad_lse is not None else torch.zeros_like(lse)
        grad_z, grad_u = torch.zeros_like(z), torch.zeros_like(u)
        gradients = _block_gradients if _direct_backward(spec) else _recomputed_block_gradients
        own = [torch.zeros_like(t) for t in block]  # this rank's block gradients, gathered as they come home
        in_hand = list(block)
        accumulated = [torch.zeros_like(t) for t in block]
        # Tags: the block 0..k−1, its accumulator k..2k−1, finished parts on their way home 2k..3k−1.
        for step in range(sp.size):
            origin = plan.origin(rank, step)
            onward = plan.carry[origin][step + 1]  # states the next hop still reads or passes on
            last = step == sp.size - 1
            arriving = 0 if last else plan.carry[plan.origin(rank, step + 1)][step + 1]
            block_exchange = None
            if not last:  # the block does not change: its send overlaps this step's compute
                block_exchange = Exchange(
                    [(t, plan.next(rank), tag) for tag, t in enumerate(_head(in_hand, onward))],
                    [(t, plan.previous(rank), tag) for tag, t in enumerate(_empty_states(in_hand, arriving))],
                    sp, "ring_backward")
            gradients(z, u, in_hand, origin, spec, out, lse, grad_out, grad_lse, grad_z, grad_u, accumulated)
            sends = [(t, plan.next(rank), k + tag) for tag, t in enumerate(_head(accumulated, onward))]
            finished = [t[:, onward:] for t in accumulated]  # no rank ahead adds to these states any more
            if step == 0:
                for mine, part in zip(own, finished):
                    mine[:, onward:] += part
            else:
                sends += [(t, origin, 2 * k + tag) for tag, t in enumerate(finished)]
            receives = [(t, plan.previous(rank), k + tag) for tag, t in enumerate(_empty_states(accumulated, arriving))]
            home_from, home_to = plan.carry[rank][step + 1], plan.carry[rank][step]
            if step > 0:  # the part of this rank's block that hop `step` finished
                receives += [(t, plan.hop(rank, step), 2 * k + tag)
                             for tag, t in enumerate(_empty_states(own, home_to - home_from))]
            received = Exchange(sends, receives, sp, "ring_backward").wait()
            if step > 0:
                for mine, part in zip(own, received[len(received) - k:]):
                    mine[:, home_from:home_to] += part
            if not last:
                accumulated = received[:k]
                in_hand = block_exchange.wait()
        return (None, grad_z, grad_u, *own)


def _recomputed_block_gradients(z, u, in_hand, origin, spec, out, lse, grad_out, grad_lse, grad_z, grad_u,
                                accumulated):
    """Deep states (or the reference path): recompute the block's partial under autograd and push the merge's
    gradient through it (added into grad_z, grad_u and accumulated)."""
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_()
        u_leaf = u.detach().requires_grad_()
        leaves = [t.detach().requires_grad_() for t in in_hand]
        part_out, part_lse = _block_partial(z_leaf, u_leaf, leaves, origin, spec)
    finite = torch.isfinite(part_lse)
    if not bool(finite.any()):
        return
    weight = torch.where(finite, torch.exp(part_lse.detach() - lse), torch.zeros_like(lse))
    g_out = grad_out * weight[..., None]
    g_lse = weight * (grad_lse + (grad_out * (part_out.detach() - out)).sum(-1))
    grads = torch.autograd.grad((part_out, part_lse), [z_leaf, u_leaf] + leaves, (g_out, g_lse), allow_unused=True)
    if grads[0] is not None:
        grad_z += grads[0]
    if grads[1] is not None:
        grad_u += grads[1]
    for acc, g in zip(accumulated, grads[2:]):
        if g is not None:
            acc += g


def ring_read(z, u, states, contexts, *, shard: Shard, gate_scale: float, selected=None, impl="chunked"):
    """(out, lse) of the local tokens against the cached states of every rank (all merged)."""
    deep = not isinstance(states, torch.Tensor)
    block = list(states) + [contexts] if deep else [states, contexts]
    return _RingRead.apply(_RingSpec(shard, gate_scale, selected, impl, deep), z, u, *block)


# -- aggregation ---------------------------------------------------------------------------------------------


def global_contexts(closed: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Contexts of every segment of the sequence [B, N, H, D] (no gradient: used to select only)."""
    gathered = all_gather_tensor(closed.detach(), shard.sp, "contexts")  # [P, B, n_local, H, D]
    C = shard.segment_len
    placed = []
    for rank in range(shard.sp.size):
        first = 0
        for start, length in shard.pieces(rank):
            n = length // C
            placed.append((start, gathered[rank][:, first:first + n]))
            first += n
    return torch.cat([x for _, x in sorted(placed, key=lambda item: item[0])], 1)


def _residual_linear(q_all: torch.Tensor, cached: torch.Tensor, shard: Shard) -> torch.Tensor:
    C = shard.segment_len
    sums, first = [], 0
    for _, _, length in shard.local_pieces():
        n = length // C
        sums.append(cached[:, first:first + n].sum(1))
        first += n
    sums = torch.stack(sums)  # [pieces, B, H, D, D]
    before = piece_scan(sums.new_zeros(sums.shape[:3]), sums, shard)  # Σ over earlier pieces
    out, first = [], 0
    for j, (offset, start, length) in enumerate(shard.local_pieces()):
        n = length // C
        q = q_all[:, offset:offset + length]
        local = ops.residual_read(q, cached[:, first:first + n], segment_len=C, query_offset=start,
                                      segment_offset=start // C)
        out.append(local + torch.einsum("bhij,bthj->bthi", before[j], q.to(local.dtype)))
        first += n
    return torch.cat(out, 1)




# -- the reader ---------------------------------------------------------------------------------------------


class RingReader(Reader):
    """This rank's pieces of a sequence (``shard``) under sequence parallelism; see the module docstring. With an
    empty ``cache`` the forward is a prefill and ``finish`` fills it with this rank's share."""

    def __init__(self, config, shard: Shard, impl: str, cache: Optional[LayerCache] = None):
        self.impl, self.shard, self.cache = impl, shard, cache
        self.segment_len, self.pool = config.segment_len, config.pool
        self.contexts = self.conv_tail = self.p = None

    def project(self, layer, x):
        p, self.conv_tail = sp_project(layer, x, self.shard, with_tail=self.cache is not None)
        return p

    def memory(self, layer, p):
        self.p = p
        return sp_memory_pass(layer, p, self.shard, self.impl)

    def _piece_contexts(self, p):
        if self.contexts is None:
            C, pieces = self.segment_len, self.shard.local_pieces()
            contexts = [ops.segment_contexts(p.k[:, offset:offset + length], C, self.pool)
                        for offset, _, length in pieces]
            self.contexts = torch.cat([c for c, _ in contexts], 1)
            self.running = torch.cat([r for _, r in contexts], 1)
        return self.contexts

    def running_contexts(self, p):
        self._piece_contexts(p)
        return self.running

    def select(self, u, *, top_k, gate_scale):
        every = global_contexts(self.contexts, self.shard)
        return torch.cat([ops.select_top_k(u[:, offset:offset + length], every, segment_len=self.segment_len,
                                           top_k=top_k, gate_scale=gate_scale, query_offset=start, impl=self.impl)
                          for offset, start, length in self.shard.local_pieces()], 1)

    def read(self, z, u, states, *, gate_scale, selected=None):
        return ring_read(z, u, states, self.contexts, shard=self.shard, gate_scale=gate_scale, selected=selected,
                         impl=self.impl)

    def total(self, z, states):
        if isinstance(states, torch.Tensor):
            return _residual_linear(z, states, self.shard)
        # Σ_j M_j(z) as a read with all scores 0: the mean times the count, out·exp(lse)
        out, lse = ring_read(z, self.p.u, states, self._piece_contexts(self.p), shard=self.shard, gate_scale=0.0,
                             impl=self.impl)
        count = torch.where(torch.isfinite(lse), torch.exp(lse), torch.zeros_like(lse))
        return out * count[..., None]

    def finish(self, layer, p, memory):
        """A prefill: this rank keeps the states of its own segments, every rank the contexts of all of them and
        the running state after the sequence's last token (held by the rank with the last piece, sent to all)."""
        if self.cache is None:
            return
        cfg, shard = layer.config, self.shard
        C, sp, seq_len = cfg.segment_len, shard.sp, shard.seq_len
        held = [g for _, start, length in shard.local_pieces() for g in range(start // C, (start + length) // C)]
        closed = self._piece_contexts(p)
        last = seq_len // C - 1
        owner = last_piece_owner(seq_len, sp.size, shard.layout)
        state = layer.initial_memory(p.k.shape[0], p.k.dtype, p.k.device)
        if cfg.state_init == "checkpoint":
            if sp.rank == owner:
                state = memory.final_state if cfg.is_deep else memory.cached_states[:, held.index(last)]
            state = type(state)(*(broadcast(t, owner, sp) for t in state)) if cfg.is_deep else broadcast(state, owner,
                                                                                                          sp)
        # the last piece's projections end with the sequence's last token only on its owner; the open segment is
        # empty here (the layout divides the sequence into whole segments), so any rank's p serves
        fill_cache(layer, self.cache, p, memory._replace(final_state=state), seq_len, held, closed,
                   global_contexts(closed, shard), sp.size)
        self.cache.conv_tail = self.conv_tail
        if cfg.memory == "swla":  # the sequence's last token's (k, v): last in the owner's local order
            self.cache.previous = tuple(broadcast(x[:, -1].clone(), owner, sp) for x in (p.k, p.v))


def broadcast(tensor: torch.Tensor, owner: int, sp: SPGroup) -> torch.Tensor:
    """``tensor`` of the group's rank ``owner`` on every rank of the group."""
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=sp.ranks[owner], group=sp.group)
    return tensor


@dataclass
class SequenceShard:
    """The shard context ``mcdist.parallel.parallelize`` gives each Memory Caching layer: its sp group and the
    layout of the sequence over it. The layer asks it for a reader of this rank's pieces."""

    sp: SPGroup
    layout: str

    def reader(self, layer, x: torch.Tensor, impl: str, cache: Optional[LayerCache] = None) -> RingReader:
        cfg = layer.config
        if cfg.segmentation != "constant":
            raise ValueError("sequence parallelism supports segmentation = 'constant' only")
        seq_len = x.shape[1] * self.sp.size
        check_sequence_length(seq_len, self.sp.size, cfg.segment_len, self.layout)
        return RingReader(cfg, Shard(self.sp, self.layout, seq_len, cfg.segment_len), impl, cache)
