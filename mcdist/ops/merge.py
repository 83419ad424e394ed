"""Log-sum-exp merge of cached-read partials (docs/architecture.md, "Merge of partials").

A partial is ``(out [..., D], lse [...])``: a softmax-weighted read normalised inside its block, and the
log-sum-exp of the block's scores. Merging is the flash-attention combine rule; it is associative and
commutative, so partials merge in any order and grouping (the ring relies on this). A block that nobody sees
(lse = −inf) adds nothing, and two such blocks merge to (0, −inf) with finite gradients.

Pure PyTorch, differentiable by autograd; the Triton kernels' host code and the chunked paths both use it.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

__all__ = ["merge_partials", "merge_all", "masked_softmax"]

Partial = Tuple[torch.Tensor, torch.Tensor]


def merge_partials(a: Partial, b: Partial) -> Partial:
    """Merge two partials into one.

    Args:
        a: (out_a [..., D], lse_a [...]).
        b: (out_b [..., D], lse_b [...]) with the same shapes.
    Returns:
        (out [..., D], lse [...]) with lse = logaddexp(lse_a, lse_b) and
        out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse). Where both lse are −inf: out 0, lse −inf, and
        the gradients there are 0 (never NaN).
    """
    out_a, lse_a = a
    out_b, lse_b = b
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or tuple(out_a.shape[:-1]) != tuple(lse_a.shape):
        raise ValueError(f"partials must be (out [..., D], lse [...]) of equal shapes; got out {tuple(out_a.shape)}"
                         f" / {tuple(out_b.shape)}, lse {tuple(lse_a.shape)} / {tuple(lse_b.shape)}")
    # The result does not depend on the shift, so it carries no gradient (and maximum's tie rule is moot).
    peak = torch.maximum(lse_a, lse_b).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weight_a = torch.exp(lse_a - peak)  # 0 where block a saw nothing
    weight_b = torch.exp(lse_b - peak)
    total = weight_a + weight_b
    seen = total > 0
    # where() before log and division keeps the gradients finite where neither side saw anything.
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, peak + torch.log(safe_total), torch.full_like(total, float("-inf")))
    out = (out_a * weight_a[..., None] + out_b * weight_b[..., None]) / safe_total[..., None]
    return out, lse


def merge_all(partials: Iterable[Partial]) -> Partial:
    """Merge a non-empty sequence of partials, left to right (any order gives the same result).

    Args:
        partials: iterable of (out [..., D], lse [...]) of equal shapes.
    Returns:
        The merged (out [..., D], lse [...]).
    """
    partials = list(partials)
    if not partials:
        raise ValueError("merge_all needs at least one partial; got an empty sequence")
    merged = partials[0]
    for partial in partials[1:]:
        merged = merge_partials(merged, partial)
    return merged


def masked_softmax(scores: torch.Tensor, dim: int):
    """Softmax and log-sum-exp over ``dim`` where −inf marks excluded entries; all excluded gives weights 0 and
    lse −inf with finite gradients (no NaN). -> (weights like scores, lse with ``dim`` removed)."""
    peak = scores.amax(dim=dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    exps = torch.exp(scores - peak)
    total = exps.sum(dim=dim, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, peak + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return exps / safe_total, lse.squeeze(dim)
