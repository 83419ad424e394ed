"""Apply sequence parallelism to a model built by mcdist.model, by composition (the model code stays unaware).

``parallelize`` gives every Memory Caching layer a shard context (``ring_reader.SequenceShard``): no method is
replaced; the layer asks its context for the reader of this rank's pieces (docs/architecture.md)."""

from __future__ import annotations

import dataclasses

from mcdist.attention import AttentionLayer
from mcdist.layer import MemoryCachingLayer
from mcdist.parallel.attention_ring import AttentionShard
from mcdist.parallel.comm import CommStats, SPGroup
from mcdist.parallel.layout import rank_pieces
from mcdist.parallel.mesh import Mesh
from mcdist.parallel.ring_reader import SequenceShard


def sp_group_of(mesh: Mesh) -> SPGroup:
    return SPGroup(mesh.sp_group, mesh.sp_rank, mesh.sp, mesh.sp_ranks)


def parallelize_layer(layer: MemoryCachingLayer, sp: SPGroup, layout: str) -> None:
    """Make ``layer`` run sequence-parallel on its rank's slice of the sequence: give it the shard context (an
    attention layer gets the ring attention's, ``attention_ring.AttentionShard``)."""
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"layout = {layout!r}; expected 'zigzag' or 'contiguous'")
    layer.shard = AttentionShard(sp, layout) if isinstance(layer, AttentionLayer) else SequenceShard(sp, layout)


def sequence_layers(model) -> list:
    """The token mixers of ``model`` (Memory Caching and attention layers), in order (however the blocks are
    wrapped)."""
    return [module for module in model.modules() if isinstance(module, (MemoryCachingLayer, AttentionLayer))]


def parallelize_sequence(model, sp: SPGroup, layout: str) -> list:
    """Shard every mixer of ``model`` over the group ``sp`` (in place). Returns one SPGroup per MC layer (the same
    process group; each with its own ``stats``, the bytes that layer's communication moved on this rank)."""
    groups = []
    if sp.size > 1:
        for layer in sequence_layers(model):
            group = dataclasses.replace(sp, stats=CommStats())
            parallelize_layer(layer, group, layout)
            if isinstance(layer, MemoryCachingLayer):  # sp_groups: the MC layers' (communication_report)
                groups.append(group)
    model.sp_groups = groups
    return groups


def parallelize(model, mesh: Mesh, layout: str) -> list:
    """Shard every MC layer of ``model`` over the mesh's sp group (in place); see :func:`parallelize_sequence`."""
    return parallelize_sequence(model, sp_group_of(mesh), layout)


def expected_read_bytes(config, seq_len: int, sp: int, rank: int, layout: str, batch: int = 1,
                        bytes_per_value: int = 4) -> dict:
    """The figure of docs/distributed.md §5 for one layer on one rank: the cached states of the segments before this rank's last
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
