"""Inference (SPEC §8): prefill a prompt into a cache, then decode one token at a time without re-reading it.

A :class:`LayerCache` holds what the next token of a Memory Caching layer reads: the cached states and contexts
of the closed segments, the online memory (the running state; for deep memory the weights at the start of the
open mini-batch, its momenta, and the open mini-batch's k, v, θ), and the open segment's running context.

- :func:`prefill` runs the layer's parallel forward on the prompt (the same four steps as training) and keeps
  the cache; the tokens of an open deep-memory mini-batch at the end of the prompt go through the decode step,
  which is how their update stays pending exactly as in the forward.
- :func:`decode` advances every layer by one token per call: the online memory takes the token; the cached
  read runs over the closed segments; when the open segment fills, its final state and context join the cache
  (and under ``independent`` the online memory restarts). Cost per token: O(N·d²) for the read, O(d²) for the
  memory; the prompt is never read again.
- Under sequence parallelism (``Session(..., sp=group)``) the prompt is prefilled by the SP forward on the
  largest prefix the layout divides (the rest of the prompt is decoded). Each rank keeps the cached states of
  its own segments; everything per token (projections, online memory, MLPs, logits) is computed on every rank
  alike, and only the cached read is split: each rank reads its own states and one all-gather of the partials
  (out, log-sum-exp) merges them, in rank order, so every rank holds the same result. A segment closed while
  decoding joins the rank holding the fewest states (ties: lowest rank). Contexts are kept on every rank (ssc
  selects over all of them).

Exactness (tested): prefill + decode equals the full forward on the whole sequence (float64 to 1e-10), in one
process and under SP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcdist import ops
from mcdist.aggregate import (cached_read_one_token, merge_all, merge_partials, online_scores,
                              residual_read_chunked, segment_contexts, select_top_k)
from mcdist.layer import MemoryCachingLayer, Projections
from mcdist.memory.deep import DeepState, deep_memory_chunked, deep_state_of, mlp_read
from mcdist.memory.linear import state_dtype

__all__ = ["LayerCache", "Session", "generate", "sample_next"]

# Cached states per group of the split read on the Triton path (decoding: one token per sequence).
SPLIT_STATES = 16


@dataclass
class LayerCache:
    """What one Memory Caching layer keeps between tokens (per batch row, every head)."""

    position: int  # tokens seen
    states: object  # this rank's closed segments: [B, n, H, D, D], or (W1 [B, n, H, E, D], W2 [B, n, H, D, E])
    contexts: torch.Tensor  # [B, n, H, D] their contexts
    segments: List[int]  # global index of each of those states
    all_contexts: torch.Tensor  # [B, N, H, D] contexts of every closed segment (all ranks), in order
    state: object  # online memory: [B, H, D, D], or DeepState at the start of the open mini-batch
    context_sum: torch.Tensor  # [B, H, D] Σ k over the open segment's tokens
    pending: Optional[tuple] = None  # deep memory: (k [B, n, H, D], v, θ [B, n, H]) of the open mini-batch
    owned_counts: List[int] = field(default_factory=lambda: [0])  # states held by each rank of the group
    conv_tail: Optional[torch.Tensor] = None  # short convolution: qkv of the last conv_size − 1 tokens, or None


def _fresh_state(layer: MemoryCachingLayer, batch: int, dtype: torch.dtype, device):
    cfg = layer.config
    if cfg.is_deep:
        return deep_state_of((layer.init_w1, layer.init_w2), batch, state_dtype(dtype))
    return torch.zeros(batch, cfg.n_heads, cfg.dim_head, cfg.dim_head, dtype=state_dtype(dtype), device=device)


def _context_dtype(k: torch.Tensor) -> torch.dtype:
    return torch.float64 if k.dtype == torch.float64 else torch.float32  # as segment_contexts


def _take_states(states, index):
    return tuple(w[:, index] for w in states) if isinstance(states, tuple) else states[:, index]


def _cat_states(a, b):
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y], 1) for x, y in zip(a, b))
    return torch.cat([a, b], 1)


def _check_supported(layer: MemoryCachingLayer) -> None:
    if layer.config.segmentation != "constant":
        raise ValueError(f"inference supports segmentation = 'constant' only; got {layer.config.segmentation!r}")


# -- the read of the cached states, in one process or split over an sp group -------------------------------------


class _Reader:
    """Reads the closed segments for one token; in one process, or each rank its own states + a merge."""

    def __init__(self, group=None, impl: str = "chunked"):
        self.group, self.impl = group, impl

    def read(self, z, u, states, contexts, segment_len, gate_scale, selected=None):
        """(out [B, 1, H, Dout], lse [B, 1, H]) over every closed segment (``selected``: positions among these
        states, −1 for none)."""
        n = contexts.shape[1]
        B, _, H = z.shape[:3]
        dout = z.shape[-1] if isinstance(states, tuple) else states.shape[3]
        if n:
            out, lse = self._local_read(z, u, states, contexts, segment_len, gate_scale, selected)
        else:
            dtype = contexts.dtype
            out = z.new_zeros(B, 1, H, dout, dtype=dtype)
            lse = z.new_full((B, 1, H), float("-inf"), dtype=dtype)
        if self.group is None:
            return out, lse
        packed = torch.cat([out, lse[..., None].to(out.dtype)], -1).contiguous()  # one message per token
        every = [torch.empty_like(packed) for _ in range(self.group.size)]
        dist.all_gather(every, packed, group=self.group.group)
        return merge_all([(part[..., :-1], part[..., -1].to(lse.dtype)) for part in every])

    def _local_read(self, z, u, states, contexts, segment_len, gate_scale, selected):
        """This rank's states. On the Triton path, one token would give the kernel only B·H programs, each walking
        all n states; so the states are cut into groups of SPLIT_STATES read side by side as a batch of B·S
        (flash-decoding), the remainder by one more call, and the partials merged."""
        n = contexts.shape[1]
        if self.impl != "triton" and not isinstance(states, tuple):  # PyTorch: one pass, no copy of the cache
            return cached_read_one_token(z, u, states, contexts, gate_scale=gate_scale, selected=selected)
        read = dict(segment_len=segment_len, gate_scale=gate_scale, impl=self.impl)
        g = SPLIT_STATES
        S = n // g
        if self.impl != "triton" or isinstance(states, tuple) or S < 2:
            return ops.cached_read(z, u, states, contexts, query_offset=n * segment_len, selected=selected, **read)
        B = z.shape[0]

        def grouped(t):  # [B, S·g, ...] -> [B·S, g, ...] (a view)
            return t[:, :S * g].reshape(B * S, g, *t.shape[2:])

        def copied(t):  # [B, 1, ...] -> [B·S, 1, ...]
            return t.unsqueeze(1).expand(B, S, *t.shape[1:]).reshape(B * S, *t.shape[1:])

        def shifted(first, count, copies):  # selection relative to states [first, first + count)
            if selected is None:
                return None
            local = selected.unsqueeze(1) - first.view(1, -1, 1, 1, 1)
            local = torch.where((selected.unsqueeze(1) >= 0) & (local >= 0) & (local < count), local, -1)
            return local.reshape(B * copies, *selected.shape[1:])

        starts = torch.arange(S, device=z.device) * g
        out, lse = ops.cached_read(copied(z), copied(u), grouped(states), grouped(contexts),
                                   query_offset=g * segment_len, selected=shifted(starts, g, S), **read)
        out, lse = out.view(B, S, *out.shape[1:]), lse.view(B, S, *lse.shape[1:])
        if n > S * g:
            rest = ops.cached_read(z, u, states[:, S * g:], contexts[:, S * g:],
                                   query_offset=(n - S * g) * segment_len,
                                   selected=shifted(starts.new_tensor([S * g]), n - S * g, 1), **read)
            out, lse = torch.cat([out, rest[0][:, None]], 1), torch.cat([lse, rest[1][:, None]], 1)
        top = lse.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no (−∞) − (−∞)
        weights = torch.exp(lse - top)  # 0 for a group that nobody selected
        total = weights.sum(1)
        merged = (out * weights[..., None]).sum(1) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        return merged, torch.log(total) + top.squeeze(1)

    def total(self, z, states, segment_len):
        """Σ over every closed segment of M_i(z) (``residual``)."""
        n = states[0].shape[1] if isinstance(states, tuple) else states.shape[1]
        if n:
            out = residual_read_chunked(z, states, segment_len=segment_len, query_offset=n * segment_len)
        else:
            out = torch.zeros_like(z, dtype=state_dtype(z.dtype))
        if self.group is not None:
            out = out.contiguous()
            dist.all_reduce(out, group=self.group.group)
        return out


def _local_selection(selected: torch.Tensor, segments: List[int]) -> torch.Tensor:
    """Global segment indices → positions among this rank's states (−1 where another rank holds it)."""
    if not segments:
        return torch.full_like(selected, -1)
    table = torch.full((max(max(segments), int(selected.max().clamp_min(0))) + 1,), -1, dtype=torch.int64,
                       device=selected.device)
    table[torch.tensor(segments, device=selected.device)] = torch.arange(len(segments), device=selected.device)
    return torch.where(selected >= 0, table[selected.clamp_min(0)], selected)


