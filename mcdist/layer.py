"""The Memory Caching layer (SPEC §2–§6).

``MemoryCachingLayer.forward`` runs four steps that sequence parallelism (``mcdist.parallel``) reuses one by one:
``project`` → ``memory_pass`` → ``aggregate`` → ``output``. The layer itself knows nothing about distribution.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcdist import ops
from mcdist.aggregate import (merge_partials, online_scores, residual_read_chunked, segment_contexts,
                              select_top_k)
from mcdist.config import ModelConfig
from mcdist.memory.deep import (apply_minibatch_weights, deep_memory_chunked, deep_memory_reference,
                                deep_online_read)


class Projections(NamedTuple):
    q: torch.Tensor  # [B, T, H, D]
    k: torch.Tensor  # [B, T, H, D]
    v: torch.Tensor  # [B, T, H, D]
    u: torch.Tensor  # [B, T, H, D] gate queries (the connector)
    log_decay: Optional[torch.Tensor]  # [B, T, H] for `gated`
    theta: Optional[torch.Tensor]  # [B, T, H] step scales for deep memory


class MemoryResult(NamedTuple):
    online_out: torch.Tensor  # [B, T, H, D]: M_t(q_t)
    cached_states: object  # [B, N, H, D, D], or (W1 [B, N, H, E, D], W2 [B, N, H, D, E])
    final_state: object  # [B, H, D, D], or DeepState
    minibatch_weights: object = None  # deep memory: (W1 [B, NB, H, E, D], W2 [B, NB, H, D, E])


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


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


class MemoryCachingLayer(nn.Module):
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
        if config.memory == "gated":
            self.decay_proj = nn.Linear(width, H)
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
            self.gate_proj = nn.Linear(width, H * D, bias=False)
        self.out_proj = nn.Linear(H * D, width, bias=False)
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
        if hasattr(self, "step_proj"):
            nn.init.normal_(self.step_proj.weight, std=std)
            nn.init.zeros_(self.step_proj.bias)

    # -- the four steps ----------------------------------------------------------------------------------------
    def short_conv(self, raw: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The short convolution (``conv_size = w``) of q, k, v: SiLU(Σ_j w_j ⊙ raw_{t-w+1+j}), causal.

        Args:
            raw: ``qkv(x)`` [B, T, 3·H·D] of consecutive tokens.
            prefix: ``qkv`` of the w − 1 tokens before them [B, w − 1, 3·H·D]; ``None`` = the sequence starts here
                (zeros before it).
        Returns:
            [B, T, 3·H·D]; ``raw`` itself when the layer has no convolution.
        """
        w = self.config.conv_size
        if not w:
            return raw
        B, T, channels = raw.shape
        if prefix is None:
            prefix = raw.new_zeros(B, w - 1, channels)
        padded = torch.cat([prefix.to(raw.dtype), raw], 1).transpose(1, 2)  # [B, 3HD, w - 1 + T]
        mixed = F.silu(F.conv1d(padded, self.conv_weight.to(raw.dtype)[:, None], groups=channels))  # [B, 3HD, T]
        return mixed.transpose(1, 2).contiguous()  # the layout of qkv(x): each head's d values adjacent

    def conv_tail(self, raw: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The ``prefix`` for the tokens after ``raw`` [B, T, 3·H·D] (which followed ``prefix``): the last w − 1 rows
        of the two; ``None`` without a convolution."""
        w = self.config.conv_size
        if not w:
            return None
        if prefix is None:
            prefix = raw.new_zeros(raw.shape[0], w - 1, raw.shape[2])
        return torch.cat([prefix.to(raw.dtype), raw], 1)[:, raw.shape[1]:]

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
        log_decay = None
        if self.config.memory == "gated":  # cumulative log-decays are kept in float32 at least
            log_decay = -F.softplus(at_least_float32(self.decay_proj(x)))
        theta = torch.sigmoid(self.step_proj(x)) if self.config.is_deep else None
        return Projections(q, k, v, u, log_decay, theta)

    def deep_parameters(self) -> dict:
        """The learned pieces of the deep memory's inner optimisation."""
        cfg = self.config
        params = dict(kind=cfg.memory, inner_lr=cfg.inner_lr, init_weights=(self.init_w1, self.init_w2),
                      momentum=None, decay=None)
        if cfg.memory == "titans":
            params["momentum"] = torch.sigmoid(self.momentum_logit)
            params["decay"] = torch.sigmoid(self.decay_logit)
        return params

    def memory_pass(self, p: Projections, *, impl: str, initial_state=None) -> MemoryResult:
        """Online reads M_t(q_t), cached states at every segment end, and the final state."""
        cfg = self.config
        if not cfg.is_deep:
            result = ops.linear_memory(p.q, p.k, p.v, p.log_decay, segment_len=cfg.segment_len,
                                       chunk_len=cfg.chunk_len, state_init=cfg.state_init,
                                       initial_state=initial_state, impl=impl)
            return MemoryResult(result.online_out, result.cached_states, result.final_state)
        run = deep_memory_reference if impl == "reference" else deep_memory_chunked
        result = run(p.k, p.v, p.theta, segment_len=cfg.segment_len, minibatch_len=cfg.minibatch_len,
                     state_init=cfg.state_init, initial_state=initial_state, **self.deep_parameters())
        online = deep_online_read(p.q, result.minibatch_weights, cfg.minibatch_len)
        return MemoryResult(online, result.cached_states, result.final_state, result.minibatch_weights)

    def aggregate(self, p: Projections, memory: MemoryResult, *, impl: str) -> torch.Tensor:
        """y_t from the online read and the cached states before t (SPEC §6). Returns [B, T, H, D]."""
        cfg = self.config
        online = memory.online_out
        if cfg.aggregation == "none":
            return online
        C = cfg.segment_len
        if cfg.aggregation == "residual":
            return online + residual_read_chunked(p.q, memory.cached_states, segment_len=C)
        closed, running = segment_contexts(p.k, C, cfg.pool)
        r_online = online_scores(p.u, running, cfg.scale)
        selected = None
        if cfg.aggregation == "ssc":
            selected = select_top_k(p.u, closed, segment_len=C, top_k=cfg.top_k, gate_scale=cfg.scale, impl=impl)
        read = dict(segment_len=C, gate_scale=cfg.scale, selected=selected, impl=impl)
        if cfg.aggregation == "soup" and cfg.is_deep:
            # Soup over the MLP: mix the first layers' outputs, φ, then mix the second layers' outputs.
            w1s, w2s = memory.cached_states
            mb1, mb2 = memory.minibatch_weights
            b = cfg.minibatch_len
            first = merge_partials(ops.cached_read(p.q, p.u, w1s, closed, **read),
                                   (apply_minibatch_weights(p.q, mb1, b), r_online))[0]
            hidden = F.gelu(first)
            second = merge_partials(ops.cached_read(hidden, p.u, w2s, closed, **read),
                                    (apply_minibatch_weights(hidden, mb2, b), r_online))[0]
            return p.q.to(second.dtype) + second
        # grm and ssc (and soup over linear memory, which equals grm exactly)
        cached = ops.cached_read(p.q, p.u, memory.cached_states, closed, **read)
        return merge_partials(cached, (online.to(cached[0].dtype), r_online))[0]

    def output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """o_t = W_o (RMSNorm_head(y_t) ⊙ SiLU(x_t W_gate)), the norm and gate as configured."""
        B, T, _ = x.shape
        y = y.to(x.dtype)
        if self.config.output_norm:
            y = self.y_norm(y)
        y = y.reshape(B, T, -1)
        if self.config.output_gate:
            y = y * F.silu(self.gate_proj(x))
        return self.out_proj(y)

    def forward(self, x: torch.Tensor, *, impl: Optional[str] = None) -> torch.Tensor:
        requested = impl or self.config.impl
        if requested == "auto" and self.config.segmentation == "logarithmic":
            requested = "reference"  # the only path that implements it
        impl = ops.resolve_impl(requested, x)
        if impl == "reference":
            from mcdist.reference import memory_caching_reference

            return self.output(x, memory_caching_reference(self, self.project(x)))
        if self.config.segmentation != "constant":
            raise ValueError(f"segmentation = {self.config.segmentation!r} is implemented by impl = 'reference' "
                             f"only; got impl = {impl!r}")
        p = self.project(x)
        memory = self.memory_pass(p, impl=impl)
        return self.output(x, self.aggregate(p, memory, impl=impl))
