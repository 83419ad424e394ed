"""Readers: where a Memory Caching layer gets the sequence around its tokens (docs/architecture.md, "Readers").

The layer computes its output one way (``mcdist.layer.aggregate``, docs/math.md §6) from the online read and the
cached segment memories. What differs between running in one process, over a sequence-parallel group and one
token at a time is *where those come from*, and that is a reader's job:

- ``project``: q, k, v, u and the gates of the tokens in hand (the short convolution needs the tokens before
  them: from the sequence itself, another rank, or the decode cache);
- ``memory``: the memory pass: online reads M_t(q_t), the cached states this reader holds, the weights of each
  token's deep-memory mini-batch;
- ``running_contexts``, ``select``, ``read``, ``total``: the parts of the aggregation that touch the cached
  states: each token's online-segment context, the ssc top-k selection, the softmax-gated read of the cached
  states as a partial (out, lse), and the unweighted sum of the cached memories (``residual``);
- ``finish``: what is kept for the next tokens (a prefill fills the decode cache; a decoded token advances it).

Three readers exist: :class:`LocalReader` (one process, chunked PyTorch or Triton by ``impl``),
:class:`DecodeReader` (one token against a :class:`LayerCache`, in one process or split over an sp group) and
``mcdist.parallel.ring_reader.RingReader`` (sequence parallelism: the ring of cached states, the state prefix
scan, the global ssc selection). No reader branches on the aggregation: the layer asks for what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from mcdist import ops


class Projections(NamedTuple):
    q: torch.Tensor  # [B, T, H, D]
    k: torch.Tensor  # [B, T, H, D]
    v: torch.Tensor  # [B, T, H, D]
    u: torch.Tensor  # [B, T, H, D] gate queries (the connector)
    log_decay: Optional[torch.Tensor]  # [B, T, H] for `gated`
    theta: Optional[torch.Tensor]  # [B, T, H] step scales for deep memory
    window: Optional[torch.Tensor] = None  # [B, T, 2, H] swla: (β_t, λ_t), the weights of v_{t-1}k_{t-1}ᵀ, v_t k_tᵀ


class MemoryResult(NamedTuple):
    online_out: torch.Tensor  # [B, T, H, D]: M_t(q_t)
    cached_states: object  # [B, N, H, D, D], or (W1 [B, N, H, E, D], W2 [B, N, H, D, E]): the reader's own
    final_state: object  # [B, H, D, D], or DeepState (None where the reader has no use for it)
    minibatch_weights: object = None  # deep memory: (W1 [B, NB, H, E, D], W2 [B, NB, H, D, E])
    minibatch_len: int = 0  # tokens per entry of minibatch_weights (1 when decoding)


@dataclass
class LayerCache:
    """What one Memory Caching layer keeps between decoded tokens (per batch row, every head).

    ``LayerCache()`` is an empty cache: the layer's next forward with it is a prefill (the parallel path over the
    prompt, which then fills the cache). ``MemoryCachingLayer.empty_cache`` makes a started cache that holds no
    token yet (every token then goes through the decode step)."""

    position: int = 0  # tokens seen
    states: object = None  # this rank's closed segments: [B, n, H, D, D], or (W1 [B, n, H, E, D], W2 [B, n, H, D, E])
    contexts: Optional[torch.Tensor] = None  # [B, n, H, D] their contexts
    segments: List[int] = field(default_factory=list)  # global index of each of those states
    all_contexts: Optional[torch.Tensor] = None  # [B, N, H, D] contexts of every closed segment (all ranks), in order
    state: object = None  # online memory: [B, H, D, D], or DeepState at the start of the open mini-batch
    context_sum: Optional[torch.Tensor] = None  # [B, H, D] Σ k over the open segment's tokens
    pending: Optional[tuple] = None  # deep memory: (k [B, n, H, D], v, θ [B, n, H]) of the open mini-batch
    owned_counts: List[int] = field(default_factory=lambda: [0])  # states held by each rank of the group
    conv_tail: Optional[torch.Tensor] = None  # short convolution: qkv of the last conv_size − 1 tokens, or None
    previous: Optional[tuple] = None  # swla: (k [B, H, D], v [B, H, D]) of the last token seen, or None (none yet)
    # rows of different prompts in one batch (mcdist.readers.stack_caches): [B] leading placeholder segments of
    # each row, never read; None when every row's states are all its own
    pad: Optional[torch.Tensor] = None

    @property
    def filled(self) -> bool:
        """Whether the cache holds a sequence (a prefill happened, or it was started empty)."""
        return self.states is not None


def context_dtype(k: torch.Tensor) -> torch.dtype:
    return torch.float64 if k.dtype == torch.float64 else torch.float32  # as ops.segment_contexts


def take_states(states, index):
    return tuple(w[:, index] for w in states) if isinstance(states, tuple) else states[:, index]


def cat_states(parts):
    """Cached states of several runs of segments, in order ([B, n, ...] tensors or (W1, W2) pairs)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts, 1)
    return tuple(torch.cat([part[i] for part in parts], 1) for i in range(len(parts[0])))