# -- one layer -------------------------------------------------------------------------------------------------


def _cache_after_forward(layer, p: Projections, memory, T: int, held: List[int], held_contexts: torch.Tensor,
                         all_contexts: torch.Tensor, group_size: int = 1) -> LayerCache:
    """The cache after a forward over the first T tokens (T a whole number of mini-batches for deep memory).

    ``held``: the global indices of the segments whose states ``memory.cached_states`` and ``held_contexts`` hold,
    in their order (one process: all of them, the last possibly still open). ``memory.final_state`` is the
    running state after token T − 1."""
    cfg = layer.config
    C = cfg.segment_len
    n_closed = T // C
    kept = [j for j, g in enumerate(held) if g < n_closed]
    index = torch.tensor(kept, dtype=torch.int64, device=p.k.device)
    open_len = T % C
    if open_len == 0 and cfg.state_init == "independent":
        state = _fresh_state(layer, p.k.shape[0], p.k.dtype, p.k.device)
    else:
        state = memory.final_state
    context_sum = p.k[:, T - open_len:T].to(_context_dtype(p.k)).sum(1)
    return LayerCache(position=T, states=_take_states(memory.cached_states, index), contexts=held_contexts[:, index],
                      segments=[held[j] for j in kept], all_contexts=all_contexts[:, :n_closed], state=state,
                      context_sum=context_sum, owned_counts=[len(kept)] * group_size)


