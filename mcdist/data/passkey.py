"""Passkey retrieval at any length: find a short number hidden in a long stretch of filler and repeat it.

Layout of one sequence of length ``T`` with a passkey of ``k`` digits (0-based positions)::

    position  0                 BOS
    positions 1 .. p - 1        filler
    positions p .. p + k + 1    SEP d_1 ... d_k SEP            the passkey, at depth p
    positions .. T - k - 2      filler
    positions T - k - 1 ..      QUERY d_1 ... d_k              the question and the answer

* Ids ``0 .. NUM_SPECIAL - 1`` are the special ids of :mod:`mcdist.data.mqar` (``QUERY_ID`` is its reserved
  id 3); digits are ids ``FIRST_DIGIT_ID .. FIRST_DIGIT_ID + 9``; filler ids are every id from
  ``FIRST_FILLER_ID`` on, drawn uniformly, so filler never looks like a digit or a marker.
* Labels are aligned with the inputs as in MQAR (``logits[:, j]`` is scored against ``labels[:, j]``): the
  QUERY position is labelled ``d_1``, the position of ``d_i`` in the answer is labelled ``d_{i+1}``, so the
  ``k`` labelled positions ask for the ``k`` digits; every other label is ``-100``.
* The depth ``p`` is uniform over every position where the passkey fits, or set by ``depth`` in [0, 1]
  (0 = right after BOS, 1 = right before the question) for depth sweeps.

Everything is drawn from the given ``torch.Generator``: a seed fixes the batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from mcdist.data.mqar import BOS_ID, IGNORE_INDEX, NUM_SPECIAL, SEP_ID

QUERY_ID = 3
FIRST_DIGIT_ID = NUM_SPECIAL
FIRST_FILLER_ID = FIRST_DIGIT_ID + 10
PASSKEY_DIGITS = 5


def passkey_min_seq_len(digits: int = PASSKEY_DIGITS) -> int:
    """The shortest sequence that holds a ``digits``-digit passkey and its question: ``2·digits + 4``."""
    return 2 * digits + 4


def passkey_min_vocab_size() -> int:
    """Specials, ten digits and at least two filler ids."""
    return FIRST_FILLER_ID + 2


def check_passkey_sizes(caller: str, seq_len: int, vocab_size: int, digits: int) -> None:
    """Raise ValueError, naming ``caller``, when a sequence or the vocabulary cannot hold the task."""
    if seq_len < passkey_min_seq_len(digits):
        raise ValueError(f"{caller}: seq_len = {seq_len} is too short for a {digits}-digit passkey; "
                         f"expected seq_len >= 2 * digits + 4 = {passkey_min_seq_len(digits)}")
    if vocab_size < passkey_min_vocab_size():
        raise ValueError(f"{caller}: vocab_size = {vocab_size} is too small; expected at least "
                         f"{passkey_min_vocab_size()} (specials, ten digits, two filler ids)")


def make_passkey_batch(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator,
    *,
    digits: int = PASSKEY_DIGITS,
    depth: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one batch of passkey-retrieval sequences (layout in the module docstring).

    Args:
        batch_size: number of sequences B.
        seq_len: tokens per sequence T, at least ``2·digits + 4``.
        vocab_size: the model's vocabulary V, at least ``FIRST_FILLER_ID + 2``.
        generator: a CPU ``torch.Generator``.
        digits: length of the passkey k.
        depth: where the passkey sits, in [0, 1]; ``None`` draws it uniformly per sequence.

    Returns:
        ``(input_ids, labels)``, both ``[B, T]`` int64 on the CPU; ``labels`` holds the ``k`` digits to
        predict (at the QUERY position and the first ``k - 1`` answer digits) and ``-100`` elsewhere.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"make_passkey_batch: batch_size = {batch_size!r} is invalid; expected a positive integer")
    if not isinstance(digits, int) or digits <= 0:
        raise ValueError(f"make_passkey_batch: digits = {digits!r} is invalid; expected a positive integer")
    check_passkey_sizes("make_passkey_batch", seq_len, vocab_size, digits)
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_passkey_batch: depth = {depth!r} is invalid; expected a number in [0, 1] or None")

    B, T, k = batch_size, seq_len, digits
    input_ids = torch.randint(FIRST_FILLER_ID, vocab_size, (B, T), generator=generator)  # [B, T]
    passkey = torch.randint(0, 10, (B, k), generator=generator) + FIRST_DIGIT_ID  # [B, k]
    last_start = T - (k + 1) - (k + 2)  # the latest p whose SEP ... SEP ends before the question
    if depth is None:
        starts = torch.randint(1, last_start + 1, (B,), generator=generator)  # [B]
    else:
        starts = torch.full((B,), 1 + round(depth * (last_start - 1)), dtype=torch.int64)
    rows = torch.arange(B).unsqueeze(1)  # [B, 1]
    offsets = starts.unsqueeze(1) + torch.arange(1, k + 1)  # [B, k]

    input_ids[:, 0] = BOS_ID
    input_ids[rows[:, 0], starts] = SEP_ID
    input_ids[rows, offsets] = passkey
    input_ids[rows[:, 0], starts + k + 1] = SEP_ID
    question = T - k - 1
    input_ids[:, question] = QUERY_ID
    input_ids[:, question + 1:] = passkey

    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    labels[:, question:question + k] = passkey
    return input_ids, labels
