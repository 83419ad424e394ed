"""The token-loop reference of the whole MC read (docs/math.md §4–§6): one token at a time, the equations as written.

Slow and obviously right; the oracle the chunked path, the kernels and sequence parallelism are tested against.
It also carries *logarithmic segmentation*: token t (position p = t + 1) splits its prefix [0, p) into the
blocks of the binary expansion of p, largest first (p = 13 → [0, 8), [8, 12), [12, 13)); the last block holds
t and is its online segment, the earlier blocks are its cached segments (docs/math.md).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from mcdist import ops


def constant_segments(t: int, segment_len: int):
    """(closed blocks before t, start of t's online segment) under constant segmentation."""
    own = t // segment_len
    return [(i * segment_len, (i + 1) * segment_len) for i in range(own)], own * segment_len


def logarithmic_segments(t: int):
    """(closed blocks before t, start of t's online block) under logarithmic segmentation."""
    position, start, blocks = t + 1, 0, []
    for bit in reversed(range(position.bit_length())):
        size = 1 << bit
        if position & size:
            blocks.append((start, start + size))
            start += size
    return blocks[:-1], blocks[-1][0]


def memory_caching_reference(layer, p) -> torch.Tensor:
    """y for every token of one sequence batch. ``layer``: a MemoryCachingLayer; ``p``: its Projections.

    Returns: [B, T, H, D].
    """
    cfg = layer.config
    B, T, H, D = p.q.shape
    sdt = ops.state_dtype(p.q.dtype)
    q, k, v, u = (x.to(sdt) for x in (p.q, p.k, p.v, p.u))
    if cfg.segmentation == "logarithmic":
        if cfg.memory not in ("linear", "gated"):
            raise ValueError("segmentation = 'logarithmic' supports linear and gated memory only; "
                             f"memory = {cfg.memory!r}")
        split = logarithmic_segments
    else:
        split = lambda t: constant_segments(t, cfg.segment_len)  # noqa: E731

    if cfg.is_deep:
        deep = ops.deep_memory(p.k, p.v, p.theta, segment_len=cfg.segment_len, minibatch_len=cfg.minibatch_len,
                               state_init=cfg.state_init, impl="reference", **layer.deep_parameters())

        def block_state(start, end):  # constant segmentation: block = one segment
            index = start // cfg.segment_len
            return deep.cached_states[0][:, index], deep.cached_states[1][:, index]

        def online_state(t, start):
            index = t // cfg.minibatch_len
            return deep.minibatch_weights[0][:, index], deep.minibatch_weights[1][:, index]

        def read(state, z):
            return ops.mlp_read(z, state[0], state[1])
    else:
        decay = torch.ones(B, T, H, dtype=sdt) if p.log_decay is None else torch.exp(p.log_decay.to(sdt))
        window = getattr(p, "window", None)  # swla: [B, T, 2, H] = (β_t, λ_t), docs/math.md §3.3

        def step(state, t, first):
            """The state after token t of a recurrence whose first token is ``first``."""
            new = v[:, t, :, :, None] * k[:, t, :, None, :]
            if window is None:
                return decay[:, t, :, None, None] * state + new
            beta, lam = window[:, t, 0, :, None, None].to(sdt), window[:, t, 1, :, None, None].to(sdt)
            state = decay[:, t, :, None, None] * state + lam * new
            if t > first:  # the window's older token, when it belongs to this recurrence
                state = state + beta * (v[:, t - 1, :, :, None] * k[:, t - 1, :, None, :])
            return state

        running, state = [], torch.zeros(B, H, D, D, dtype=sdt)
        for t in range(T):
            state = step(state, t, 0)
            running.append(state)

        @lru_cache(maxsize=None)
        def block_state(start, end):
            if cfg.state_init == "checkpoint":
                return running[end - 1]
            state = torch.zeros(B, H, D, D, dtype=sdt)
            for t in range(start, end):
                state = step(state, t, start)
            return state

        def online_state(t, start):
            return block_state(start, t + 1)

        def read(state, z):
            return torch.einsum("bhij,bhj->bhi", state, z)

    def pool(start, end):
        total = k[:, start:end].sum(1)
        return total / (end - start) if cfg.pool == "mean" else total

    outputs = []
    for t in range(T):
        closed, start = split(t)
        online = online_state(t, start)
        y_online = read(online, q[:, t])
        if cfg.aggregation == "none" or not closed:
            outputs.append(y_online)
            continue
        states = [block_state(a, e) for a, e in closed]
        if cfg.aggregation == "residual":
            outputs.append(y_online + sum(read(s, q[:, t]) for s in states))
            continue
        scores = torch.stack([cfg.scale * (u[:, t] * pool(a, e)).sum(-1) for a, e in closed], -1)  # [B, H, n]
        online_score = cfg.scale * (u[:, t] * pool(start, t + 1)).sum(-1)  # [B, H]
        keep = torch.ones_like(scores, dtype=torch.bool)
        if cfg.aggregation == "ssc":
            keep = torch.zeros_like(keep)
            for bi in range(B):
                for h in range(H):
                    ranked = sorted(range(len(closed)), key=lambda i: (-float(scores[bi, h, i].detach()), i))
                    keep[bi, h, ranked[:cfg.top_k]] = True
        logits = torch.cat([scores.masked_fill(~keep, float("-inf")), online_score[..., None]], -1)
        gamma = torch.softmax(logits, -1)  # [B, H, n + 1]
        if cfg.aggregation == "soup":  # mix the weights themselves, then read once

            def mix(parts):
                return sum(gamma[..., i, None, None] * part for i, part in enumerate(parts))

            if cfg.is_deep:
                w1 = mix([s[0] for s in states] + [online[0]])
                w2 = mix([s[1] for s in states] + [online[1]])
                outputs.append(ops.mlp_read(q[:, t], w1, w2))
            else:
                outputs.append(read(mix(states + [online]), q[:, t]))
            continue
        y = gamma[..., -1, None] * y_online
        for i, s in enumerate(states):
            y = y + gamma[..., i, None] * read(s, q[:, t])
        outputs.append(y)
    return torch.stack(outputs, 1)
