"""The deep memory pass's state, result and argument checks (docs/math.md §3.2, §4)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mcdist.ops.dtypes import state_dtype


class DeepState(NamedTuple):
    """The running state of a deep memory. Momenta are zeros for ``dla``."""

    w1: torch.Tensor  # [B, H, E, D]
    w2: torch.Tensor  # [B, H, D, E]
    s1: torch.Tensor  # [B, H, E, D]
    s2: torch.Tensor  # [B, H, D, E]


class DeepMemoryPass(NamedTuple):
    minibatch_weights: tuple  # (W1 [B, NB, H, E, D], W2 [B, NB, H, D, E]): what each mini-batch reads
    cached_states: tuple  # (W1 [B, N, H, E, D], W2 [B, N, H, D, E]): weights at each segment end
    final_state: DeepState


def check_deep_memory_args(k, v, theta, kind, segment_len, minibatch_len, state_init, init_weights,
                           initial_state) -> None:
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must share one shape [B, T, H, D]; got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, H, D = k.shape
    if tuple(theta.shape) != (B, T, H):
        raise ValueError(f"theta must be [B, T, H] = {(B, T, H)}; got {tuple(theta.shape)}")
    if kind not in ("dla", "titans"):
        raise ValueError(f"deep memory kind = {kind!r}; expected 'dla' or 'titans'")
    if minibatch_len <= 0 or segment_len % minibatch_len != 0:
        raise ValueError(f"minibatch_len = {minibatch_len} must be a positive divisor of segment_len = {segment_len}")
    if state_init not in ("checkpoint", "independent"):
        raise ValueError(f"state_init = {state_init!r}; expected 'checkpoint' or 'independent'")
    w1, w2 = init_weights
    if w1.dim() != 3 or w1.shape[0] != H or w1.shape[2] != D or tuple(w2.shape) != (H, D, w1.shape[1]):
        raise ValueError(f"init_weights must be W1 [H, E, D] and W2 [H, D, E] with H = {H}, D = {D}; got "
                         f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    if initial_state is not None and state_init == "independent":
        raise ValueError("initial_state is only meaningful for state_init = 'checkpoint'")


def deep_state_of(init_weights, batch: int, dtype: Optional[torch.dtype] = None) -> DeepState:
    """The start state built from the learned initial weights (W1_0 [H, E, D], W2_0 [H, D, E]), momenta zero."""
    dtype = dtype or state_dtype(init_weights[0].dtype)
    w1, w2 = (w.to(dtype).unsqueeze(0).expand(batch, *w.shape) for w in init_weights)
    return DeepState(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2))


PASS_DOC = """
    Args:
        k, v: [B, T, H, D]; theta: [B, T, H] per-token step scales θ_t (in (0, 1)).
        kind: 'dla' or 'titans'. segment_len: C. minibatch_len: b, a divisor of C; any T (the tail mini-batch
            may be partial).
        state_init: 'checkpoint' or 'independent' (every segment restarts from init_weights, momentum zero).
        inner_lr: η. init_weights: (W1_0 [H, E, D], W2_0 [H, D, E]), the learned initial weights.
        momentum, decay: [H] μ and α for 'titans' (None for 'dla').
        initial_state: a DeepState to start the first segment from under 'checkpoint'.
    Returns:
        DeepMemoryPass(minibatch_weights (W1 [B, NB, H, E, D], W2 [B, NB, H, D, E]) read by each mini-batch,
        cached_states (W1 [B, N, H, E, D], W2 [B, N, H, D, E]) at each segment end, final_state DeepState).
"""