def fill_cache(layer, cache: LayerCache, p: Projections, memory: MemoryResult, T: int, held: List[int],
               held_contexts: torch.Tensor, all_contexts: torch.Tensor, group_size: int = 1) -> None:
    """Fill ``cache`` with what follows a forward over the first T tokens of a sequence (T a whole number of
    mini-batches for deep memory).

    ``held``: the global indices of the segments whose states ``memory.cached_states`` and ``held_contexts``
    hold, in their order (one process: all of them, the last possibly still open). ``memory.final_state`` is the
    running state after token T − 1; ``p`` the projections of the tokens whose last one is T − 1."""
    cfg = layer.config
    C = cfg.segment_len
    n_closed = T // C
    kept = [j for j, g in enumerate(held) if g < n_closed]
    index = torch.tensor(kept, dtype=torch.int64, device=p.k.device)
    open_len = T % C
    if open_len == 0 and cfg.state_init == "independent":
        state = layer.initial_memory(p.k.shape[0], p.k.dtype, p.k.device)
    else:
        state = memory.final_state
    cache.position = T
    cache.states = take_states(memory.cached_states, index)
    cache.contexts = held_contexts[:, index]
    cache.segments = [held[j] for j in kept]
    cache.all_contexts = all_contexts[:, :n_closed]
    cache.state = state
    cache.context_sum = p.k[:, p.k.shape[1] - open_len:].to(context_dtype(p.k)).sum(1)
    cache.pending = None
    cache.owned_counts = [len(kept)] * group_size
    cache.previous = (p.k[:, -1], p.v[:, -1]) if p.window is not None else None  # swla: the window's older token


class Reader:
    """The interface the layer's one computation path asks (see the module docstring). ``impl`` is what the ops
    are asked for ('auto', 'chunked' or 'triton'); ``contexts`` the closed segments' contexts this reader reads."""

    impl: str

    def project(self, layer, x: torch.Tensor) -> Projections:
        raise NotImplementedError

    def memory(self, layer, p: Projections) -> MemoryResult:
        raise NotImplementedError

    def running_contexts(self, p: Projections) -> torch.Tensor:
        """Each token's online-segment context [B, T, H, D] (the closed ones are kept for ``read``)."""
        raise NotImplementedError

    def select(self, u: torch.Tensor, *, top_k: int, gate_scale: float) -> torch.Tensor:
        """ssc: each token's top_k cached segments [B, T, H, top_k], in the form ``read`` takes."""
        raise NotImplementedError

    def read(self, z, u, states, *, gate_scale: float, selected=None):
        """(out, lse): the softmax-gated read of ``states`` (the reader's cached states, or one layer of a deep
        memory's) at z, gated by u against the closed contexts (docs/math.md §6)."""
        raise NotImplementedError

    def total(self, z, states) -> torch.Tensor:
        """Σ over the cached states visible to each token of M_j(z_t) (``residual``)."""
        raise NotImplementedError

    def finish(self, layer, p: Projections, memory: MemoryResult) -> None:
        """Keep what the next tokens need (nothing for a plain forward)."""


