"""Deep memory, the CPU fast path: each mini-batch's θ-weighted gradient sum as batched matmuls (the hand
derivation of docs/math.md §12.2), then the update of §3.2. Tested against the independent token loop of
``mcdist.ops.deep_memory.naive``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcdist.ops.deep_memory.contract import PASS_DOC, DeepMemoryPass, DeepState, check_deep_memory_args, deep_state_of
from mcdist.ops.dtypes import in_state_precision, state_dtype


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _apply_update(state: DeepState, g1, g2, kind, inner_lr, momentum, decay) -> DeepState:
    """One mini-batch step from the θ-weighted gradient sums g1 [B, H, E, D], g2 [B, H, D, E]."""
    if kind == "dla":
        return DeepState(state.w1 - inner_lr * g1, state.w2 - inner_lr * g2, state.s1, state.s2)
    mu = momentum[None, :, None, None]
    keep = 1.0 - decay[None, :, None, None]
    s1 = mu * state.s1 - inner_lr * g1
    s2 = mu * state.s2 - inner_lr * g2
    return DeepState(keep * state.w1 + s1, keep * state.w2 + s2, s1, s2)


def _run(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights, momentum, decay,
         initial_state) -> DeepMemoryPass:
    B, T, H, D = k.shape
    sdt = state_dtype(k.dtype)
    b = minibatch_len
    pad = (-T) % b
    n_minibatches = (T + pad) // b
    per_segment = segment_len // b
    # Padding tokens have θ = 0: they add no gradient, and the partial mini-batch stays one mini-batch (exact).
    kp = F.pad(k.to(sdt), (0, 0, 0, 0, 0, pad)).reshape(B, n_minibatches, b, H, D)
    vp = F.pad(v.to(sdt), (0, 0, 0, 0, 0, pad)).reshape(B, n_minibatches, b, H, D)
    tp = F.pad(theta.to(sdt), (0, 0, 0, pad)).reshape(B, n_minibatches, b, H)
    momentum = momentum.to(sdt) if momentum is not None else None
    decay = decay.to(sdt) if decay is not None else None
    start = deep_state_of(init_weights, B, sdt)
    if initial_state is not None:
        state = DeepState(*(x.to(sdt) for x in initial_state))
    else:
        state = start
    read_w1, read_w2, cached_w1, cached_w2 = [], [], [], []
    # unbind, not indexing: the backward of n indexings would zero-fill n full-size gradients (quadratic in T)
    for n, (k_mb, v_mb, t_mb) in enumerate(zip(kp.unbind(1), vp.unbind(1), tp.unbind(1))):
        if n % per_segment == 0 and state_init == "independent":
            state = start
        read_w1.append(state.w1)
        read_w2.append(state.w2)
        g1, g2 = _gradients_batched(state.w1, state.w2, k_mb, v_mb, t_mb, kind)
        state = _apply_update(state, g1, g2, kind, inner_lr, momentum, decay)
        if (n + 1) % per_segment == 0 or n == n_minibatches - 1:
            cached_w1.append(state.w1)
            cached_w2.append(state.w2)
    return DeepMemoryPass((torch.stack(read_w1, 1), torch.stack(read_w2, 1)),
                          (torch.stack(cached_w1, 1), torch.stack(cached_w2, 1)), state)


def _gradients_batched(w1, w2, k, v, theta, kind):
    """Σ_t θ_t ∇ℓ_t for a mini-batch as matmuls. k, v [B, b, H, D], theta [B, b, H]."""
    pre = torch.einsum("bhed,bthd->bthe", w1, k)  # [B, b, H, E]
    hidden = F.gelu(pre)
    read = k + torch.einsum("bhde,bthe->bthd", w2, hidden)  # [B, b, H, D]
    d_read = -v if kind == "dla" else 2.0 * (read - v)
    d_read = d_read * theta[..., None]
    g2 = torch.einsum("bthd,bthe->bhde", d_read, hidden)
    d_pre = torch.einsum("bhde,bthd->bthe", w2, d_read) * gelu_derivative(pre)
    g1 = torch.einsum("bthe,bthd->bhed", d_pre, k)
    return g1, g2


@in_state_precision
def deep_memory_chunked(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights,
                        momentum=None, decay=None, initial_state=None) -> DeepMemoryPass:
    check_deep_memory_args(k, v, theta, kind, segment_len, minibatch_len, state_init, init_weights, initial_state)
    return _run(k, v, theta, kind=kind, segment_len=segment_len, minibatch_len=minibatch_len, state_init=state_init,
                inner_lr=inner_lr, init_weights=init_weights, momentum=momentum, decay=decay,
                initial_state=initial_state)


deep_memory_chunked.__doc__ = ("Deep memory with each mini-batch's gradients as batched matmuls (docs/math.md §12.2)."
                               + PASS_DOC)
