"""The Memory Caching layer (docs/math.md §2–§6).

``MemoryCachingLayer.forward`` computes every token's output one way: ``project`` → memory pass →
:func:`aggregate` → ``output``, asking a *reader* (``mcdist.readers``) for what depends on where the tokens are:
the whole sequence in one process (:class:`~mcdist.readers.LocalReader`), this rank's pieces of it under
sequence parallelism (the reader of the shard context ``mcdist.parallel`` gave the layer), or one token after a
prompt (:class:`~mcdist.readers.DecodeReader`, with a :class:`~mcdist.readers.LayerCache`). The layer knows
nothing about distribution beyond asking its shard context, when it has one, for a reader.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcdist import ops
from mcdist.config import ModelConfig
from mcdist.conv import ShortConvolution
from mcdist.packing import documents_of, run_documents
from mcdist.readers import DecodeReader, LayerCache, LocalReader, MemoryResult, Projections, Reader
from mcdist.reference import memory_caching_reference


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def swla_inputs(p: Projections, config: ModelConfig, previous=None, initial_state=None):
    """The gated linear memory inputs over 2H heads whose two halves sum to the swla memory (docs/math.md §3.3):
    heads [0, H) write λ_t v_t k_tᵀ, heads [H, 2H) write β_t v_{t-1} k_{t-1}ᵀ, both with the decays a_t, both
    read with q_t. ``previous``: (k, v) [B, H, D] of the token before p's first one (``None``: zeros, p starts the
    sequence); p starts at a segment boundary. ``initial_state`` [B, H, D, D] goes into the first half.

    Returns: (q, k, v [B, T, 2H, D], log_decay [B, T, 2H], initial_state [B, 2H, D, D] or None)."""
    B, T, H, D = p.k.shape
    if previous is None:
        k_before = v_before = p.k.new_zeros(B, 1, H, D)
    else:
        k_before, v_before = (x[:, None].to(p.k.dtype) for x in previous)
    k_shift = torch.cat([k_before, p.k[:, :-1]], 1)  # [B, T, H, D]: k_{t-1}
    v_shift = torch.cat([v_before, p.v[:, :-1]], 1)
    beta, lam = p.window.unbind(2)  # [B, T, H] each
    if config.state_init == "independent":  # a segment's memory holds its own tokens only
        first = torch.arange(T, device=p.k.device) % config.segment_len == 0
        beta = beta.masked_fill(first[None, :, None], 0.0)
    q = torch.cat([p.q, p.q], 2)
    k = torch.cat([p.k, k_shift], 2)
    v = torch.cat([(lam[..., None] * p.v).to(p.v.dtype), (beta[..., None] * v_shift).to(p.v.dtype)], 2)
    log_decay = torch.cat([p.log_decay, p.log_decay], 2)
    if initial_state is not None:
        initial_state = torch.cat([initial_state, torch.zeros_like(initial_state)], 1)
    return q, k, v, log_decay, initial_state


def swla_sum(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The sum of the two head halves (dimension ``head_dim``, 2H wide) of a swla pass's output or states."""
    return at_least_float32(x).unflatten(head_dim, (2, -1)).sum(head_dim).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's D features, with a learned weight per head and feature."""

    def __init__(self, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.eps = eps

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # [B, T, H, D]
        y32 = at_least_float32(y)
        normed = y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(y.dtype)


class MemoryCachingLayer(ShortConvolution, nn.Module):
    """Token mixer with a recurrent memory and cached segment memories.

    Args:
        config: the ModelConfig (memory kind, aggregation, segment_len, ...).
    Shapes: forward(x [B, T, d_model]) -> [B, T, d_model].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, D, width = config.n_heads, config.dim_head, config.d_model
        self.n_heads, self.head_dim = H, D
        self.qkv = nn.Linear(width, 3 * H * D, bias=False)
        if config.conv_size:  # depthwise: one filter of conv_size taps per channel of q, k, v
            self.conv_weight = nn.Parameter(torch.empty(3 * H * D, config.conv_size))
        self.needs_gate_query = config.aggregation in ("grm", "soup", "ssc")
        if self.needs_gate_query and not config.share_uq:
            self.connector = nn.Linear(width, H * D, bias=False)
        if config.memory in ("gated", "swla"):
            self.decay_proj = nn.Linear(width, H)
        if config.memory == "swla":  # β_t, λ_t of the window's two tokens (docs/math.md §3.3)
            self.window_proj = nn.Linear(width, 2 * H)
        if config.is_deep:
            E = config.expansion * D
            self.step_proj = nn.Linear(width, H)
            self.init_w1 = nn.Parameter(torch.randn(H, E, D) / math.sqrt(D))
            self.init_w2 = nn.Parameter(torch.randn(H, D, E) * (0.5 / math.sqrt(E)))
            if config.memory == "titans":
                self.momentum_logit = nn.Parameter(torch.full((H,), 2.0))
                self.decay_logit = nn.Parameter(torch.full((H,), -4.0))
        if config.output_norm:
            self.y_norm = HeadRMSNorm(H, D, config.norm_eps)
        if config.output_gate:
            # a bias (config.output_gate_bias; 0 = none, the gate before it) opens the gate at the start
            self.gate_proj = nn.Linear(width, H * D, bias=config.output_gate_bias != 0.0)
        self.out_proj = nn.Linear(H * D, width, bias=False)
        self.shard = None  # sequence parallelism's shard context (mcdist.parallel.parallelize), or None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in (self.qkv, self.out_proj, getattr(self, "connector", None), getattr(self, "gate_proj", None)):
            if module is not None:
                nn.init.normal_(module.weight, std=std)
        if hasattr(self, "conv_weight"):  # nn.Conv1d's default for a depthwise filter (fan-in = conv_size)
            bound = 1.0 / math.sqrt(self.config.conv_size)
            nn.init.uniform_(self.conv_weight, -bound, bound)
        if hasattr(self, "decay_proj"):
            nn.init.normal_(self.decay_proj.weight, std=std)
            with torch.no_grad():  # per-head decays from about 0.99 down to about 0.73 at the start
                self.decay_proj.bias.copy_(torch.linspace(-5.0, -1.0, self.n_heads))
        if hasattr(self, "window_proj"):
            nn.init.normal_(self.window_proj.weight, std=std)
            with torch.no_grad():  # β = sigmoid(0) = 0.5 for the previous token, λ = sigmoid(3) ≈ 0.95 for this one
                self.window_proj.bias.copy_(torch.tensor([0.0, 3.0]).repeat_interleave(self.n_heads))
        if hasattr(self, "step_proj"):
            nn.init.normal_(self.step_proj.weight, std=std)
            nn.init.zeros_(self.step_proj.bias)
        if getattr(self, "gate_proj", None) is not None and self.gate_proj.bias is not None:
            nn.init.constant_(self.gate_proj.bias, self.config.output_gate_bias)  # SiLU(b) = 1 at the default

    def project(self, x: torch.Tensor, *, mixed: Optional[torch.Tensor] = None) -> Projections:
        """q, k, v, u and the per-token gates from x [B, T, d_model] (a sequence from its start).

        ``mixed``: q, k, v after the short convolution [B, T, 3·H·D], when the caller computed them (a piece of a
        sequence under SP, one decoded token): the convolution then needs the tokens before x, which x lacks."""
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if mixed is None:
            mixed = self.short_conv(self.qkv(x))
        q, k, v = mixed.view(B, T, 3, H, D).unbind(2)
        if self.config.qk_norm == "l2":  # (autocast runs the norm in float32: keep q, k in v's dtype)
            q = F.normalize(q, dim=-1).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if not self.needs_gate_query:
            u = q
        elif self.config.share_uq:
            u = q
        else:
            u = self.connector(x).view(B, T, H, D)
        log_decay = window = None
        if self.config.memory in ("gated", "swla"):  # cumulative log-decays are kept in float32 at least
            log_decay = -F.softplus(at_least_float32(self.decay_proj(x)))
        if self.config.memory == "swla":  # [B, T, 2, H]: (β_t, λ_t)
            window = torch.sigmoid(at_least_float32(self.window_proj(x))).view(B, T, 2, H)
        theta = torch.sigmoid(self.step_proj(x)) if self.config.is_deep else None
        return Projections(q, k, v, u, log_decay, theta, window)

    def deep_parameters(self) -> dict:
        """The learned pieces of the deep memory's inner optimisation."""
        cfg = self.config
        params = dict(kind=cfg.memory, inner_lr=cfg.inner_lr, init_weights=(self.init_w1, self.init_w2),
                      momentum=None, decay=None)
        if cfg.memory == "titans":
            params["momentum"] = torch.sigmoid(self.momentum_logit)
            params["decay"] = torch.sigmoid(self.decay_logit)
        return params

    def initial_memory(self, batch: int, dtype: torch.dtype, device):
        """M_0 for ``batch`` sequences whose inputs have ``dtype``: zeros [B, H, D, D], or the deep memory's
        learned initial weights (DeepState), in the states' dtype (float32 at least)."""
        cfg = self.config
        if cfg.is_deep:
            return ops.deep_state_of((self.init_w1, self.init_w2), batch, ops.state_dtype(dtype))
        return torch.zeros(batch, cfg.n_heads, cfg.dim_head, cfg.dim_head, dtype=ops.state_dtype(dtype),
                           device=device)

    def memory_pass(self, p: Projections, *, impl: str, initial_state=None, previous=None) -> MemoryResult:
        """Online reads M_t(q_t), cached states at every segment end, and the final state.

        ``previous``: swla only, (k, v) [B, H, D] of the token before p's first one (``None``: p starts the
        sequence). p must start at a segment boundary."""
        cfg = self.config
        if cfg.memory == "swla":
            q, k, v, log_decay, initial_state = swla_inputs(p, cfg, previous, initial_state)
            result = ops.linear_memory(q, k, v, log_decay, segment_len=cfg.segment_len, chunk_len=cfg.chunk_len,
                                       state_init=cfg.state_init, initial_state=initial_state, impl=impl)
            return MemoryResult(swla_sum(result.online_out, 2), swla_sum(result.cached_states, 2),
                                swla_sum(result.final_state, 1))
        if not cfg.is_deep:
            result = ops.linear_memory(p.q, p.k, p.v, p.log_decay, segment_len=cfg.segment_len,
                                       chunk_len=cfg.chunk_len, state_init=cfg.state_init,
                                       initial_state=initial_state, impl=impl)
            return MemoryResult(result.online_out, result.cached_states, result.final_state)
        result = ops.deep_memory(p.k, p.v, p.theta, segment_len=cfg.segment_len, minibatch_len=cfg.minibatch_len,
                                 state_init=cfg.state_init, initial_state=initial_state, impl=impl,
                                 **self.deep_parameters())
        online = ops.deep_online_read(p.q, result.minibatch_weights, cfg.minibatch_len)
        return MemoryResult(online, result.cached_states, result.final_state, result.minibatch_weights,
                            cfg.minibatch_len)

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """o_t = W_o (RMSNorm_head(y_t) ⊙ SiLU(x_t W_gate + b)), the norm and gate as configured."""
        B, T, _ = x.shape
        y = y.to(x.dtype)
        if self.config.output_norm:
            y = self.y_norm(y)
        y = y.reshape(B, T, -1)
        if self.config.output_gate:
            y = y * F.silu(self.gate_proj(x))
        return self.out_proj(y)

    def start_cache(self, cache: LayerCache, batch: int, dtype: torch.dtype, device, group_size: int = 1) -> None:
        """Make ``cache`` a started cache that holds no token: every later token goes through the decode step.
        ``group_size``: the ranks the cached states will be spread over (1 in one process)."""
        cfg = self.config
        B, H, D = batch, cfg.n_heads, cfg.dim_head
        cdt, sdt = (torch.float64 if dtype == torch.float64 else torch.float32), ops.state_dtype(dtype)
        if cfg.is_deep:
            E = cfg.expansion * D
            states = (torch.zeros(B, 0, H, E, D, dtype=sdt, device=device),
                      torch.zeros(B, 0, H, D, E, dtype=sdt, device=device))
        else:
            states = torch.zeros(B, 0, H, D, D, dtype=sdt, device=device)
        contexts = torch.zeros(B, 0, H, D, dtype=cdt, device=device)
        cache.position, cache.states, cache.contexts, cache.segments = 0, states, contexts, []
        cache.all_contexts, cache.state = contexts, self.initial_memory(B, dtype, device)
        cache.context_sum = torch.zeros(B, H, D, dtype=cdt, device=device)
        cache.pending, cache.owned_counts, cache.conv_tail = None, [0] * group_size, None
        cache.previous = None  # swla: no token before the first

    def resolve_impl(self, impl: Optional[str], x: torch.Tensor) -> str:
        """The implementation a forward asks the ops for: ``impl`` ('auto' when None), checked for x's device.
        'auto' stays 'auto': each op then picks its own (Triton where it has a kernel for CUDA tensors, else
        chunked), while an explicit 'triton' raises where an op has no kernel. Logarithmic segmentation runs the
        token loop, which 'auto' picks for it."""
        requested = impl or "auto"
        if self.config.segmentation == "logarithmic":
            if requested not in ("auto", "reference"):
                raise ValueError(f"segmentation = 'logarithmic' is implemented by impl = 'reference' only; got "
                                 f"impl = {requested!r}")
            return "reference"
        resolved = ops.resolve_impl(requested, x)  # validates the name, and 'triton' against the device
        return "auto" if requested == "auto" else resolved

    def forward(self, x: torch.Tensor, *, impl: Optional[str] = None, cache: Optional[LayerCache] = None,
                cu_seqlens=None, document_ids: Optional[torch.Tensor] = None):
        """The layer over x [B, T, d_model] -> [B, T, d_model].

        ``cache``: None for a plain forward (training, evaluation). An empty :class:`LayerCache` makes this a
        prefill (the parallel path over x, then the cache holds what later tokens read); a filled one continues
        the sequence token by token from it (x: the next tokens, on every rank alike under sequence parallelism).
        Under sequence parallelism (``self.shard``, set by ``mcdist.parallel.parallelize``) x is this rank's slice
        of the sequence for a plain forward or a prefill. ``cu_seqlens`` (or ``document_ids``): documents packed in
        x [1, T] (mcdist.packing), each computed as if alone; a plain forward in one process only."""
        cu_seqlens = documents_of(cu_seqlens, document_ids)
        if cu_seqlens is not None:
            if cache is not None or self.shard is not None:
                raise ValueError("cu_seqlens: a plain forward in one process only (no decode cache, no sequence "
                                 "parallelism yet)")
            return run_documents(lambda rows: self.forward(rows, impl=impl), x, cu_seqlens)
        impl = self.resolve_impl(impl, x)
        if impl == "reference":
            if cache is not None or self.shard is not None:
                raise ValueError("impl = 'reference' (the token loop) runs a whole sequence in one process; under "
                                 "sequence parallelism or with a decode cache use 'auto', 'chunked' or 'triton'")
            return self.output(x, memory_caching_reference(self, self.project(x)))
        if cache is None:
            return self.compute(x, self.sequence_reader(x, impl))
        outputs, first = [], 0
        if not cache.filled:  # prefill: the parallel path over whole mini-batches, the rest token by token
            cfg = self.config
            T = x.shape[1]
            first = T - T % cfg.minibatch_len if cfg.is_deep else T
            if self.shard is not None and first != T:
                raise ValueError(f"a sequence-parallel prefill needs whole mini-batches on every rank; got {T} "
                                 f"tokens here with minibatch_len {cfg.minibatch_len}")
            if first:
                outputs.append(self.compute(x[:, :first], self.sequence_reader(x[:, :first], impl, cache)))
            else:
                self.start_cache(cache, x.shape[0], x.dtype, x.device)
        group = self.shard.sp if self.shard is not None else None
        for t in range(first, x.shape[1]):
            outputs.append(self.compute(x[:, t:t + 1], DecodeReader(self.config, cache, impl, group)))
        return torch.cat(outputs, 1)

    def sequence_reader(self, x: torch.Tensor, impl: str, cache: Optional[LayerCache] = None) -> Reader:
        """The reader of a sequence from its start: this rank's pieces of it under the shard context, else the
        whole of it in this process. With an empty ``cache``, the reader fills it (prefill)."""
        if self.shard is not None:
            return self.shard.reader(self, x, impl, cache)
        return LocalReader(self.config, impl, cache)

    def compute(self, x: torch.Tensor, reader: Reader) -> torch.Tensor:
        """The one computation path: projections, memory pass, aggregation, output, with ``reader``."""
        p = reader.project(self, x)
        memory = reader.memory(self, p)
        y = aggregate(self.config, p, memory, reader)
        reader.finish(self, p, memory)
        return self.output(x, y)


def aggregate(config: ModelConfig, p: Projections, memory: MemoryResult, reader: Reader) -> torch.Tensor:
    """y_t from the online read and the cached states before t (docs/math.md §6). Returns [B, T, H, D].

    The only place outside the token-loop reference that branches on the aggregation; ``reader`` supplies the
    cached part (its states are ``memory.cached_states``)."""
    online = memory.online_out
    if config.aggregation == "none":
        return online
    if config.aggregation == "residual":
        return online + reader.total(p.q, memory.cached_states)
    r_online = ops.online_scores(p.u, reader.running_contexts(p), config.scale)
    selected = None
    if config.aggregation == "ssc":
        selected = reader.select(p.u, top_k=config.top_k, gate_scale=config.scale)
    read = dict(gate_scale=config.scale, selected=selected)
    if config.aggregation == "soup" and config.is_deep:
        # Soup over the MLP: mix the first layers' outputs, φ, then mix the second layers' outputs.
        w1s, w2s = memory.cached_states
        mb1, mb2 = memory.minibatch_weights
        b = memory.minibatch_len
        first = ops.merge_partials(reader.read(p.q, p.u, w1s, **read),
                                   (ops.apply_minibatch_weights(p.q, mb1, b), r_online))[0]
        hidden = F.gelu(first)
        second = ops.merge_partials(reader.read(hidden, p.u, w2s, **read),
                                    (ops.apply_minibatch_weights(hidden, mb2, b), r_online))[0]
        return p.q.to(second.dtype) + second
    # grm and ssc (and soup over linear memory, which equals grm exactly: docs/math.md §6)
    cached = reader.read(p.q, p.u, memory.cached_states, **read)
    return ops.merge_partials(cached, (online.to(cached[0].dtype), r_online))[0]