class LocalReader(Reader):
    """A whole sequence (from its start) in one process. With ``cache`` (an empty LayerCache) the forward is a
    prefill: ``finish`` fills the cache."""

    def __init__(self, config, impl: str, cache: Optional[LayerCache] = None):
        self.impl, self.segment_len, self.pool, self.cache = impl, config.segment_len, config.pool, cache
        self.contexts = None

    def project(self, layer, x):
        self.x = x
        return layer.project(x)

    def memory(self, layer, p):
        return layer.memory_pass(p, impl=self.impl)

    def _closed(self, p):
        if self.contexts is None:
            self.contexts, self.running = ops.segment_contexts(p.k, self.segment_len, self.pool)
        return self.contexts

    def running_contexts(self, p):
        self._closed(p)
        return self.running

    def select(self, u, *, top_k, gate_scale):
        return ops.select_top_k(u, self.contexts, segment_len=self.segment_len, top_k=top_k, gate_scale=gate_scale,
                                impl=self.impl)

    def read(self, z, u, states, *, gate_scale, selected=None):
        return ops.cached_read(z, u, states, self.contexts, segment_len=self.segment_len, gate_scale=gate_scale,
                               selected=selected, impl=self.impl)

    def total(self, z, states):
        return ops.residual_read(z, states, segment_len=self.segment_len)

    def finish(self, layer, p, memory):
        if self.cache is None:
            return
        closed = self._closed(p)
        T = p.k.shape[1]
        fill_cache(layer, self.cache, p, memory, T, list(range(closed.shape[1])), closed, closed)
        w = layer.config.conv_size
        if w:  # qkv of the prompt's last conv_size − 1 tokens (zeros before the first)
            self.cache.conv_tail = layer.conv_tail(layer.qkv(self.x[:, -(w - 1):]))


# Cached states per group of the split read on the Triton path (decoding: one token per sequence).
SPLIT_STATES = 16


def local_selection(selected: torch.Tensor, segments: List[int]) -> torch.Tensor:
    """Global segment indices → positions among this rank's states (−1 where another rank holds it)."""
    if not segments:
        return torch.full_like(selected, -1)
    table = torch.full((max(max(segments), int(selected.max().clamp_min(0))) + 1,), -1, dtype=torch.int64,
                       device=selected.device)
    table[torch.tensor(segments, device=selected.device)] = torch.arange(len(segments), device=selected.device)
    return torch.where(selected >= 0, table[selected.clamp_min(0)], selected)


