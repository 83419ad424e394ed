"""How a sequence is split across the P ranks of a sequence-parallel group (docs/distributed.md §2).

- ``contiguous``: rank r holds tokens [r·L/P, (r+1)·L/P).
- ``zigzag``: the sequence is cut into 2P blocks; rank r holds blocks r and 2P−1−r (equal causal work).

A rank's slice is a list of *pieces* ``(global_start, length)`` in the order they are stored locally.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

Piece = Tuple[int, int]


def check_sequence_length(seq_len: int, sp: int, segment_len: int, layout: str) -> None:
    """Raise ValueError unless L is a multiple of P·C (contiguous) or 2P·C (zigzag)."""
    if layout not in ("contiguous", "zigzag"):
        raise ValueError(f"layout = {layout!r}; expected 'contiguous' or 'zigzag'")
    unit = (2 if layout == "zigzag" else 1) * sp * segment_len
    if seq_len <= 0 or seq_len % unit != 0:
        factor = "2·P·C" if layout == "zigzag" else "P·C"
        raise ValueError(f"sequence length L = {seq_len} must be a positive multiple of {factor} = {unit} "
                         f"(P = {sp} ranks, C = segment_len {segment_len}, layout {layout!r})")


def rank_pieces(seq_len: int, sp: int, rank: int, layout: str) -> List[Piece]:
    """The pieces (global_start, length) rank ``rank`` holds, in local storage order."""
    if not 0 <= rank < sp:
        raise ValueError(f"rank = {rank} is outside the sequence-parallel group of size {sp}")
    if layout == "contiguous":
        size = seq_len // sp
        return [(rank * size, size)]
    if layout == "zigzag":
        size = seq_len // (2 * sp)
        return [(rank * size, size), ((2 * sp - 1 - rank) * size, size)]
    raise ValueError(f"layout = {layout!r}; expected 'contiguous' or 'zigzag'")


def last_piece_owner(seq_len: int, sp: int, layout: str) -> int:
    """The rank holding a sharded sequence's last piece (it is last in that rank's local order)."""
    return next(rank for rank in range(sp) if any(start + length == seq_len
                                                  for start, length in rank_pieces(seq_len, sp, rank, layout)))


def shard_sequence(x: torch.Tensor, sp: int, rank: int, layout: str, *, dim: int = 1) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (the full sequence there)."""
    pieces = rank_pieces(x.shape[dim], sp, rank, layout)
    return torch.cat([x.narrow(dim, start, length) for start, length in pieces], dim=dim)


def unshard_sequence(slices: List[torch.Tensor], layout: str, *, dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence``: the full sequence from every rank's slice (in rank order)."""
    sp = len(slices)
    seq_len = sum(s.shape[dim] for s in slices)
    placed = []
    for rank, local in enumerate(slices):
        offset = 0
        for start, length in rank_pieces(seq_len, sp, rank, layout):
            placed.append((start, local.narrow(dim, offset, length)))
            offset += length
    return torch.cat([piece for _, piece in sorted(placed, key=lambda item: item[0])], dim=dim)
