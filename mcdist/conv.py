"""The short causal convolution of q, k, v (docs/math.md §2), shared by the Memory Caching layer and the attention
mixer: SiLU(Σ_j w_j ⊙ raw_{t-w+1+j}), depthwise, one filter of ``w = conv_size`` taps per channel."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def short_conv(raw: torch.Tensor, weight: Optional[torch.Tensor],
               prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The short convolution of ``raw = qkv(x)`` [B, T, channels] of consecutive tokens.

    Args:
        weight: [channels, w], or None (no convolution: ``raw`` itself is returned).
        prefix: ``qkv`` of the w − 1 tokens before them [B, w − 1, channels]; ``None`` = the sequence starts here
            (zeros before it).
    Returns:
        [B, T, channels], in the layout of ``raw`` (each head's values adjacent).
    """
    if weight is None:
        return raw
    B, T, channels = raw.shape
    w = weight.shape[1]
    if prefix is None:
        prefix = raw.new_zeros(B, w - 1, channels)
    padded = torch.cat([prefix.to(raw.dtype), raw], 1).transpose(1, 2)  # [B, channels, w - 1 + T]
    mixed = F.silu(F.conv1d(padded, weight.to(raw.dtype)[:, None], groups=channels))  # [B, channels, T]
    return mixed.transpose(1, 2).contiguous()


def conv_tail(raw: torch.Tensor, conv_size: int, prefix: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The ``prefix`` for the tokens after ``raw`` [B, T, channels] (which followed ``prefix``): the last
    ``conv_size − 1`` rows of the two; ``None`` without a convolution (``conv_size = 0``)."""
    if not conv_size:
        return None
    if prefix is None:
        prefix = raw.new_zeros(raw.shape[0], conv_size - 1, raw.shape[2])
    return torch.cat([prefix.to(raw.dtype), raw], 1)[:, raw.shape[1]:]


class ShortConvolution:
    """The two methods a layer with ``config.conv_size`` and, when that is > 0, a ``conv_weight`` parameter
    [channels, conv_size] gets from this mixin (the MC layer and the attention mixer)."""

    def short_conv(self, raw: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The short convolution of ``raw = qkv(x)`` [B, T, channels] (:func:`short_conv`)."""
        return short_conv(raw, self.conv_weight if self.config.conv_size else None, prefix)

    def conv_tail(self, raw: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The rows the convolution carries over to the tokens after ``raw`` (:func:`conv_tail`)."""
        return conv_tail(raw, self.config.conv_size, prefix)
