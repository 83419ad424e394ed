"""The read of every cached state by one token (decoding), without gradients."""

from __future__ import annotations

import torch

from mcdist.ops.cached_read.contract import states_dtype
from mcdist.ops.dtypes import in_state_precision
from mcdist.ops.merge import masked_softmax


@in_state_precision
def cached_read_one_token(z, u, states: torch.Tensor, contexts, *, gate_scale, selected=None):
    """The read of one token per sequence that sees every state (decoding), without gradients: the cached_read
    contract at T = 1 with all n states visible, in the states' own layout (no transposed copy of the cache, no
    blocks).

    z [B, 1, H, Din], u [B, 1, H, Dc], states [B, n, H, Dout, Din], contexts [B, n, H, Dc], selected
    [B, 1, H, K] positions among the states (−1: none) -> (out [B, 1, H, Dout], lse [B, 1, H]).
    """
    dtype = states_dtype(states)
    scores = gate_scale * torch.einsum("bhc,bnhc->bhn", u[:, 0].to(contexts.dtype), contexts).to(dtype)
    if selected is not None:
        index = torch.arange(contexts.shape[1], device=u.device)
        member = (selected[:, 0, :, None, :] == index[:, None]).any(-1)  # [B, H, n]
        scores = scores.masked_fill(~member, float("-inf"))
    weights, lse = masked_softmax(scores, dim=-1)  # [B, H, n], [B, H]
    # the states are linear maps: Σ_j w_j M_j z = (Σ_j w_j M_j) z, one pass over the states (10× the batched
    # matrix-vector products on the CPU at n = 64, D = 64)
    mixed = torch.einsum("bhn,bnhoi->bhoi", weights, states)
    return torch.einsum("bhoi,bhi->bho", mixed, z[:, 0].to(dtype))[:, None], lse[:, None]
