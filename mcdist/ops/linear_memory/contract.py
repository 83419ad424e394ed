"""The linear memory pass's result and argument checks (docs/architecture.md, "Linear memory pass")."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LinearMemoryPass(NamedTuple):
    online_out: torch.Tensor  # [B, T, H, D]
    cached_states: torch.Tensor  # [B, N, H, D, D]
    final_state: torch.Tensor  # [B, H, D, D]


def check_linear_memory_args(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D]; got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, H, D = q.shape
    if log_decay is not None and tuple(log_decay.shape) != (B, T, H):
        raise ValueError(f"log_decay must be [B, T, H] = {(B, T, H)}; got {tuple(log_decay.shape)}")
    if segment_len <= 0 or chunk_len <= 0 or segment_len % chunk_len != 0:
        raise ValueError(f"chunk_len = {chunk_len} must be a positive divisor of segment_len = {segment_len}")
    if state_init not in ("checkpoint", "independent"):
        raise ValueError(f"state_init = {state_init!r}; expected 'checkpoint' or 'independent'")
    if initial_state is not None:
        if state_init == "independent":
            raise ValueError("initial_state is only meaningful for state_init = 'checkpoint'; every segment starts "
                             "from zeros under 'independent'")
        if tuple(initial_state.shape) != (B, H, D, D):
            raise ValueError(f"initial_state must be [B, H, D, D] = {(B, H, D, D)}; got {tuple(initial_state.shape)}")
