"""Deep memory: a 2-layer MLP M(z) = z + W2 φ(W1 z) trained online by mini-batch gradient descent (SPEC §3.2).

Kinds: ``dla`` (ℓ_t = -⟨M(k_t), v_t⟩, W ← W − η Σ θ_t ∇ℓ_t) and ``titans`` (ℓ_t = ‖M(k_t) − v_t‖²,
S ← μ S − η Σ θ_t ∇ℓ_t, W ← (1 − α) W + S). All tokens of a mini-batch take their gradient at the weights at the
start of that mini-batch, and read those same weights.

- ``deep_memory_reference``: per-token gradients from autograd (``torch.func.grad`` of the written-out loss),
  summed over each mini-batch in a token loop. Independent of the hand-derived gradients below.
- ``deep_memory_chunked``: the gradients of a whole mini-batch as batched matmuls (the CPU fast path).

Both return the weights every mini-batch reads (``minibatch_weights``), the cached weights at each segment end
and the final running state. Reads are separate (``apply_minibatch_weights``) because the memory soup mixes
the first-layer output of several memories before the non-linearity.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from mcdist.memory.linear import state_dtype


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


def gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def mlp_read(z: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """M(z) = z + W2 φ(W1 z) for z [..., D], w1 [..., E, D], w2 [..., D, E] (broadcast over leading dims)."""
    hidden = F.gelu(torch.einsum("...ed,...d->...e", w1, z))
    return z + torch.einsum("...de,...e->...d", w2, hidden)


def _token_loss(w1, w2, k, v, kind):
    read = mlp_read(k, w1, w2)
    if kind == "dla":
        return -(read * v).sum()
    return ((read - v) ** 2).sum()


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


def _start_state(init_weights, batch, sdt) -> DeepState:
    w1, w2 = (w.to(sdt).unsqueeze(0).expand(batch, *w.shape) for w in init_weights)
    return DeepState(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2))


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
         initial_state, minibatch_gradients) -> DeepMemoryPass:
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
    start = _start_state(init_weights, B, sdt)
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
        g1, g2 = minibatch_gradients(state.w1, state.w2, k_mb, v_mb, t_mb, kind)
        state = _apply_update(state, g1, g2, kind, inner_lr, momentum, decay)
        if (n + 1) % per_segment == 0 or n == n_minibatches - 1:
            cached_w1.append(state.w1)
            cached_w2.append(state.w2)
    return DeepMemoryPass((torch.stack(read_w1, 1), torch.stack(read_w2, 1)),
                          (torch.stack(cached_w1, 1), torch.stack(cached_w2, 1)), state)


def _gradients_by_autograd(w1, w2, k, v, theta, kind):
    """Σ_t θ_t ∇ℓ_t, one token at a time, each gradient from torch.func.grad of the loss as written."""
    grad_fn = torch.func.grad(_token_loss, argnums=(0, 1))
    batch, tokens, heads, _ = k.shape
    per_batch1, per_batch2 = [], []
    for bi in range(batch):
        per_head1, per_head2 = [], []
        for h in range(heads):
            sum1, sum2 = torch.zeros_like(w1[bi, h]), torch.zeros_like(w2[bi, h])
            for t in range(tokens):
                d1, d2 = grad_fn(w1[bi, h], w2[bi, h], k[bi, t, h], v[bi, t, h], kind)
                sum1 = sum1 + theta[bi, t, h] * d1
                sum2 = sum2 + theta[bi, t, h] * d2
            per_head1.append(sum1)
            per_head2.append(sum2)
        per_batch1.append(torch.stack(per_head1))
        per_batch2.append(torch.stack(per_head2))
    return torch.stack(per_batch1), torch.stack(per_batch2)


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


_DOC_ARGS = """
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


def deep_memory_reference(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights,
                          momentum=None, decay=None, initial_state=None) -> DeepMemoryPass:
    check_deep_memory_args(k, v, theta, kind, segment_len, minibatch_len, state_init, init_weights, initial_state)
    return _run(k, v, theta, kind=kind, segment_len=segment_len, minibatch_len=minibatch_len, state_init=state_init,
                inner_lr=inner_lr, init_weights=init_weights, momentum=momentum, decay=decay,
                initial_state=initial_state, minibatch_gradients=_gradients_by_autograd)


def deep_memory_chunked(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights,
                        momentum=None, decay=None, initial_state=None) -> DeepMemoryPass:
    check_deep_memory_args(k, v, theta, kind, segment_len, minibatch_len, state_init, init_weights, initial_state)
    return _run(k, v, theta, kind=kind, segment_len=segment_len, minibatch_len=minibatch_len, state_init=state_init,
                inner_lr=inner_lr, init_weights=init_weights, momentum=momentum, decay=decay,
                initial_state=initial_state, minibatch_gradients=_gradients_batched)


deep_memory_reference.__doc__ = "Token-loop deep memory with autograd per-token gradients." + _DOC_ARGS
deep_memory_chunked.__doc__ = "Deep memory with each mini-batch's gradients as batched matmuls." + _DOC_ARGS


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


def deep_state_of(init_weights, batch: int, dtype: Optional[torch.dtype] = None) -> DeepState:
    """The start state built from the learned initial weights (momenta zero)."""
    return _start_state(init_weights, batch, dtype or state_dtype(init_weights[0].dtype))
