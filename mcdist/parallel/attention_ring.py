"""Sequence parallelism for the attention baseline (docs/math.md, "Attention baseline"): ring attention.

``parallelize`` gives each attention layer an :class:`AttentionShard`. In a plain forward or a prefill, x is
this rank's pieces of the sequence (``layout``, mcdist/parallel/layout.py): every rank's keys and values travel
once around the ring (P − 1 hops, one message of [B, T_local, H, 2D] per hop); each local query piece reads each
block it meets as a partial (out, lse), causal by global positions, and the partials merge by log-sum-exp
(``ops.merge_partials``, as the cached-state ring does). The backward is autograd through the partials; a hop's
backward sends the gradient of the block it received back to the rank it came from.

Decoding: each rank keeps its own pieces' keys and values (a decoded token's join the rank ``position mod P``);
each new token reads this rank's share as one partial, and one all-gather of the partials per step merges them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from mcdist import ops
from mcdist.attention import attention_partial, empty_partial
from mcdist.parallel.comm import Exchange, SPGroup, all_gather_tensor
from mcdist.parallel.layout import rank_pieces


class _RingHop(torch.autograd.Function):
    """One hop of the ring: send ``block`` to the next rank, receive the previous rank's. Backward: the reverse."""

    @staticmethod
    def forward(ctx, sp: SPGroup, step: int, block: torch.Tensor):
        ctx.sp, ctx.step = sp, step
        following, preceding = (sp.rank + 1) % sp.size, (sp.rank - 1) % sp.size
        return Exchange([(block, following, step)], [(torch.empty_like(block), preceding, step)], sp,
                        "attention_ring").wait()[0]

    @staticmethod
    def backward(ctx, grad):
        sp = ctx.sp
        following, preceding = (sp.rank + 1) % sp.size, (sp.rank - 1) % sp.size
        grad = grad.contiguous()
        received = Exchange([(grad, preceding, sp.size + ctx.step)],
                            [(torch.empty_like(grad), following, sp.size + ctx.step)], sp,
                            "attention_ring_backward").wait()[0]
        return None, None, received


@dataclass
class AttentionShard:
    """The shard context of an attention layer: its sp group and the layout of the sequence over it."""

    sp: SPGroup
    layout: str

    def pieces(self, seq_len: int, rank: int) -> List[Tuple[int, int]]:
        return rank_pieces(seq_len, self.sp.size, rank, self.layout)

    def seq_len(self, local_len: int) -> int:
        """The whole sequence's length from this rank's ``local_len`` tokens (checked against the layout)."""
        P = self.sp.size
        unit = 2 * P if self.layout == "zigzag" else P
        seq_len = local_len * P
        if local_len <= 0 or seq_len % unit:
            raise ValueError(f"{local_len} tokens per rank do not make a sequence the {self.layout!r} layout splits "
                             f"over P = {P} ranks (L must be a positive multiple of {unit})")
        return seq_len

    def positions(self, local_len: int, device) -> torch.Tensor:
        """Global positions [T_local] of this rank's tokens, in local order."""
        pieces = self.pieces(self.seq_len(local_len), self.sp.rank)
        return torch.cat([torch.arange(start, start + length, device=device) for start, length in pieces])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's queries over the whole sequence's keys and values (rotated q, k and v
        [B, T_local, H, D] of this rank's pieces at ``positions``). Returns [B, T_local, H, D]."""
        P, rank = self.sp.size, self.sp.rank
        seq_len = self.seq_len(q.shape[1])
        D = q.shape[-1]
        scale = 1.0 / D ** 0.5
        local = self._piece_bounds(seq_len, rank)
        partials = [empty_partial(q[:, offset:offset + length]) for offset, _, length in local]
        block = torch.cat([k, v], -1)  # [B, T_local, H, 2D]: one message per hop
        for step in range(P):
            if step:
                block = _RingHop.apply(self.sp, step, block)
            origin = (rank - step) % P
            keys, values = block[..., :D], block[..., D:]
            for j, (offset, q_start, q_len) in enumerate(local):
                for k_offset, k_start, k_len in self._piece_bounds(seq_len, origin):
                    if k_start > q_start + q_len - 1:
                        continue  # every key comes after every query of the piece
                    q_piece = q[:, offset:offset + q_len]
                    mask = () if k_start + k_len - 1 <= q_start else (positions[offset:offset + q_len],
                                                                      torch.arange(k_start, k_start + k_len,
                                                                                   device=q.device))
                    part = attention_partial(q_piece, keys[:, k_offset:k_offset + k_len],
                                             values[:, k_offset:k_offset + k_len], scale, *mask)
                    partials[j] = ops.merge_partials(partials[j], part)
        y = torch.cat([out for out, _ in partials], 1).to(v.dtype)
        if P > 1 and block.requires_grad:
            # the hops form a chain; tying the last block to the output (times 0) makes every rank run every
            # hop's backward (a point-to-point exchange) even where it read nothing of the last block
            y = y + 0 * block[:, :1, :1, :1].sum()
        return y

    def _piece_bounds(self, seq_len: int, rank: int):
        """(local offset, global start, length) of each piece of ``rank``."""
        offset, out = 0, []
        for start, length in self.pieces(seq_len, rank):
            out.append((offset, start, length))
            offset += length
        return out

    def merge_ranks(self, partial):
        """Every rank's partial (out [B, T, H, D], lse [B, T, H]) of the same queries, merged in rank order."""
        out, lse = partial
        packed = torch.cat([out, lse[..., None].to(out.dtype)], -1)
        every = all_gather_tensor(packed, self.sp, "attention_decode")  # [P, B, T, H, D + 1]
        return ops.merge_all([(part[..., :-1], part[..., -1].to(lse.dtype)) for part in every])

    def owned(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """The decoded tokens' keys and values this rank keeps: those at positions ≡ rank (mod P)."""
        mine = (positions % self.sp.size) == self.sp.rank
        return k[:, mine], v[:, mine]
