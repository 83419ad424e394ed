"""Apply sequence and data parallelism to a model built by mcdist.model (the model code stays unaware)."""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcdist.model import IGNORE_INDEX
from mcdist.layer import at_least_float32
from mcdist.parallel.comm import CommStats, SPGroup
from mcdist.parallel.layout import rank_pieces
from mcdist.parallel.mesh import Mesh
from mcdist.parallel.sp_layer import sp_layer_forward


def sp_group_of(mesh: Mesh) -> SPGroup:
    return SPGroup(mesh.sp_group, mesh.sp_rank, mesh.sp, mesh.sp_ranks)


def parallelize_layer(layer, sp: SPGroup, layout: str) -> None:
    """Make ``layer`` (a MemoryCachingLayer) run sequence-parallel on its rank's slice of the sequence."""

    def forward(self, x, *, impl: Optional[str] = None):
        return sp_layer_forward(self, x, sp, layout, impl)

    layer.forward = types.MethodType(forward, layer)


def parallelize(model, mesh: Mesh, layout: str) -> list:
    """Shard every MC layer of ``model`` over the mesh's sp group (in place).

    Returns one SPGroup per layer (the same process group; each with its own ``stats``, the bytes that layer's
    communication moved on this rank)."""
    groups = []
    if mesh.sp > 1:
        for block in model.blocks:
            sp = dataclasses.replace(sp_group_of(mesh), stats=CommStats())
            parallelize_layer(block.mixer, sp, layout)
            groups.append(sp)
    model.sp_groups = groups
    return groups


def expected_read_bytes(config, seq_len: int, sp: int, rank: int, layout: str, batch: int = 1,
                        bytes_per_value: int = 4) -> dict:
    """SPEC §7.5's figure for one layer on one rank: the cached states of the segments before this rank's last
    token (× H × state size), plus one state per rank for the prefix under ``checkpoint``; and what the ring
    brings this rank in the forward: exactly those states, with their contexts (``RingPlan``)."""
    C, H, D = config.segment_len, config.n_heads, config.dim_head
    state = D * D if not config.is_deep else 2 * config.expansion * D * D
    last_token = max(start + length for start, length in rank_pieces(seq_len, sp, rank, layout)) - 1
    own = sum(length for _, length in rank_pieces(seq_len, sp, rank, layout)) // C
    earlier = last_token // C - (own - 1)  # segments before the last one that other ranks hold
    prefix = state if config.state_init == "checkpoint" else 0  # the state prefix exists only under checkpoint
    spec = batch * H * bytes_per_value * (earlier * state + prefix)
    ring = batch * H * bytes_per_value * earlier * (state + D)
    return {"spec_7_5": spec, "ring_forward": ring}


def communication_report(model, config, seq_len: int, layout: str, batch: int = 1, bytes_per_value: int = 4):
    """Per layer: bytes received by this rank (by purpose) beside the analytical figures."""
    rows = []
    for index, sp in enumerate(getattr(model, "sp_groups", [])):
        expected = expected_read_bytes(config, seq_len, sp.size, sp.rank, layout, batch, bytes_per_value)
        received = dict(sp.stats.received)
        rows.append({"layer": index, "received": received, "sent": dict(sp.stats.sent), **expected,
                     "ring_vs_spec": received.get("ring", 0) / max(expected["spec_7_5"], 1)})
    return rows


def global_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Labelled tokens over every rank of the world (dp × sp)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(count)
    return count


def parallel_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, impl: Optional[str] = None):
    """This rank's share of the loss: Σ local cross-entropy / labelled tokens of the whole world.

    Summed over all ranks it is exactly the mean cross-entropy one process computes on the whole batch, so
    parameter gradients are reduced by a plain sum (``reduce_gradients``). Returns (share, logits).
    """
    logits = model(input_ids, impl=impl).logits
    total = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / global_token_count(labels).to(total.dtype), logits


def reduce_gradients(model) -> None:
    """Sum parameter gradients over every rank (sp shards and dp replicas), in one flat buffer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
    return value