class DecodeReader(Reader):
    """One token per sequence against a filled :class:`LayerCache`; advances the cache.

    With ``group`` (an ``mcdist.parallel.comm.SPGroup``) the cached states are split over its ranks: each rank
    reads its own and one all-gather of the partials (out, log-sum-exp) merges them in rank order, so every rank
    holds the same result; everything else per token is computed on every rank alike. A segment closed while
    decoding joins the rank holding the fewest states (ties: lowest rank). docs/inference.md."""

    def __init__(self, config, cache: LayerCache, impl: str, group=None):
        self.cache, self.impl, self.segment_len, self.pool = cache, impl, config.segment_len, config.pool
        self.group = group if group is not None and group.size > 1 else None
        self.contexts = cache.contexts
        self.context = None  # the open segment's context after this token

    @property
    def rank(self) -> int:
        return self.group.rank if self.group is not None else 0

    def project(self, layer, x):
        cache = self.cache
        if not layer.config.conv_size:
            return layer.project(x)
        raw = layer.qkv(x)  # the convolution reads the tokens before this one from the cache
        p = layer.project(x, mixed=layer.short_conv(raw, cache.conv_tail))
        cache.conv_tail = layer.conv_tail(raw, cache.conv_tail)
        return p

    def memory(self, layer, p):
        """The online read M_t(q_t) of the one token; advances the online memory (or the pending mini-batch)."""
        cfg, cache = layer.config, self.cache
        cache.context_sum = cache.context_sum + p.k[:, 0].to(cache.context_sum.dtype)
        if not cfg.is_deep:
            M = cache.state
            q, k, v = (x[:, 0].to(M.dtype) for x in (p.q, p.k, p.v))
            if p.log_decay is not None:
                M = torch.exp(p.log_decay[:, 0].to(M.dtype))[..., None, None] * M
            if p.window is None:
                M = M + v[..., :, None] * k[..., None, :]  # rows index values, columns keys
            else:  # swla (docs/math.md §3.3): + λ_t v_t k_tᵀ + β_t v_{t-1} k_{t-1}ᵀ
                beta, lam = (w[..., None, None].to(M.dtype) for w in p.window[:, 0].unbind(1))  # [B, H, 1, 1]
                M = M + lam * (v[..., :, None] * k[..., None, :])
                opens = cfg.state_init == "independent" and cache.position % cfg.segment_len == 0
                if cache.previous is not None and not opens:  # a segment's own tokens only, under independent
                    k_before, v_before = (x.to(M.dtype) for x in cache.previous)
                    M = M + beta * (v_before[..., :, None] * k_before[..., None, :])
                cache.previous = (p.k[:, 0], p.v[:, 0])
            cache.state = M
            online = torch.einsum("bhij,bhj->bhi", M, q)[:, None].to(p.q.dtype)
            return MemoryResult(online, cache.states, None)
        state = cache.state
        weights = (state.w1[:, None], state.w2[:, None])  # the weights at the mini-batch's start, this token's
        online = ops.deep_online_read(p.q, weights, 1)
        token = (p.k, p.v, p.theta)
        cache.pending = token if cache.pending is None else tuple(torch.cat([a, b], 1)
                                                                  for a, b in zip(cache.pending, token))
        if cache.pending[0].shape[1] == cfg.minibatch_len:  # the mini-batch is complete: take its step
            k, v, theta = cache.pending
            cache.state = ops.deep_memory(k, v, theta, segment_len=cfg.minibatch_len,
                                          minibatch_len=cfg.minibatch_len, state_init="checkpoint",
                                          initial_state=state, impl="chunked",
                                          **layer.deep_parameters()).final_state
            cache.pending = None
        return MemoryResult(online, cache.states, None, weights, 1)

    def running_contexts(self, p):
        cache = self.cache
        count = cache.position % self.segment_len + 1
        self.context = cache.context_sum / count if self.pool == "mean" else cache.context_sum
        return self.context[:, None]

    def select(self, u, *, top_k, gate_scale):
        cache = self.cache
        n_all = cache.all_contexts.shape[1]
        if cache.pad is not None:  # each row chooses among its own segments, as it would alone
            chosen = []
            for row, pad in enumerate(cache.pad.tolist()):
                own = ops.select_top_k(u[row:row + 1], cache.all_contexts[row:row + 1, pad:],
                                       segment_len=self.segment_len, top_k=top_k, gate_scale=gate_scale,
                                       query_offset=(n_all - pad) * self.segment_len, impl=self.impl)
                chosen.append(torch.where(own >= 0, own + pad, own))
            return local_selection(torch.cat(chosen), cache.segments)
        chosen = ops.select_top_k(u, cache.all_contexts, segment_len=self.segment_len, top_k=top_k,
                                  gate_scale=gate_scale, query_offset=n_all * self.segment_len, impl=self.impl)
        return local_selection(chosen, cache.segments)

    def read(self, z, u, states, *, gate_scale, selected=None):
        """(out [B, 1, H, Dout], lse [B, 1, H]) over every closed segment (``selected``: positions among these
        states, −1 for none)."""
        contexts = self.contexts
        n = contexts.shape[1]
        B, _, H = z.shape[:3]
        dout = z.shape[-1] if isinstance(states, tuple) else states.shape[3]
        if n:
            states = widened(states, contexts.dtype)
            if selected is None and self.cache.pad is not None:
                selected = own_states(self.cache.pad, n, H)
            out, lse = self._local_read(z, u, states, contexts, gate_scale, selected)
        else:
            out = z.new_zeros(B, 1, H, dout, dtype=contexts.dtype)
            lse = z.new_full((B, 1, H), float("-inf"), dtype=contexts.dtype)
        if self.group is None:
            return out, lse
        packed = torch.cat([out, lse[..., None].to(out.dtype)], -1).contiguous()  # one message per token
        every = [torch.empty_like(packed) for _ in range(self.group.size)]
        dist.all_gather(every, packed, group=self.group.group)
        return ops.merge_all([(part[..., :-1], part[..., -1].to(lse.dtype)) for part in every])

    def _local_read(self, z, u, states, contexts, gate_scale, selected):
        """This rank's states. On the Triton path, one token would give the kernel only B·H programs, each walking
        all n states; so the states are cut into groups of SPLIT_STATES read side by side as a batch of B·S
        (flash-decoding), the remainder by one more call, and the partials merged."""
        n = contexts.shape[1]
        C = self.segment_len
        triton = not isinstance(states, tuple) and ops.resolve_impl(self.impl, z) == "triton"
        if not triton and not isinstance(states, tuple):  # PyTorch: one pass, no copy of the cache
            return ops.cached_read_one_token(z, u, states, contexts, gate_scale=gate_scale, selected=selected)
        read = dict(segment_len=C, gate_scale=gate_scale, impl=self.impl)
        g = SPLIT_STATES
        S = n // g
        if not triton or S < 2:
            return ops.cached_read(z, u, states, contexts, query_offset=n * C, selected=selected, **read)
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
        out, lse = ops.cached_read(copied(z), copied(u), grouped(states), grouped(contexts), query_offset=g * C,
                                   selected=shifted(starts, g, S), **read)
        out, lse = out.view(B, S, *out.shape[1:]), lse.view(B, S, *lse.shape[1:])
        if n > S * g:
            rest = ops.cached_read(z, u, states[:, S * g:], contexts[:, S * g:], query_offset=(n - S * g) * C,
                                   selected=shifted(starts.new_tensor([S * g]), n - S * g, 1), **read)
            out, lse = torch.cat([out, rest[0][:, None]], 1), torch.cat([lse, rest[1][:, None]], 1)
        top = lse.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no (−∞) − (−∞)
        weights = torch.exp(lse - top)  # 0 for a group that nobody selected
        total = weights.sum(1)
        merged = (out * weights[..., None]).sum(1) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
        return merged, torch.log(total) + top.squeeze(1)

    def total(self, z, states):
        n = states[0].shape[1] if isinstance(states, tuple) else states.shape[1]
        states = widened(states, ops.state_dtype(z.dtype))
        if n and self.cache.pad is not None:  # each row sums its own states only
            rows = []
            for row, pad in enumerate(self.cache.pad.tolist()):
                if pad < n:
                    rows.append(ops.residual_read(z[row:row + 1], take_rows(take_states(states, slice(pad, None)),
                                                                              slice(row, row + 1)),
                                                  segment_len=self.segment_len, query_offset=(n - pad) * self.segment_len))
                else:
                    rows.append(torch.zeros_like(z[row:row + 1], dtype=ops.state_dtype(z.dtype)))
            out = torch.cat(rows)
        elif n:
            out = ops.residual_read(z, states, segment_len=self.segment_len, query_offset=n * self.segment_len)
        else:
            out = torch.zeros_like(z, dtype=ops.state_dtype(z.dtype))
        if self.group is not None:
            out = out.contiguous()
            dist.all_reduce(out, group=self.group.group)
        return out

    def finish(self, layer, p, memory):
        cache = self.cache
        if self.context is None:  # the aggregation did not ask for contexts: the cache still keeps them
            self.running_contexts(p)
        cache.position += 1
        if cache.position % self.segment_len == 0:
            self._close_segment(layer, self.context)

    def _close_segment(self, layer, context: torch.Tensor) -> None:
        """The open segment just ended: its state and context join the cache (on the rank holding fewest)."""
        cfg, cache = layer.config, self.cache
        index = cache.position // cfg.segment_len  # position already counts the segment's last token
        owner = min(range(len(cache.owned_counts)), key=lambda r: (cache.owned_counts[r], r))
        cache.owned_counts[owner] += 1
        final = (cache.state.w1[:, None], cache.state.w2[:, None]) if cfg.is_deep else cache.state[:, None]
        final = narrowed_like(final, cache.states)  # the cache's own dtype (float32, or bfloat16: cast_cache)
        cache.all_contexts = torch.cat([cache.all_contexts, context[:, None]], 1)
        if owner == self.rank:
            cache.states = cat_states([cache.states, final])
            cache.contexts = torch.cat([cache.contexts, context[:, None]], 1)
            cache.segments = cache.segments + [index - 1]
        if cfg.state_init == "independent":  # the next segment starts from M_0
            dtype = cache.state.w1.dtype if cfg.is_deep else cache.state.dtype
            cache.state = layer.initial_memory(context.shape[0], dtype, context.device)
        cache.context_sum = torch.zeros_like(cache.context_sum)