def layer_prefill(layer: MemoryCachingLayer, x: torch.Tensor, impl: str) -> tuple:
    """One process: (output [B, T, d_model], LayerCache) of the layer over the prompt x [B, T, d_model]."""
    _check_supported(layer)
    cfg = layer.config
    T = x.shape[1]
    aligned = T - T % cfg.minibatch_len if cfg.is_deep else T
    outputs = []
    if aligned:
        xa = x[:, :aligned]
        p = layer.project(xa)
        memory = layer.memory_pass(p, impl=impl)
        outputs.append(layer.output(xa, layer.aggregate(p, memory, impl=impl)))
        closed, _ = segment_contexts(p.k, cfg.segment_len, cfg.pool)
        cache = _cache_after_forward(layer, p, memory, aligned, list(range(closed.shape[1])), closed, closed)
        if cfg.conv_size:  # qkv of the prompt's last conv_size − 1 tokens (zeros before the first)
            cache.conv_tail = layer.conv_tail(layer.qkv(xa[:, -(cfg.conv_size - 1):]))
    else:
        cache = empty_layer_cache(layer, x)
    reader = _Reader(None, impl)
    for t in range(aligned, T):
        outputs.append(layer_decode(layer, x[:, t:t + 1], cache, reader))
    return torch.cat(outputs, 1), cache


