"""Communication for sequence parallelism: autograd-aware all-gather, point-to-point exchanges, byte accounting."""

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


class Exchange:
    """Non-blocking point-to-point sends and receives inside one SP group, posted together.

    ``sends``: (tensor, peer, tag); ``receives``: (buffer, peer, tag); peers are ranks inside the group. Empty
    tensors are not posted (both sides know the sizes: they follow from the layout). A message is matched by
    (peer, tag), so two messages between the same pair in flight at once need different tags.
    """

    def __init__(self, sends: List[tuple], receives: List[tuple], sp: SPGroup, kind: str):
        self.sending = [(t.contiguous(), peer, tag) for t, peer, tag in sends if t.numel()]  # alive until sent
        self.received = [buffer for buffer, _, _ in receives]
        operations = [dist.P2POp(dist.isend, t, sp.ranks[peer], sp.group, tag) for t, peer, tag in self.sending]
        operations += [dist.P2POp(dist.irecv, buffer, sp.ranks[peer], sp.group, tag)
                       for buffer, peer, tag in receives if buffer.numel()]
        self.works = dist.batch_isend_irecv(operations) if operations else []
        sp.stats.add(kind, nbytes([t for t, _, _ in self.sending]), nbytes(self.received))

    def wait(self) -> List[torch.Tensor]:
        """The receive buffers, filled, in the order given."""
        for work in self.works:
            work.wait()
        self.works, self.sending = [], []  # release the finished work objects and the sent buffers at once
        return self.received
