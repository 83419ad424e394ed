"""Reads of deep memory: the MLP M(z) = z + W2 φ(W1 z) (docs/math.md §3.2), and each token's mini-batch weights.

Separate from the pass because the memory soup mixes the first-layer outputs of several memories before φ."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mlp_read(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M(z) = z + W2 φ(W1 z) for z [..., D], w1 [..., E, D], w2 [..., D, E] (broadcast over leading dims)."""
    hidden = F.gelu(torch.einsum("...ed,...d->...e", w1, z))
    return z + torch.einsum("...de,...e->...d", w2, hidden)


def apply_minibatch_weights(z: torch.Tensor, weights: torch.Tensor, minibatch_len: int) -> torch.Tensor:
    """Apply each token's mini-batch weight matrix: out_t = W[t // b] z_t.

    Args:
        z: [B, T, H, Din]; weights: [B, NB, H, Dout, Din] with NB = ceil(T / b).
    Returns:
        [B, T, H, Dout] in the weights' dtype.
    """
    B, T, H, Din = z.shape
    nb = weights.shape[1]
    pad = nb * minibatch_len - T
    if pad < 0 or pad >= minibatch_len:
        raise ValueError(f"weights hold {nb} mini-batches of {minibatch_len}; expected ceil({T} / {minibatch_len})")
    zp = F.pad(z.to(weights.dtype), (0, 0, 0, 0, 0, pad)).reshape(B, nb, minibatch_len, H, Din)
    out = torch.einsum("bnhoi,bnthi->bntho", weights, zp)
    return out.reshape(B, nb * minibatch_len, H, -1)[:, :T]


def deep_online_read(q: torch.Tensor, minibatch_weights: tuple, minibatch_len: int) -> torch.Tensor:
    """M_t(q_t) = q_t + W2 φ(W1 q_t) with the weights of token t's mini-batch. q [B, T, H, D] -> [B, T, H, D]."""
    w1, w2 = minibatch_weights
    hidden = F.gelu(apply_minibatch_weights(q, w1, minibatch_len))
    return q.to(w1.dtype) + apply_minibatch_weights(hidden, w2, minibatch_len)