# --- caches of several prompts in one batch (mcdist.infer.complete, docs/inference.md "Batching") -------------

def _is_tuple(value) -> bool:
    return isinstance(value, tuple)


def take_rows(value, index):
    """``value`` (a tensor [B, ...], a tuple or NamedTuple of them, or anything else: kept) at batch rows
    ``index``."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if _is_tuple(value):
        items = [take_rows(item, index) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


def _cat_rows(values):
    """Row-wise concatenation of the same field of several caches (tensors, tuples of tensors, or all None)."""
    first = values[0]
    if first is None:
        if any(value is not None for value in values):
            raise ValueError("cannot batch caches that differ in what they hold (one has a field another lacks)")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if _is_tuple(first):
        items = [_cat_rows([value[i] for value in values]) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    raise TypeError(f"cannot batch a cache field of type {type(first).__name__}")


def _left_pad(states, n: int):
    """[1, m, ...] states (or a tuple of them) with n − m leading zero entries."""
    if _is_tuple(states):
        return tuple(_left_pad(w, n) for w in states)
    missing = n - states.shape[1]
    return torch.cat([states.new_zeros(states.shape[0], missing, *states.shape[2:]), states], 1)


def _count(states) -> int:
    return (states[0] if _is_tuple(states) else states).shape[1]


SEGMENT_FIELDS = ("states", "contexts", "all_contexts")  # [B, n, ...]: padded in front when rows are stacked


def stack_caches(caches: List[LayerCache], segment_len: int) -> LayerCache:
    """One cache for a batch of sequences from the caches of each alone (one process; each filled, one row).

    The rows may hold different numbers of closed segments, but must stand at the same point of a segment
    (position mod C): then every row closes its segments on the same later tokens. A row with fewer segments
    gets placeholder segments in front (zeros) that ``pad`` marks, which the decode reader never reads
    (selections and sums skip them), so each row decodes exactly as alone."""
    if not caches:
        raise ValueError("stack_caches needs at least one cache")
    offsets = {cache.position % segment_len for cache in caches}
    if len(offsets) != 1:
        raise ValueError(f"caches stand at different points of a segment (positions mod {segment_len}: "
                         f"{sorted(offsets)}); only prompts of equal length mod segment_len decode together")
    for cache in caches:
        if not cache.filled or len(cache.owned_counts) != 1 or cache.pad is not None:
            raise ValueError("stack_caches takes filled one-process caches of single sequences")
    counts = [_count(cache.states) for cache in caches]
    n = max(counts)
    merged = LayerCache()
    for name in LayerCache.__dataclass_fields__:
        values = [getattr(cache, name) for cache in caches]
        if name in SEGMENT_FIELDS:
            setattr(merged, name, _cat_rows([_left_pad(value, n) for value in values]))
        elif name not in ("position", "segments", "owned_counts", "pad"):
            setattr(merged, name, _cat_rows(values))
    merged.position = n * segment_len + offsets.pop()
    merged.segments = list(range(n))
    merged.owned_counts = [n]
    pads = [n - count for count in counts]
    merged.pad = torch.tensor(pads, dtype=torch.int64, device=merged.context_sum.device) if any(pads) else None
    return merged


def select_cache_rows(cache: LayerCache, index: torch.Tensor) -> LayerCache:
    """The cache of batch rows ``index`` (a 1-D int64 tensor) only: rows that finished leave the batch."""
    kept = LayerCache()
    for name in LayerCache.__dataclass_fields__:
        value = getattr(cache, name)
        if name in ("position", "segments", "owned_counts"):  # the same for every row
            setattr(kept, name, list(value) if isinstance(value, list) else value)
        else:
            setattr(kept, name, take_rows(value, index))
    if kept.pad is not None and not bool(kept.pad.any()):
        kept.pad = None
    return kept


def own_states(pad: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Every row's own states as a selection [B, 1, H, n]: positions pad_b … n − 1, −1 for the placeholders."""
    index = torch.arange(n, device=pad.device)
    chosen = torch.where(index[None, :] >= pad[:, None], index[None, :], torch.full_like(index[None, :], -1))
    return chosen[:, None, None, :].expand(pad.shape[0], 1, heads, n)


NARROW = (torch.bfloat16, torch.float16)


def widened(states, dtype: torch.dtype):
    """Cached states kept in bfloat16 / float16 (``cast_cache``) as ``dtype`` for a read; others as they are."""
    if _is_tuple(states):
        return tuple(widened(w, dtype) for w in states)
    return states.to(dtype) if states.dtype in NARROW and dtype not in NARROW else states


def narrowed_like(new, states):
    """``new`` states in the dtype of the cache's ``states`` (tensors or tuples alike)."""
    if _is_tuple(new):
        return tuple(narrowed_like(w, s) for w, s in zip(new, states))
    return new.to(states.dtype)


def cast_cache(cache: LayerCache, dtype: torch.dtype) -> None:
    """Keep the cached segment states in ``dtype`` (e.g. bfloat16: half the bytes of float32); they are read
    in the contexts' dtype (float32), so only their storage is rounded (docs/inference.md, "Cache dtype")."""
    states = cache.states
    cache.states = tuple(w.to(dtype) for w in states) if _is_tuple(states) else states.to(dtype)
