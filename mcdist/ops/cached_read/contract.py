"""What a read of cached states takes: a tensor of linear maps or deep memory's (W1, W2), and its argument checks
(docs/architecture.md, "Cached read")."""

from __future__ import annotations

from typing import Sequence, Union

import torch

States = Union[torch.Tensor, Sequence[torch.Tensor]]


def num_states(states: States) -> int:
    return states.shape[1] if isinstance(states, torch.Tensor) else states[0].shape[1]


def states_dtype(states: States) -> torch.dtype:
    return states.dtype if isinstance(states, torch.Tensor) else states[0].dtype


def check_read_args(z, u, states, contexts, segment_len, selected):
    if z.dim() != 4 or u.dim() != 4 or z.shape[:3] != u.shape[:3]:
        raise ValueError(f"z and u must be [B, T, H, *] with one B, T, H; got {tuple(z.shape)}, {tuple(u.shape)}")
    n = num_states(states)
    B, T, H = z.shape[:3]
    if contexts.dim() != 4 or tuple(contexts.shape[:3]) != (B, n, H) or contexts.shape[3] != u.shape[3]:
        raise ValueError(f"contexts must be [B, Nb, H, Dc] = {(B, n, H, u.shape[3])}; got {tuple(contexts.shape)}")
    if segment_len <= 0:
        raise ValueError(f"segment_len = {segment_len}; expected a positive integer")
    if selected is not None and (selected.dim() != 4 or tuple(selected.shape[:3]) != (B, T, H)):
        raise ValueError(f"selected must be [B, T, H, K] with (B, T, H) = {(B, T, H)}; got {tuple(selected.shape)}")