def empty_layer_cache(layer: MemoryCachingLayer, x: torch.Tensor, group_size: int = 1) -> LayerCache:
    cfg = layer.config
    B, H, D = x.shape[0], cfg.n_heads, cfg.dim_head
    cdt, sdt = _context_dtype(x), state_dtype(x.dtype)
    if cfg.is_deep:
        E = cfg.expansion * D
        states = (x.new_zeros(B, 0, H, E, D, dtype=sdt), x.new_zeros(B, 0, H, D, E, dtype=sdt))
    else:
        states = x.new_zeros(B, 0, H, D, D, dtype=sdt)
    contexts = x.new_zeros(B, 0, H, D, dtype=cdt)
    return LayerCache(position=0, states=states, contexts=contexts, segments=[], all_contexts=contexts,
                      state=_fresh_state(layer, B, x.dtype, x.device), context_sum=x.new_zeros(B, H, D, dtype=cdt),
                      owned_counts=[0] * group_size)


def _online_step(layer, p: Projections, cache: LayerCache):
    """The online read M_t(q_t) of the one token in p [B, 1, ...]; advances cache.state / cache.pending."""
    cfg = layer.config
    if not cfg.is_deep:
        M = cache.state
        q, k, v = (x[:, 0].to(M.dtype) for x in (p.q, p.k, p.v))
        if p.log_decay is not None:
            M = torch.exp(p.log_decay[:, 0].to(M.dtype))[..., None, None] * M
        M = M + v[..., :, None] * k[..., None, :]  # rows index values, columns keys
        cache.state = M
        return torch.einsum("bhij,bhj->bhi", M, q)[:, None].to(p.q.dtype), None
    state = cache.state
    sdt = state.w1.dtype
    online = mlp_read(p.q[:, 0].to(sdt), state.w1, state.w2)[:, None]  # the weights at the mini-batch's start
    weights = (state.w1[:, None], state.w2[:, None])  # what this token reads (the soup mixes them)
    token = (p.k, p.v, p.theta)
    cache.pending = token if cache.pending is None else tuple(torch.cat([a, b], 1)
                                                              for a, b in zip(cache.pending, token))
    if cache.pending[0].shape[1] == cfg.minibatch_len:  # the mini-batch is complete: take its step
        k, v, theta = cache.pending
        cache.state = deep_memory_chunked(k, v, theta, segment_len=cfg.minibatch_len,
                                          minibatch_len=cfg.minibatch_len, state_init="checkpoint",
                                          initial_state=state, **layer.deep_parameters()).final_state
        cache.pending = None
    return online, weights


def _mix(layer, p: Projections, online, online_weights, running, cache: LayerCache, reader: _Reader):
    """y of the token (SPEC §6) from its online read and the closed segments."""
    cfg = layer.config
    C = cfg.segment_len
    if cfg.aggregation == "none":
        return online
    if cfg.aggregation == "residual":
        return online + reader.total(p.q, cache.states, C).to(online.dtype)
    r_online = online_scores(p.u, running, cfg.scale)
    selected = None
    if cfg.aggregation == "ssc":
        n_all = cache.all_contexts.shape[1]
        chosen = select_top_k(p.u, cache.all_contexts, segment_len=C, top_k=cfg.top_k, gate_scale=cfg.scale,
                              query_offset=n_all * C, impl=reader.impl)
        selected = _local_selection(chosen, cache.segments)
    if cfg.aggregation == "soup" and cfg.is_deep:
        w1s, w2s = cache.states
        mb1, mb2 = online_weights
        first = merge_partials(reader.read(p.q, p.u, w1s, cache.contexts, C, cfg.scale, selected),
                               (torch.einsum("bthoi,bthi->btho", mb1, p.q.to(mb1.dtype)), r_online))[0]
        hidden = F.gelu(first)
        second = merge_partials(reader.read(hidden, p.u, w2s, cache.contexts, C, cfg.scale, selected),
                                (torch.einsum("bthoi,bthi->btho", mb2, hidden.to(mb2.dtype)), r_online))[0]
        return p.q.to(second.dtype) + second
    cached = reader.read(p.q, p.u, cache.states, cache.contexts, C, cfg.scale, selected)
    return merge_partials(cached, (online.to(cached[0].dtype), r_online))[0]


