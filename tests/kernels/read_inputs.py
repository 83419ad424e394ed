"""Inputs shared by the tests of the cached-read kernels (blocked and ssc gather); errors: tests/checks.py."""

import math
import os

import torch

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make_inputs(seed, B, T, H, din, dout, dc, n, *, state_dtype=torch.float32, tied=False):
    """[z, u, states, contexts] on DEVICE; ``tied`` gives every state the same context (tied scores)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, H, din, generator=gen)
    u = torch.randn(B, T, H, dc, generator=gen)
    states = torch.randn(B, n, H, dout, din, generator=gen) / math.sqrt(din)
    contexts = torch.randn(B, n, H, dc, generator=gen)
    if tied:
        contexts = contexts[:, :1].expand(B, n, H, dc).clone()
    return [x.to(DEVICE) for x in (z, u, states.to(state_dtype), contexts)]


def random_selection(seed, B, T, H, k, *, segment_len, query_offset=0, with_invalid=False):
    """[B, T, H, k] int64 on the CPU: random distinct earlier global segments per token, −1 padding;
    ``with_invalid`` puts a future index in the padding."""
    gen = torch.Generator().manual_seed(seed)
    selected = torch.full((B, T, H, k), -1, dtype=torch.int64)
    for t in range(T):
        own = (query_offset + t) // segment_len
        for bi in range(B):
            for h in range(H):
                earlier = torch.randperm(own, generator=gen)[:k]
                selected[bi, t, h, :len(earlier)] = earlier
                if with_invalid and len(earlier) < k:
                    selected[bi, t, h, len(earlier)] = own + int(torch.randint(0, 3, (1,), generator=gen))
    return selected
