"""Packed documents: several documents in one sequence, each computed exactly as if alone (docs/packing.md).

The convention is flash-linear-attention's varlen API: a batch of one sequence ``[1, T]`` and ``cu_seqlens``, the
int32/int64 cumulative document starts and the total length, ``[0, end_0, end_1, ..., T]`` (or, equivalently, a
document id per token). A token must not read memory written by another document: its memory, momentum, segments,
running context and short convolution all restart at its document's first token.

mcdist's models are causal, so a document's outputs depend on its own tokens only once it starts from the
model's initial state; :func:`run_documents` therefore computes a packed sequence as a *batch of its documents*,
each from its own first token, right-padded to the longest of its bucket (padding after a document's end cannot
reach back into it), and gathers the real positions back into the packed order. Every memory kind, aggregation,
``state_init`` and implementation (token loop, chunked, Triton) runs unchanged, and the result equals each
document run alone. Documents are bucketed by length (powers of two) so padding costs at most 2× a bucket's real
tokens.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch


def check_cu_seqlens(cu_seqlens, total: int) -> torch.Tensor:
    """``cu_seqlens`` as an int64 CPU tensor, checked: 1-D, starts at 0, strictly increasing, ends at ``total``.
    Raises ValueError naming what is wrong."""
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor [n_docs + 1]; got dtype {cu_seqlens.dtype}, "
                         f"shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {total}; got "
                         f"{int(cu[0])} … {int(cu[-1])}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError("cu_seqlens must be strictly increasing (no empty document); got "
                         f"{cu.tolist()[:12]}{' …' if cu.numel() > 12 else ''}")
    return cu


def cu_seqlens_of_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """The cu_seqlens of a document id per token ([T] or [1, T]): a document starts wherever the id changes."""
    ids = document_ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("document_ids is empty")
    starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    return torch.cat([starts.new_zeros(1), starts, starts.new_tensor([ids.numel()])]).to(torch.int64).cpu()


def documents_of(cu_seqlens=None, document_ids: Optional[torch.Tensor] = None):
    """The one way a caller gave the documents: ``cu_seqlens``, or ``document_ids`` (converted), or neither."""
    if document_ids is None:
        return cu_seqlens
    if cu_seqlens is not None:
        raise ValueError("give cu_seqlens or document_ids, not both")
    return cu_seqlens_of_ids(document_ids)


def cu_seqlens_of_rows(batch: int, seq_len: int, row_cu_seqlens: Optional[List[torch.Tensor]] = None):
    """The cu_seqlens of the rows of a [B, T] batch laid end to end as one sequence [1, B·T]: every row starts a
    document, and within a row the documents of ``row_cu_seqlens[b]`` (each row's own, [0, …, T]) when given."""
    parts = []
    for row in range(batch):
        inner = torch.tensor([0, seq_len]) if row_cu_seqlens is None else check_cu_seqlens(row_cu_seqlens[row],
                                                                                           seq_len)
        parts.append(inner[:-1] + row * seq_len)
    return torch.cat(parts + [torch.tensor([batch * seq_len])]).to(torch.int64)


def length_class(length: int) -> int:
    """A document's length class, ⌈log2 length⌉: documents of one class are padded to the longest of them."""
    return (length - 1).bit_length()


def buckets(lengths: List[int], indices: Optional[List[int]] = None) -> List[List[int]]:
    """Document indices (of ``indices``, default all) grouped by length class, longest class first, each in
    document order."""
    groups: dict = {}
    for index in (range(len(lengths)) if indices is None else indices):
        groups.setdefault(length_class(lengths[index]), []).append(index)
    return [groups[key] for key in sorted(groups, reverse=True)]


def local_document_limit(total: int, ranks: int, unit: int) -> int:
    """Under sequence parallelism, the longest document computed whole on one rank of the group (docs/packing.md):
    the layout's unit (what a sharded document is padded to a multiple of) or half a rank's fair share of the
    packed sequence, whichever is larger."""
    return max(unit, total // (2 * ranks))


def document_owners(lengths: List[int], ranks: int, limit: int) -> List[int]:
    """For each document, the rank of the sequence-parallel group that computes it whole (its length is at most
    ``limit``), or −1 (longer: sharded over the group as any sequence). The whole documents are dealt out longest
    first, each to the rank with the fewest tokens so far (ties: the lower rank): the same on every rank, and
    no rank holds more than the mean plus the longest whole document. When every document is short but there are fewer than
    ``ranks`` of them, all are sharded, so that every rank computes something."""
    short = sorted((i for i, length in enumerate(lengths) if length <= limit), key=lambda i: (-lengths[i], i))
    owners = [-1] * len(lengths)
    if len(short) == len(lengths) and len(short) < ranks:
        return owners
    load = [0] * ranks
    for i in short:
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += lengths[i]
    return owners


def padded_documents(x: torch.Tensor, starts: List[int], lengths: List[int], group: List[int], width: int,
                     pad_value=0) -> torch.Tensor:
    """The documents ``group`` of the packed sequence ``x`` [T, ...] as a batch [len(group), width, ...], each from
    its first token, right-padded with ``pad_value`` to ``width`` (at least the longest of them)."""
    rows = []
    for i in group:
        row = x[starts[i]:starts[i] + lengths[i]]
        if lengths[i] < width:
            row = torch.cat([row, row.new_full((width - lengths[i], *row.shape[1:]), pad_value)])
        rows.append(row)
    return torch.stack(rows)


def run_documents(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cu_seqlens,
                  pad_value=0) -> torch.Tensor:
    """``fn`` over each document of the packed sequence ``x`` [1, T, ...] alone; returns [1, T, ...] in the
    packed order. ``fn`` maps a batch [n, L, ...] to [n, L, ...] causally (position t of a row depends on
    positions ≤ t of that row only), e.g. the model's blocks or one layer. ``pad_value`` fills the padding after
    each document (a token id for ids, 0 for features): it is computed and dropped."""
    if x.shape[0] != 1:
        raise ValueError(f"packed documents take a batch of one sequence [1, T] (the varlen convention); got "
                         f"batch {x.shape[0]}: lay the rows end to end (mcdist.packing.cu_seqlens_of_rows)")
    cu = check_cu_seqlens(cu_seqlens, x.shape[1])
    starts, lengths = cu[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()
    if len(lengths) == 1:
        return fn(x)
    pieces: List[Optional[torch.Tensor]] = [None] * len(lengths)
    for group in buckets(lengths):
        out = fn(padded_documents(x[0], starts, lengths, group, max(lengths[i] for i in group), pad_value))
        for j, i in enumerate(group):
            pieces[i] = out[j, :lengths[i]]
    return torch.cat(pieces)[None]


def labels_at(labels: torch.Tensor, index: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels`` [T] at the packed positions ``index`` [N] (a share's, :meth:`MCLanguageModel.document_share`),
    ``ignore_index`` where ``index`` is −1 (padding)."""
    picked = labels[index.clamp(min=0)]
    return torch.where(index >= 0, picked, picked.new_full((), ignore_index))
