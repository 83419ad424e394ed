"""The read of cached states as token and state loops (docs/math.md §6): the reference the chunked read and the
kernels are tested against."""

from __future__ import annotations

import torch

from mcdist.ops.cached_read.contract import States, check_read_args, num_states, states_dtype
from mcdist.ops.deep_memory.read import mlp_read


def cached_read_reference(z, u, states: States, contexts, *, segment_len, gate_scale, query_offset=0,
                          segment_offset=0, selected=None):
    """Token and state loops; see ``cached_read_chunked`` for the contract."""
    check_read_args(z, u, states, contexts, segment_len, selected)
    B, T, H = z.shape[:3]
    dtype = states_dtype(states)
    n = num_states(states)
    dout = states.shape[3] if isinstance(states, torch.Tensor) else z.shape[-1]
    out_rows, lse_rows = [], []
    for bi in range(B):
        for t in range(T):
            own = (query_offset + t) // segment_len
            for h in range(H):
                scores, reads = [], []
                for j in range(n):
                    index = segment_offset + j
                    if index >= own:
                        continue
                    if selected is not None and index not in selected[bi, t, h].tolist():
                        continue
                    scores.append(gate_scale * (u[bi, t, h].to(dtype) * contexts[bi, j, h].to(dtype)).sum())
                    if isinstance(states, torch.Tensor):
                        reads.append(states[bi, j, h] @ z[bi, t, h].to(dtype))
                    else:
                        reads.append(mlp_read(z[bi, t, h].to(dtype), states[0][bi, j, h], states[1][bi, j, h]))
                if scores:
                    weights = torch.softmax(torch.stack(scores), 0)
                    out_rows.append((weights[:, None] * torch.stack(reads)).sum(0))
                    lse_rows.append(torch.logsumexp(torch.stack(scores), 0))
                else:
                    out_rows.append(torch.zeros(dout, dtype=dtype, device=z.device))
                    lse_rows.append(torch.tensor(float("-inf"), dtype=dtype, device=z.device))
    out = torch.stack(out_rows).reshape(B, T, H, -1)
    lse = torch.stack(lse_rows).reshape(B, T, H)
    return out, lse