def _close_segment(layer, cache: LayerCache, context: torch.Tensor, rank: int) -> None:
    """The open segment just ended: its state and context join the cache (on the rank holding fewest)."""
    cfg = layer.config
    index = cache.position // cfg.segment_len  # position already counts the segment's last token
    owner = min(range(len(cache.owned_counts)), key=lambda r: (cache.owned_counts[r], r))
    cache.owned_counts[owner] += 1
    if cfg.is_deep:
        final = (cache.state.w1[:, None], cache.state.w2[:, None])
    else:
        final = cache.state[:, None]
    cache.all_contexts = torch.cat([cache.all_contexts, context[:, None]], 1)
    if owner == rank:
        cache.states = _cat_states(cache.states, final)
        cache.contexts = torch.cat([cache.contexts, context[:, None]], 1)
        cache.segments = cache.segments + [index - 1]
    if cfg.state_init == "independent":  # the next segment starts from M_0
        if cfg.is_deep:
            cache.state = deep_state_of((layer.init_w1, layer.init_w2), context.shape[0], cache.state.w1.dtype)
        else:
            cache.state = torch.zeros_like(cache.state)
    cache.context_sum = torch.zeros_like(cache.context_sum)


def layer_decode(layer: MemoryCachingLayer, x: torch.Tensor, cache: LayerCache, reader: _Reader,
                 rank: int = 0) -> torch.Tensor:
    """Output [B, 1, d_model] of the layer for the next token x [B, 1, d_model]; advances the cache."""
    cfg = layer.config
    C = cfg.segment_len
    if cfg.conv_size:  # the convolution reads the tokens before this one from the cache
        raw = layer.qkv(x)
        p = layer.project(x, mixed=layer.short_conv(raw, cache.conv_tail))
        cache.conv_tail = layer.conv_tail(raw, cache.conv_tail)
    else:
        p = layer.project(x)
    online, online_weights = _online_step(layer, p, cache)
    cache.context_sum = cache.context_sum + p.k[:, 0].to(cache.context_sum.dtype)
    count = cache.position % C + 1
    context = cache.context_sum / count if cfg.pool == "mean" else cache.context_sum
    y = _mix(layer, p, online, online_weights, context[:, None], cache, reader)
    cache.position += 1
    if cache.position % C == 0:
        _close_segment(layer, cache, context, rank)
    return layer.output(x, y)


# -- sequence-parallel prefill of one layer ------------------------------------------------------------------------


