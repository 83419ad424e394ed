"""Multi-query associative recall (MQAR), the synthetic recall task of the Zoology benchmark.

Layout of one sequence of length ``T`` with ``n`` key-value pairs (positions are 0-based)::

    position  0          BOS
    positions 1 .. 2n    k_1 v_1 k_2 v_2 ... k_n v_n       the pairs to remember
    position  2n + 1     SEP
    positions 2n + 2 ..  the query region: every key k_i appears exactly once more, at a random position p,
                         followed by its value at p + 1; every other position holds a filler token

* Ids ``0 .. NUM_SPECIAL - 1`` are special (``PAD_ID``, ``BOS_ID``, ``SEP_ID``, one reserved).
* Keys come from the lower half of the remaining ids, values from the upper half, so no id is both.
  The ``n`` keys of a sequence are distinct; values are drawn independently (they may repeat).
* Filler tokens are drawn uniformly from every non-special id except the sequence's own keys, so a key
  appears in the query region only where it is queried and the answer to every query is unambiguous.
* ``labels[b, p] = v_i`` at the position ``p`` of each query key k_i (the model reads k_i at p and must
  predict the next token, its value); every other label is ``-100``. Labels are aligned with the inputs:
  ``logits[:, p]`` is scored against ``labels[:, p]`` with no further shift.

The query region is cut into slots of two positions; each query takes one slot chosen uniformly at random,
so queries never overlap and their order is random. Everything is drawn from the given ``torch.Generator``,
so a seed fixes the batch exactly.
"""

from __future__ import annotations

import torch

PAD_ID = 0
BOS_ID = 1
SEP_ID = 2
NUM_SPECIAL = 4  # ids 0..3; id 3 is reserved
IGNORE_INDEX = -100


def mqar_min_seq_len(num_kv_pairs: int) -> int:
    """The shortest sequence that holds ``num_kv_pairs`` pairs and their queries: ``4 * num_kv_pairs + 2``."""
    return 4 * num_kv_pairs + 2


def check_mqar_sizes(caller: str, seq_len: int, num_kv_pairs: int, vocab_size: int) -> tuple[int, int]:
    """(key ids, value ids) of the vocabulary; raises ValueError, naming ``caller``, when the sequence or the
    vocabulary cannot hold ``num_kv_pairs`` pairs and their queries."""
    if seq_len < mqar_min_seq_len(num_kv_pairs):
        raise ValueError(
            f"{caller}: seq_len = {seq_len} is too short for num_kv_pairs = {num_kv_pairs}; expected "
            f"seq_len >= 4 * num_kv_pairs + 2 = {mqar_min_seq_len(num_kv_pairs)}")
    num_key_ids = (vocab_size - NUM_SPECIAL) // 2
    num_value_ids = vocab_size - NUM_SPECIAL - num_key_ids
    if num_key_ids < num_kv_pairs or num_value_ids < 1:
        raise ValueError(
            f"{caller}: vocab_size = {vocab_size} is too small for num_kv_pairs = {num_kv_pairs}; expected "
            f"vocab_size >= {NUM_SPECIAL + 2 * num_kv_pairs} ({NUM_SPECIAL} special ids, then disjoint halves for "
            "keys and values)")
    return num_key_ids, num_value_ids


def make_mqar_batch(
    batch_size: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one batch of MQAR sequences (layout in the module docstring).

    Args:
        batch_size: number of sequences B.
        seq_len: tokens per sequence T, at least ``4 * num_kv_pairs + 2``.
        num_kv_pairs: key-value pairs per sequence n (every one is queried once).
        vocab_size: size of the model's vocabulary V; needs ``(V - NUM_SPECIAL) // 2 >= n`` distinct keys.
        generator: a CPU ``torch.Generator``; the batch is a function of its state.

    Returns:
        ``(input_ids, labels)``, both ``[B, T]`` int64 on the CPU. ``labels`` is ``-100`` except at the
        ``n`` query-key positions of each row, where it holds the value to predict.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_kv_pairs", num_kv_pairs),
                        ("vocab_size", vocab_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"make_mqar_batch: {name} = {value!r} is invalid; expected a positive integer")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"make_mqar_batch: generator must be a torch.Generator, got {type(generator).__name__}")
    num_key_ids, num_value_ids = check_mqar_sizes("make_mqar_batch", seq_len, num_kv_pairs, vocab_size)

    B, T, n = batch_size, seq_len, num_kv_pairs
    first_value_id = NUM_SPECIAL + num_key_ids

    # distinct keys per row: the first n of a random permutation of the key ids
    keys = torch.rand(B, num_key_ids, generator=generator).argsort(dim=1)[:, :n] + NUM_SPECIAL  # [B, n]
    values = torch.randint(0, num_value_ids, (B, n), generator=generator) + first_value_id  # [B, n]

    # filler: any non-special id but this row's keys; the allowed ids are sorted to the front of `order`
    num_regular = vocab_size - NUM_SPECIAL
    is_key = torch.zeros(B, num_regular, dtype=torch.int8)
    is_key.scatter_(1, keys - NUM_SPECIAL, 1)  # [B, V - S]
    order = torch.sort(is_key, dim=1, stable=True).indices + NUM_SPECIAL  # [B, V - S]
    num_allowed = num_regular - n
    pick = torch.randint(0, num_allowed, (B, T), generator=generator)  # [B, T]
    input_ids = order.gather(1, pick)  # [B, T]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)

    input_ids[:, 0] = BOS_ID
    input_ids[:, 1:2 * n + 1:2] = keys
    input_ids[:, 2:2 * n + 2:2] = values
    input_ids[:, 2 * n + 1] = SEP_ID

    query_start = 2 * n + 2
    num_slots = (T - query_start) // 2
    slots = torch.rand(B, num_slots, generator=generator).argsort(dim=1)[:, :n]  # [B, n]
    key_positions = query_start + 2 * slots  # [B, n]
    input_ids.scatter_(1, key_positions, keys)
    input_ids.scatter_(1, key_positions + 1, values)
    labels.scatter_(1, key_positions, values)
    return input_ids, labels


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled positions whose arg-max prediction equals the label.

    Args:
        logits: ``[B, T, V]`` scores, aligned with ``labels`` (no shift).
        labels: ``[B, T]`` int64, ``-100`` where nothing is asked.

    Returns:
        Accuracy in [0, 1] over the positions with a label.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"mqar_accuracy: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
                         "match; expected logits [B, T, V] and labels [B, T]")
    mask = labels != IGNORE_INDEX  # [B, T]
    count = int(mask.sum())
    if count == 0:
        raise ValueError("mqar_accuracy: labels hold no position to score (all are -100)")
    predictions = logits.argmax(dim=-1)  # [B, T]
    return float((predictions[mask] == labels[mask]).sum()) / count
