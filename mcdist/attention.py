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
from mcdist.conv import ShortConvolution

IMPLS = ("auto", "chunked", "triton", "reference")
QKV_INIT_GAIN = 2.0  # the q, k, v projections start at std QKV_INIT_GAIN / √d_model (docs/results.md)


@dataclass
class KVCache:
    """What one attention layer keeps between decoded tokens: the RoPE-rotated keys and the values of the
    sequence so far (under sequence parallelism: of this rank's share of it), and with a short convolution the
    ``qkv`` rows of its last conv_size − 1 tokens (on every rank alike).

    ``KVCache()`` is empty: the layer's next forward with it is a prefill. ``AttentionLayer.start_cache`` makes a
    started cache that holds no token yet."""

    position: int = 0  # tokens of the sequence seen (on every rank alike)
    keys: Optional[torch.Tensor] = None  # [B, n, H, D] rotated keys held here
    values: Optional[torch.Tensor] = None  # [B, n, H, D]
    conv_tail: Optional[torch.Tensor] = None  # [B, conv_size - 1, 3·H·D], or None (no convolution, or no token yet)

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


class AttentionLayer(ShortConvolution, nn.Module):
    """Causal softmax attention: q, k, v projections (n_heads × dim_head, as the MC layer), with ``conv_size`` > 0
    the MC layer's short convolution of q, k, v, RoPE on q and k, ``scaled_dot_product_attention(is_causal=True)``,
    output projection. 4·d_model·H·D parameters (+ 3·H·D·conv_size).

    Args:
        config: the ModelConfig (d_model, n_heads, head_dim, conv_size, rope_base, init_std).
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
        if config.conv_size:  # depthwise, one filter per channel of q, k, v, as the MC layer (docs/results.md)
            self.conv_weight = nn.Parameter(torch.empty(3 * H * D, config.conv_size))
        self.out_proj = nn.Linear(H * D, width, bias=False)
        self.shard = None  # sequence parallelism's shard context (mcdist.parallel.parallelize), or None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # q, k, v at std 2/√d_model (x has rms 1 after the block's RMSNorm), so the logits ⟨q, k⟩/√D start near
        # unit scale (std ≈ 4 without a convolution, ≈ 0.4 after its taps and SiLU): at init_std (0.02 at d_model
        # 64) they started ~1e-3, attention was uniform and the gradient of the bilinear ⟨q, k⟩ tiny, which kept
        # MQAR on the plateau; 2/√d_model learned on more seeds than 1/√d_model (docs/results.md)
        nn.init.normal_(self.qkv.weight, std=QKV_INIT_GAIN / math.sqrt(self.config.d_model))
        nn.init.normal_(self.out_proj.weight, std=self.config.init_std)
        if hasattr(self, "conv_weight"):  # as the MC layer's filter (nn.Conv1d's default, fan-in = conv_size)
            bound = 1.0 / math.sqrt(self.config.conv_size)
            nn.init.uniform_(self.conv_weight, -bound, bound)

    def project(self, x: torch.Tensor, positions: torch.Tensor, mixed: Optional[torch.Tensor] = None):
        """q, k (rotated at ``positions`` [T]) and v [B, T, H, D] of x [B, T, d_model] (a sequence from its start).
        ``mixed``: ``qkv(x)`` after the short convolution [B, T, 3·H·D], when the caller computed it (with the
        tokens before x, from another rank or the cache)."""
        B, T, _ = x.shape
        if mixed is None:
            mixed = self.short_conv(self.qkv(x))
        q, k, v = mixed.view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        base = self.config.rope_base
        return apply_rope(q, positions, base), apply_rope(k, positions, base), v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """W_o of the heads' outputs y [B, T, H, D] -> [B, T, d_model]."""
        return self.out_proj(y.reshape(*y.shape[:2], -1))

    def start_cache(self, cache: KVCache, batch: int, dtype: torch.dtype, device, group_size: int = 1) -> None:
        """Make ``cache`` a started cache that holds no token (``group_size``: unused, the MC layer's signature)."""
        empty = torch.zeros(batch, 0, self.n_heads, self.head_dim, dtype=dtype, device=device)
        cache.position, cache.keys, cache.values, cache.conv_tail = 0, empty, empty.clone(), None

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
        raw = self.qkv(x)  # [B, T, 3HD]
        if self.shard is not None:
            positions = self.shard.positions(x.shape[1], x.device)
            mixed, tail = sharded_conv(self, raw) if self.config.conv_size else (raw, None)
            q, k, v = self.project(x, positions, mixed)
            y = self.shard.attend(q, k, v, positions)
        else:
            positions = torch.arange(x.shape[1], device=x.device)
            q, k, v = self.project(x, positions, self.short_conv(raw))
            tail = self.conv_tail(raw) if cache is not None else None
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)  # SDPA takes [B, H, T, D]
        if cache is not None:  # prefill: keep this rank's keys and values, and the sequence's last qkv rows
            cache.position = x.shape[1] * (self.shard.sp.size if self.shard is not None else 1)
            cache.keys, cache.values, cache.conv_tail = k, v, tail
        return self.output(y)

    def decode(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The next tokens x [B, T, d_model] after the cached sequence: each attends to the whole cache and to the
        new tokens up to itself; their keys and values join the cache. Returns the heads' outputs [B, T, H, D]."""
        T = x.shape[1]
        positions = cache.position + torch.arange(T, device=x.device)
        raw = self.qkv(x)  # the convolution reads the tokens before these from the cache
        q, k, v = self.project(x, positions, self.short_conv(raw, cache.conv_tail))
        cache.conv_tail = self.conv_tail(raw, cache.conv_tail)
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


def sharded_conv(layer: AttentionLayer, raw: torch.Tensor):
    """The short convolution of this rank's pieces under sequence parallelism: each piece's first tokens read the
    conv_size − 1 tokens before it, which another rank holds, so every rank sends the last w − 1 ``qkv`` rows of
    each of its pieces to all (one all-gather, with its gradient; the rows of the MC layer's
    ``mcdist.parallel.ring_reader.sp_project``).

    Args:
        raw: ``qkv`` of this rank's pieces [B, T_local, 3·H·D], in local order.
    Returns:
        (mixed [B, T_local, 3·H·D], tail [B, w − 1, 3·H·D]: the rows of the sequence's last w − 1 tokens, on every
        rank, for a decode cache)."""
    from mcdist.parallel.comm import all_gather_with_grad  # the layer asks its shard's group; no import cycle

    shard, w = layer.shard, layer.config.conv_size
    seq_len = shard.seq_len(raw.shape[1])
    own = shard.pieces(seq_len, shard.sp.rank)  # [(global start, length)], in local order
    if min(length for _, length in own) < w - 1:
        raise ValueError(f"conv_size = {w} reads {w - 1} tokens before each piece; the pieces of a {seq_len}-token "
                         f"sequence over {shard.sp.size} ranks hold {min(length for _, length in own)}: expected a "
                         "longer sequence or a smaller conv_size")
    ends = [sum(length for _, length in own[:j + 1]) for j in range(len(own))]
    tails = torch.stack([raw[:, end - (w - 1):end] for end in ends], 1)  # [B, pieces, w - 1, 3HD]
    gathered = all_gather_with_grad(tails, shard.sp, "attention_conv")  # [P, B, pieces, w - 1, 3HD]
    # every piece's tail, then zeros (what the sequence's first piece reads); every rank reads the gathered rows
    table = torch.cat([gathered.transpose(0, 1).flatten(1, 2), tails.new_zeros(tails[:, :1].shape)], 1)
    row = {start + length: rank * len(own) + j for rank in range(shard.sp.size)
           for j, (start, length) in enumerate(shard.pieces(seq_len, rank))}
    row[0] = table.shape[1] - 1
    mixed = [layer.short_conv(raw[:, end - length:end], table[:, row[start]])
             for (start, length), end in zip(own, ends)]
    return torch.cat(mixed, 1), table[:, row[seq_len]]


def attention_reference(layer: AttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """The token loop: for every t, the short convolution (if any) as a sum over the last conv_size tokens, then
    softmax over s ≤ t of ⟨q_t, k_s⟩/√D, times v_s, with RoPE as a complex rotation of the pairs (i, i + D/2).
    Shares no helper with the SDPA path; slow (tests only). -> [B, T, H, D]."""
    B, T, _ = x.shape
    H, D = layer.n_heads, layer.head_dim
    raw = layer.qkv(x)  # [B, T, 3HD]
    w = layer.config.conv_size
    if w:
        taps = layer.conv_weight.to(raw.dtype)  # [3HD, w]: tap j reads the token w − 1 − j back
        raw = torch.stack([F.silu(sum(taps[:, j] * raw[:, t - (w - 1) + j] for j in range(w) if t - (w - 1) + j >= 0))
                           for t in range(T)], 1)
    q, k, v = raw.view(B, T, 3, H, D).unbind(2)
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