def sp_layer_prefill(layer: MemoryCachingLayer, x: torch.Tensor, sp, layout: str, impl: str) -> tuple:
    """Under SP: (this rank's output [B, T_local, d_model], LayerCache) for x = this rank's slice of a sequence
    whose length the layout divides (so every segment and mini-batch is whole)."""
    from mcdist.parallel.sp_layer import Shard, global_contexts, sp_aggregate, sp_memory_pass, sp_project

    _check_supported(layer)
    cfg = layer.config
    C = cfg.segment_len
    seq_len = x.shape[1] * sp.size
    shard = Shard(sp, layout, seq_len, C)
    p, conv_tail = sp_project(layer, x, shard, with_tail=True)
    memory = sp_memory_pass(layer, p, shard, impl)
    out = layer.output(x, sp_aggregate(layer, p, memory, shard, impl))
    held = [g for _, start, length in shard.local_pieces() for g in range(start // C, (start + length) // C)]
    closed = torch.cat([segment_contexts(p.k[:, offset:offset + length], C, cfg.pool)[0]
                        for offset, _, length in shard.local_pieces()], 1)
    # The running state after the last token: the last segment's final state, held by the rank with the last
    # piece (deep checkpoint: its final state, momenta included), sent to every rank.
    last = seq_len // C - 1
    owner = _last_piece_owner(seq_len, sp.size, layout)
    state = _fresh_state(layer, x.shape[0], x.dtype, x.device)
    if cfg.state_init == "checkpoint":
        if sp.rank == owner:
            state = memory.final_state if cfg.is_deep else memory.cached_states[:, held.index(last)]
        state = DeepState(*(_broadcast(t, owner, sp) for t in state)) if cfg.is_deep else _broadcast(state, owner, sp)
    memory = memory._replace(final_state=state)
    cache = _cache_after_forward(layer, p, memory, seq_len, held, closed, global_contexts(closed, shard), sp.size)
    cache.conv_tail = conv_tail
    return out, cache


def _last_piece_owner(seq_len: int, size: int, layout: str) -> int:
    """The rank holding a sharded sequence's last piece (last in its local order)."""
    from mcdist.parallel.layout import rank_pieces

    return next(r for r in range(size) if any(start + length == seq_len
                                              for start, length in rank_pieces(seq_len, size, r, layout)))


def _broadcast(tensor: torch.Tensor, owner: int, sp) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.broadcast(tensor, src=sp.ranks[owner], group=sp.group)
    return tensor


# -- the model -----------------------------------------------------------------------------------------------------


class Session:
    """Prefill a prompt, then decode token by token, for a batch of sequences.

    Args:
        model: an MCLanguageModel (not wrapped by ``mcdist.parallel.parallelize``; this class runs the SP steps).
        sp: the sequence-parallel group (``mcdist.parallel.comm.SPGroup``) to spread the prompt and the cached
            states over, or None for one process. Every rank of the group makes the same calls with the same
            token ids.
        layout: how the prompt is sharded under SP ('zigzag' or 'contiguous').
        impl: kernel choice ('auto', 'chunked', 'triton'; default: the model config's).

    ``prefill(input_ids [B, L])`` and ``decode(token_ids [B])`` return the next-token logits [B, vocab] (the same
    on every rank). ``position`` counts the tokens taken so far.
    """

    def __init__(self, model, *, sp=None, layout: str = "zigzag", impl: Optional[str] = None):
        if getattr(model, "sp_groups", None):
            raise ValueError("Session needs the plain model; this one was wrapped by mcdist.parallel.parallelize")
        if layout not in ("zigzag", "contiguous"):
            raise ValueError(f"layout = {layout!r}; expected 'zigzag' or 'contiguous'")
        self.model, self.sp, self.layout = model, sp, layout
        self.impl_request = impl or model.config.impl
        self.caches: Optional[List[LayerCache]] = None
        self.position = 0
        for block in model.blocks:
            _check_supported(block.mixer)

    def _impl(self, x: torch.Tensor) -> str:
        impl = ops.resolve_impl(self.impl_request, x)
        return "chunked" if impl == "reference" else impl

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Take the prompt [B, L] (L ≥ 1); returns the logits [B, vocab] after its last token."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, L] with L >= 1; got shape {tuple(input_ids.shape)}")
        if self.caches is not None:
            raise RuntimeError("prefill was already called on this Session; start a new Session for a new prompt")
        model = self.model
        x = model.embed(input_ids)
        impl = self._impl(x)
        C = model.config.segment_len
        if self.sp is None or self.sp.size == 1:
            self.caches = []
            for block in model.blocks:
                y, cache = layer_prefill(block.mixer, block.mixer_norm(x), impl)
                self.caches.append(cache)
                x = x + y
                x = x + block.mlp(block.mlp_norm(x))
            self.position = input_ids.shape[1]
            return model.lm_head(model.final_norm(x[:, -1]))
        from mcdist.parallel.layout import shard_sequence

        sp, P = self.sp, self.sp.size
        unit = (2 * P if self.layout == "zigzag" else P) * C
        head = input_ids.shape[1] - input_ids.shape[1] % unit
        if head == 0:  # too short to shard: every token goes through the decode step
            self.caches = [empty_layer_cache(block.mixer, x, P) for block in model.blocks]
            return self._decode_tokens(input_ids)
        h = shard_sequence(x[:, :head], P, sp.rank, self.layout)
        self.caches = []
        for block in model.blocks:
            y, cache = sp_layer_prefill(block.mixer, block.mixer_norm(h), sp, self.layout, impl)
            self.caches.append(cache)
            h = h + y
            h = h + block.mlp(block.mlp_norm(h))
        self.position = head
        if head < input_ids.shape[1]:
            return self._decode_tokens(input_ids[:, head:])
        # the last prompt token lives on the rank holding the sequence's last piece, last in its local order
        return model.lm_head(model.final_norm(_broadcast(h[:, -1], _last_piece_owner(head, P, self.layout), sp)))

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Take one token per sequence [B]; returns the logits [B, vocab] after it."""
        if self.caches is None:
            raise RuntimeError("call prefill(prompt) before decode")
        if token_ids.dim() != 1 or token_ids.shape[0] != self.caches[0].context_sum.shape[0]:
            raise ValueError(f"token_ids must be [B] with B = {self.caches[0].context_sum.shape[0]}; got shape "
                             f"{tuple(token_ids.shape)}")
        return self._decode_tokens(token_ids[:, None])

    def _decode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.model
        group = self.sp if self.sp is not None and self.sp.size > 1 else None
        rank = group.rank if group is not None else 0
        logits = None
        for t in range(input_ids.shape[1]):
            x = model.embed(input_ids[:, t:t + 1])
            reader = _Reader(group, self._impl(x))
            for block, cache in zip(model.blocks, self.caches):
                x = x + layer_decode(block.mixer, block.mixer_norm(x), cache, reader, rank)
                x = x + block.mlp(block.mlp_norm(x))
            logits = model.lm_head(model.final_norm(x[:, 0]))
            self.position += 1
        return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, generator=None) -> torch.Tensor:
    """Next token ids [B] from logits [B, vocab]: greedy when temperature is 0, else softmax(logits / T) over the
    top_k highest (all when 0), drawn with ``generator`` (one torch.Generator, or a list with one per row)."""
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature = {temperature}, top_k = {top_k}; expected both >= 0")
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1).cpu()
    if isinstance(generator, (list, tuple)):
        drawn = torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in zip(probs, generator)])
    else:
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return drawn.to(logits.device)


@torch.no_grad()
def generate(session: Session, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None) -> torch.Tensor:
    """Prefill ``input_ids`` [B, L] and decode ``max_new_tokens``; returns the new ids [B, n] (n stops early when
    every sequence has produced ``eos_id``; a sequence that has is padded with ``eos_id`` after it). Every row
    samples with its own generator seeded with ``seed``, so a row continues as it would alone. Under SP, rank 0
    draws each token and sends it to the others, so every rank continues the same sequences."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}; expected >= 0")
    generators = [torch.Generator().manual_seed(seed) for _ in range(input_ids.shape[0])]
    logits = session.prefill(input_ids)
    new, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_k=top_k, generator=generators)
        if session.sp is not None and session.sp.size > 1:
            token = _broadcast(token, 0, session.sp)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)  # a finished row repeats eos_id
            done |= token == eos_id
        new.append(token)
        if eos_id is not None and bool(done.all()):
            break
        if step + 1 < max_new_tokens:
            logits = session.decode(token)
    return torch.stack(new, 1) if new else input_ids.new_zeros(input_ids.shape[0], 0)

