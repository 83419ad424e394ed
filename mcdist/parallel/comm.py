"""Communication for sequence parallelism: autograd-aware all-gather, the ring exchange, byte accounting."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Bytes this rank sent and received, by purpose ('ring', 'ring_backward', 'prefix', 'contexts', ...)."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    received: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] += sent
        self.received[kind] += received

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    def as_dict(self) -> dict:
        return {"sent": dict(self.sent), "received": dict(self.received)}


def nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class SPGroup:
    """One sequence-parallel group as the SP layer needs it."""

    group: object  # ProcessGroup
    rank: int  # rank inside the group
    size: int
    ranks: tuple  # global ranks of the group, in group order
    stats: CommStats = field(default_factory=CommStats)

    @property
    def next_global(self) -> int:
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev_global(self) -> int:
        return self.ranks[(self.rank - 1) % self.size]


def all_gather_tensor(tensor: torch.Tensor, sp: SPGroup, kind: str) -> torch.Tensor:
    """[P, *tensor.shape]: every rank's tensor (equal shapes), no autograd."""
    tensor = tensor.contiguous()
    out = [torch.empty_like(tensor) for _ in range(sp.size)]
    dist.all_gather(out, tensor, group=sp.group)
    sp.stats.add(kind, nbytes([tensor]) * (sp.size - 1), nbytes([tensor]) * (sp.size - 1))
    return torch.stack(out)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sp: SPGroup, kind: str, tensor: torch.Tensor):
        ctx.sp, ctx.kind = sp, kind
        return all_gather_tensor(tensor, sp, kind)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's copy of this rank's tensor received a gradient: sum them (all-reduce), keep this slice.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.sp.group)
        ctx.sp.stats.add(ctx.kind + "_backward", nbytes([grad]), nbytes([grad]))
        return None, None, grad[ctx.sp.rank]


def all_gather_with_grad(tensor: torch.Tensor, sp: SPGroup, kind: str) -> torch.Tensor:
    """[P, *tensor.shape] all-gather whose backward sends each rank the sum of the gradients of its tensor."""
    return _AllGather.apply(sp, kind, tensor)


class RingExchange:
    """Send tensors to the next rank and receive the same shapes from the previous one, non-blocking."""

    def __init__(self, tensors: List[torch.Tensor], sp: SPGroup, kind: str, *, tag_offset: int = 0):
        self.sending = [t.contiguous() for t in tensors]  # kept alive until the sends complete
        self.received = [torch.empty_like(t) for t in self.sending]
        # one tag per tensor: with two ranks the next and previous rank are the same peer; two exchanges in
        # flight at once take disjoint tags (tag_offset)
        operations = [dist.P2POp(dist.isend, t, sp.next_global, sp.group, tag_offset + tag)
                      for tag, t in enumerate(self.sending)]
        operations += [dist.P2POp(dist.irecv, r, sp.prev_global, sp.group, tag_offset + tag)
                       for tag, r in enumerate(self.received)]
        self.works = dist.batch_isend_irecv(operations)
        sp.stats.add(kind, nbytes(tensors), nbytes(self.received))

    def wait(self) -> List[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.works, self.sending = [], []  # release the finished work objects and the sent buffers at once
        return self.received
