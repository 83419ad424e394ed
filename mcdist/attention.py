"""The attention baseline mixer: causal softmax attention with RoPE (docs/math.md, "Attention baseline").

``AttentionLayer`` takes the place of a Memory Caching layer in a block (``model.mixer = "attention"``, or per
layer ``model.layer_pattern``). It follows the MC layer's conventions: ``forward(x, *, impl=None, cache=None)``;
an empty :class:`KVCache` makes the forward a prefill (the keys and values of the prompt are kept), a filled one
makes the next tokens attend to the cache and to themselves; under sequence parallelism ``self.shard`` (set by
``mcdist.parallel.parallelize``, an ``mcdist.parallel.attention_ring.AttentionShard``) computes the attention of
this rank's pieces over the whole sequence. The layer knows nothing about distribution beyond asking it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcdist import ops
from mcdist.config import ModelConfig

IMPLS = ("auto", "chunked", "triton", "reference")


@dataclass
class KVCache:
    """What one attention layer keeps between decoded tokens: the RoPE-rotated keys and the values of the
    sequence so far (under sequence parallelism: of this rank's share of it).

    ``KVCache()`` is empty: the layer's next forward with it is a prefill. ``AttentionLayer.start_cache`` makes a
    started cache that holds no token yet."""

    position: int = 0  # tokens of the sequence seen (on every rank alike)
    keys: Optional[torch.Tensor] = None  # [B, n, H, D] rotated keys held here
    values: Optional[torch.Tensor] = None  # [B, n, H, D]

    @property
    def filled(self) -> bool:
        """Whether the cache holds a sequence (a prefill happened, or it was started empty)."""
        return self.keys is not None


def rope_angles(positions: torch.Tensor, dim_head: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D/2] of the angles p·base^(−2i/D) of the positions [T] (computed in float64)."""
    frequencies = base ** (-torch.arange(0, dim_head // 2, dtype=torch.float64, device=positions.device)
                           * 2.0 / dim_head)
    angles = positions.to(torch.float64)[:, None] * frequencies[None, :]  # [T, D/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x [B, T, H, D] at the global positions [T]: feature pairs (i, i + D/2)
    rotated by the angle p·base^(−2i/D) (docs/math.md, "Attention baseline")."""
    D = x.shape[-1]
    cos, sin = rope_angles(positions, D, base)
    cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]  # [1, T, 1, D/2]
    first, second = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


def attention_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      q_positions: Optional[torch.Tensor] = None, k_positions: Optional[torch.Tensor] = None):
    """The softmax attention of q [B, Tq, H, D] over one block of keys k and values v [B, Tk, H, D] as a partial
    (out [B, Tq, H, D], lse [B, Tq, H]) for ``ops.merge_partials``. With positions (q [Tq], k [Tk]) a key is seen
    only by queries at its position or later (causal); without, every key is seen. Computed in float32 at least."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(wide), k.to(wide)) * scale  # [B, H, Tq, Tk]
    if q_positions is not None:
        visible = k_positions[None, :] <= q_positions[:, None]  # [Tq, Tk]
        scores = scores.masked_fill(~visible, float("-inf"))
    weights, lse = ops.masked_softmax(scores, -1)  # a query that sees nothing: weights 0, lse −inf
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v.to(wide))
    return out, lse.transpose(1, 2)


def empty_partial(q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The partial of no keys at all for queries q [B, T, H, D]: (0, −inf)."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_zeros(q.shape, dtype=wide), q.new_full(q.shape[:3], float("-inf"), dtype=wide)


class AttentionLayer(nn.Module):
    """Causal softmax attention: q, k, v projections (n_heads × dim_head, as the MC layer), RoPE on q and k,
    ``scaled_dot_product_attention(is_causal=True)``, output projection. 4·d_model·H·D parameters.

    Args:
        config: the ModelConfig (d_model, n_heads, head_dim, rope_base, init_std).
    Shapes: forward(x [B, T, d_model]) -> [B, T, d_model].
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        H, D, width = config.n_heads, config.dim_head, config.d_model
        if D % 2:
            raise ValueError(f"RoPE rotates feature pairs: dim_head = {D} must be even for an attention layer")
        self.n_heads, self.head_dim = H, D
        self.scale = 1.0 / math.sqrt(D)
        self.qkv = nn.Linear(width, 3 * H * D, bias=False)
        self.out_proj = nn.Linear(H * D, width, bias=False)
        self.shard = None  # sequence parallelism's shard context (mcdist.parallel.parallelize), or None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in (self.qkv, self.out_proj):
            nn.init.normal_(module.weight, std=self.config.init_std)

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """q, k (rotated at ``positions`` [T]) and v [B, T, H, D] of x [B, T, d_model]."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        base = self.config.rope_base
        return apply_rope(q, positions, base), apply_rope(k, positions, base), v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """W_o of the heads' outputs y [B, T, H, D] -> [B, T, d_model]."""
        return self.out_proj(y.reshape(*y.shape[:2], -1))

    def start_cache(self, cache: KVCache, batch: int, dtype: torch.dtype, device, group_size: int = 1) -> None:
        """Make ``cache`` a started cache that holds no token (``group_size``: unused, the MC layer's signature)."""
        empty = torch.zeros(batch, 0, self.n_heads, self.head_dim, dtype=dtype, device=device)
        cache.position, cache.keys, cache.values = 0, empty, empty.clone()

    def forward(self, x: torch.Tensor, *, impl: Optional[str] = None, cache: Optional[KVCache] = None):
        """The layer over x [B, T, d_model] -> [B, T, d_model].

        ``impl``: 'reference' runs the token loop (one process, no cache); every other choice runs
        ``scaled_dot_product_attention`` (flash attention on CUDA, PyTorch's math path on CPU): this project has
        no attention kernel of its own. ``cache``: None for a plain forward; an empty :class:`KVCache` makes
        this a prefill, a filled one continues the sequence (x: the next tokens, on every rank alike under
        sequence parallelism). Under ``self.shard`` x is this rank's pieces for a plain forward or a prefill."""
        requested = impl or "auto"
        if requested not in IMPLS:
            raise ValueError(f"impl = {requested!r}; expected one of {list(IMPLS)}")
        if requested == "reference":
            if cache is not None or self.shard is not None:
                raise ValueError("impl = 'reference' (the token loop) runs a whole sequence in one process; under "
                                 "sequence parallelism or with a decode cache use 'auto', 'chunked' or 'triton'")
            return self.output(attention_reference(self, x))
        if cache is not None and cache.filled:
            return self.output(self.decode(x, cache))
        if self.shard is not None:
            positions = self.shard.positions(x.shape[1], x.device)
            q, k, v = self.project(x, positions)
            y = self.shard.attend(q, k, v, positions)
        else:
            positions = torch.arange(x.shape[1], device=x.device)
            q, k, v = self.project(x, positions)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)  # SDPA takes [B, H, T, D]
        if cache is not None:  # prefill: keep this rank's keys and values
            cache.position = x.shape[1] * (self.shard.sp.size if self.shard is not None else 1)
            cache.keys, cache.values = k, v
        return self.output(y)

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The next tokens x [B, T, d_model] after the cached sequence: each attends to the whole cache and to the
        new tokens up to itself; their keys and values join the cache. Returns the heads' outputs [B, T, H, D]."""
        T = x.shape[1]
        positions = cache.position + torch.arange(T, device=x.device)
        q, k, v = self.project(x, positions)
        if cache.keys.shape[1]:
            cached = attention_partial(q, cache.keys, cache.values, self.scale)
        else:
            cached = empty_partial(q)
        if self.shard is not None:  # each rank read its own share of the cache: merge every rank's partial
            cached = self.shard.merge_ranks(cached)
        own = attention_partial(q, k, v, self.scale, positions, positions)
        y = ops.merge_partials(cached, own)[0].to(v.dtype)
        if self.shard is not None:
            k, v = self.shard.owned(k, v, positions)
        cache.keys = torch.cat([cache.keys, k.to(cache.keys.dtype)], 1)
        cache.values = torch.cat([cache.values, v.to(cache.values.dtype)], 1)
        cache.position += T
        return y


def attention_reference(layer: AttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """The token loop: for every t, softmax over s ≤ t of ⟨q_t, k_s⟩/√D, times v_s, with RoPE as a complex
    rotation of the pairs (i, i + D/2). Shares no helper with the SDPA path; slow (tests only). -> [B, T, H, D]."""
    B, T, _ = x.shape
    H, D = layer.n_heads, layer.head_dim
    q, k, v = layer.qkv(x).view(B, T, 3, H, D).unbind(2)
    half = D // 2
    rotated = []
    for z in (q, k):
        pairs = torch.complex(z[..., :half].double(), z[..., half:].double())  # [B, T, H, D/2]
        out = torch.empty_like(pairs)
        for t in range(T):
            for i in range(half):
                out[:, t, :, i] = pairs[:, t, :, i] * complex(math.cos(t * layer.config.rope_base ** (-2 * i / D)),
                                                              math.sin(t * layer.config.rope_base ** (-2 * i / D)))
        rotated.append(torch.cat([out.real, out.imag], -1).to(z.dtype))
    q, k = rotated
    rows = []
    for t in range(T):
        scores = (q[:, t:t + 1] * k[:, :t + 1]).sum(-1) / math.sqrt(D)  # [B, t + 1, H]
        weights = torch.softmax(scores, dim=1)
        rows.append((weights[..., None] * v[:, :t + 1]).sum(1))  # [B, H, D]
    return torch.stack(rows, 1)
