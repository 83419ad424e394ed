"""Deep memory as a token loop, written from docs/math.md §3.2 and §4 alone: the reference the chunked path is
tested against.

Each token's inner loss ℓ_t is written out and differentiated by ``torch.autograd.grad`` (with a graph, so outer
gradients flow through the inner steps); the mini-batch sum G = Σ θ_t ∇ℓ_t is taken at the weights of the
mini-batch start, then the update is applied. It shares no code with ``mcdist.ops.deep_memory.chunked``: its
own loop, MLP read, GELU and update, so a wrong rule in one of them makes the two disagree.
"""

from __future__ import annotations

import math

import torch

from mcdist.ops.deep_memory.contract import PASS_DOC, DeepMemoryPass, DeepState, check_deep_memory_args
from mcdist.ops.dtypes import state_dtype


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = x Φ(x), the exact (erf) GELU."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _memory_of(w1: torch.Tensor, w2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """M(z) = z + W2 φ(W1 z) for one token of every sequence and head: w1 [B, H, E, D], w2 [B, H, D, E],
    z [B, H, D] -> [B, H, D]."""
    hidden = _gelu(torch.matmul(w1, z.unsqueeze(-1)))  # [B, H, E, 1]
    return z + torch.matmul(w2, hidden).squeeze(-1)


def _inner_loss(w1, w2, k_t, v_t, kind) -> torch.Tensor:
    """ℓ_t per sequence and head, [B, H]: dla −⟨M(k_t), v_t⟩, titans ‖M(k_t) − v_t‖² (no ½)."""
    read = _memory_of(w1, w2, k_t)
    if kind == "dla":
        return -(read * v_t).sum(-1)
    return (read - v_t).pow(2).sum(-1)


def _token_gradient(w1, w2, k_t, v_t, kind, with_graph: bool):
    """(∇_W1 ℓ_t, ∇_W2 ℓ_t) at (w1, w2), [B, H, E, D] and [B, H, D, E]: the sum over (B, H) of ℓ_t has each
    sequence's and head's own gradient in its slice."""
    with torch.enable_grad():
        a1 = w1 if with_graph and w1.requires_grad else w1.detach().requires_grad_()
        a2 = w2 if with_graph and w2.requires_grad else w2.detach().requires_grad_()
        loss = _inner_loss(a1, a2, k_t, v_t, kind).sum()
        g1, g2 = torch.autograd.grad(loss, (a1, a2), create_graph=with_graph)
    return g1, g2


def deep_memory_reference(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights,
                          momentum=None, decay=None, initial_state=None) -> DeepMemoryPass:
    check_deep_memory_args(k, v, theta, kind, segment_len, minibatch_len, state_init, init_weights, initial_state)
    B, T, H, _ = k.shape
    sdt = state_dtype(k.dtype)
    with_graph = torch.is_grad_enabled()
    k, v, theta = k.to(sdt), v.to(sdt), theta.to(sdt)
    first_w1 = init_weights[0].to(sdt).unsqueeze(0).repeat(B, 1, 1, 1)  # [B, H, E, D]
    first_w2 = init_weights[1].to(sdt).unsqueeze(0).repeat(B, 1, 1, 1)  # [B, H, D, E]
    if kind == "titans":
        mu = momentum.to(sdt).view(1, H, 1, 1)
        alpha = decay.to(sdt).view(1, H, 1, 1)
    if initial_state is not None:
        w1, w2, s1, s2 = (x.to(sdt) for x in initial_state)
    else:
        w1, w2 = first_w1, first_w2
        s1, s2 = torch.zeros_like(first_w1), torch.zeros_like(first_w2)
    read_w1, read_w2, cached_w1, cached_w2 = [], [], [], []
    sum1 = sum2 = None
    for t in range(T):
        if t % segment_len == 0 and state_init == "independent":  # docs/math.md §4: a fresh memory per segment
            w1, w2 = first_w1, first_w2
            s1, s2 = torch.zeros_like(first_w1), torch.zeros_like(first_w2)
        if t % minibatch_len == 0:  # every token of the mini-batch takes its gradient at (and reads) W^(m)
            read_w1.append(w1)
            read_w2.append(w2)
            sum1, sum2 = torch.zeros_like(w1), torch.zeros_like(w2)
        g1, g2 = _token_gradient(w1, w2, k[:, t], v[:, t], kind, with_graph)
        weight = theta[:, t].view(B, H, 1, 1)
        sum1 = sum1 + weight * g1
        sum2 = sum2 + weight * g2
        if (t + 1) % minibatch_len == 0 or t == T - 1:  # the mini-batch is complete: one step
            if kind == "dla":
                w1 = w1 - inner_lr * sum1
                w2 = w2 - inner_lr * sum2
            else:
                s1 = mu * s1 - inner_lr * sum1
                s2 = mu * s2 - inner_lr * sum2
                w1 = (1.0 - alpha) * w1 + s1
                w2 = (1.0 - alpha) * w2 + s2
        if (t + 1) % segment_len == 0 or t == T - 1:  # the weights after the segment's last update are cached
            cached_w1.append(w1)
            cached_w2.append(w2)
    return DeepMemoryPass((torch.stack(read_w1, 1), torch.stack(read_w2, 1)),
                          (torch.stack(cached_w1, 1), torch.stack(cached_w2, 1)), DeepState(w1, w2, s1, s2))


deep_memory_reference.__doc__ = ("Deep memory token by token, per-token gradients by torch.autograd.grad "
                                 "(docs/math.md §3.2, §4)." + PASS_DOC)
