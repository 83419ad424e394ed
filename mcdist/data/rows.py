"""Synthetic rows drawn piece by piece: a rank draws only the tokens of its own slice of a sequence.

``make_mqar_batch`` and ``make_passkey_batch`` draw whole batches from one ``torch.Generator``. The trainer
instead draws each training row from its own seed and asks only for the pieces (``(start, length)`` spans of the
sequence, :func:`mcdist.parallel.layout.rank_pieces`) its sequence-parallel rank holds:

* the row's *plan* (MQAR: keys, values, query slots; passkey: digits, depth) is a handful of numbers drawn from
  a generator seeded with the row seed, in O(num_kv_pairs) or O(digits) work whatever the length;
* the filler is drawn in blocks of ``FILLER_BLOCK`` positions, block ``b`` from a generator seeded with
  ``mix_seed(row_seed, b)``: a piece draws only the blocks it overlaps;
* the planned tokens (BOS, pairs, SEP, queries, passkey, question) are written where they fall in the pieces.

So the same row seed gives the same token at a position whichever pieces are asked for (tested: the pieces of
every rank concatenated in sequence order equal the whole row), and a rank's work and memory are O(L / P).
The layouts are those of :mod:`mcdist.data.mqar` and :mod:`mcdist.data.passkey`; the draws differ from the
batch functions', so a row here is not the same sequence as a row of ``make_mqar_batch``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mcdist.data.mqar import BOS_ID, IGNORE_INDEX, NUM_SPECIAL, SEP_ID, check_mqar_sizes
from mcdist.data.passkey import FIRST_DIGIT_ID, FIRST_FILLER_ID, PASSKEY_DIGITS, QUERY_ID, check_passkey_sizes

FILLER_BLOCK = 65536
_MASK64 = (1 << 64) - 1

Pieces = Sequence[tuple[int, int]]


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers: splitmix64 folded over them, so nearby inputs decorrelate."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state & ((1 << 63) - 1)


def _check_pieces(pieces: Optional[Pieces], seq_len: int) -> list[tuple[int, int]]:
    if pieces is None:
        return [(0, seq_len)]
    checked = []
    for piece in pieces:
        start, length = piece
        if not (isinstance(start, int) and isinstance(length, int) and 0 <= start and length > 0
                and start + length <= seq_len):
            raise ValueError(f"piece {piece!r} is invalid; expected (start, length) with length > 0 inside "
                             f"[0, seq_len = {seq_len})")
        checked.append((start, length))
    return checked


def _filler(row_seed: int, start: int, length: int, low: int, high: int) -> torch.Tensor:
    """Uniform ids in [low, high) for positions [start, start + length), block by block."""
    parts = []
    position, stop = start, start + length
    while position < stop:
        block = position // FILLER_BLOCK
        generator = torch.Generator().manual_seed(mix_seed(row_seed, 1, block))
        values = torch.randint(low, high, (FILLER_BLOCK,), generator=generator)
        first = position - block * FILLER_BLOCK
        take = min(stop, (block + 1) * FILLER_BLOCK) - position
        parts.append(values[first:first + take])
        position += take
    return torch.cat(parts)


def _place(pieces, ids_parts, label_parts, positions: torch.Tensor, tokens: torch.Tensor,
           labels: Optional[torch.Tensor] = None) -> None:
    """Write ``tokens`` (and ``labels``) at the global ``positions`` that fall inside the pieces."""
    for (start, length), ids, out_labels in zip(pieces, ids_parts, label_parts):
        inside = (positions >= start) & (positions < start + length)
        local = positions[inside] - start
        ids[local] = tokens[inside]
        if labels is not None:
            out_labels[local] = labels[inside]


def _distinct(generator: torch.Generator, count: int, population: int) -> torch.Tensor:
    """``count`` distinct integers of [0, population) in random order, in O(count) work for a large population."""
    if population <= 64 * count:
        return torch.randperm(population, generator=generator)[:count]
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < count:
        for value in torch.randint(0, population, (2 * count,), generator=generator).tolist():
            if value not in seen:
                seen.add(value)
                chosen.append(value)
                if len(chosen) == count:
                    break
    return torch.tensor(chosen, dtype=torch.int64)


def mqar_row(row_seed: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
             pieces: Optional[Pieces] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pieces of one MQAR row (layout of :mod:`mcdist.data.mqar`), concatenated in the order given.

    Args:
        row_seed: the row's seed (the trainer uses ``sample_seed(seed, split, index)``).
        seq_len, num_kv_pairs, vocab_size: as for ``make_mqar_batch``.
        pieces: ``(start, length)`` spans to draw; ``None`` = the whole row.
    Returns:
        ``(input_ids, labels)``, int64 ``[sum of lengths]`` each.
    """
    num_key_ids, num_value_ids = check_mqar_sizes("mqar_row", seq_len, num_kv_pairs, vocab_size)
    pieces = _check_pieces(pieces, seq_len)
    n = num_kv_pairs
    generator = torch.Generator().manual_seed(mix_seed(row_seed, 0))
    keys = torch.randperm(num_key_ids, generator=generator)[:n] + NUM_SPECIAL  # [n] distinct
    values = torch.randint(0, num_value_ids, (n,), generator=generator) + NUM_SPECIAL + num_key_ids
    query_start = 2 * n + 2
    slots = _distinct(generator, n, (seq_len - query_start) // 2)
    key_positions = query_start + 2 * slots  # [n]

    # filler: non-special ids except this row's keys, as a uniform index into the allowed ids
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[:NUM_SPECIAL] = False
    allowed[keys] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    ids_parts = [allowed_ids[_filler(row_seed, start, length, 0, len(allowed_ids))] for start, length in pieces]
    label_parts = [torch.full((length,), IGNORE_INDEX, dtype=torch.int64) for _, length in pieces]

    fixed = torch.cat([torch.tensor([0]), torch.arange(1, 2 * n + 1), torch.tensor([2 * n + 1]),
                       key_positions, key_positions + 1])
    tokens = torch.cat([torch.tensor([BOS_ID]), torch.stack([keys, values], 1).reshape(-1), torch.tensor([SEP_ID]),
                        keys, values])
    _place(pieces, ids_parts, label_parts, fixed, tokens)
    _place(pieces, ids_parts, label_parts, key_positions, keys, values)
    return torch.cat(ids_parts), torch.cat(label_parts)


def passkey_row(row_seed: int, seq_len: int, vocab_size: int, pieces: Optional[Pieces] = None, *,
                digits: int = PASSKEY_DIGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """The pieces of one passkey row (layout of :mod:`mcdist.data.passkey`, depth uniform), concatenated."""
    check_passkey_sizes("passkey_row", seq_len, vocab_size, digits)
    pieces = _check_pieces(pieces, seq_len)
    k = digits
    generator = torch.Generator().manual_seed(mix_seed(row_seed, 0))
    passkey = torch.randint(0, 10, (k,), generator=generator) + FIRST_DIGIT_ID
    last_start = seq_len - (k + 1) - (k + 2)
    start = int(torch.randint(1, last_start + 1, (1,), generator=generator))
    question = seq_len - k - 1

    ids_parts = [_filler(row_seed, s, length, FIRST_FILLER_ID, vocab_size) for s, length in pieces]
    label_parts = [torch.full((length,), IGNORE_INDEX, dtype=torch.int64) for _, length in pieces]
    fixed = torch.cat([torch.tensor([0, start]), start + torch.arange(1, k + 1), torch.tensor([start + k + 1]),
                       torch.tensor([question]), question + torch.arange(1, k + 1)])
    tokens = torch.cat([torch.tensor([BOS_ID, SEP_ID]), passkey, torch.tensor([SEP_ID, QUERY_ID]), passkey])
    _place(pieces, ids_parts, label_parts, fixed, tokens)
    asked = question + torch.arange(k)
    _place(pieces, ids_parts, label_parts, asked, torch.cat([torch.tensor([QUERY_ID]), passkey[:-1]]), passkey)
    return torch.cat(ids_parts), torch.cat(label_parts)
