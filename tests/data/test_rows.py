"""Synthetic rows drawn piece by piece (mcdist.data.rows): layouts, piece independence, work per rank."""

import pytest
import torch

from mcdist.config import RunConfig
from mcdist.data import rows as rows_module
from mcdist.data.mqar import BOS_ID, IGNORE_INDEX, NUM_SPECIAL, SEP_ID
from mcdist.data.passkey import FIRST_DIGIT_ID, FIRST_FILLER_ID, QUERY_ID
from mcdist.data.rows import FILLER_BLOCK, mqar_row, passkey_row
from mcdist.parallel.layout import rank_pieces, unshard_sequence
from mcdist.parallel.mesh import Mesh
from mcdist.train.data import TRAIN_SPLIT, RankData, sample_seed


def _check_mqar(row, lab, T, n, V):
    row, lab = row.tolist(), lab.tolist()
    assert len(row) == len(lab) == T and all(0 <= x < V for x in row)
    num_key_ids = (V - NUM_SPECIAL) // 2
    first_value = NUM_SPECIAL + num_key_ids
    assert row[0] == BOS_ID and row[2 * n + 1] == SEP_ID
    keys, values = row[1:2 * n + 1:2], row[2:2 * n + 2:2]
    assert len(set(keys)) == n and all(NUM_SPECIAL <= k < first_value for k in keys)
    assert all(first_value <= v < V for v in values)
    answer = dict(zip(keys, values))
    queries = [p for p in range(T) if lab[p] != IGNORE_INDEX]
    assert len(queries) == n and min(queries) >= 2 * n + 2
    assert sorted(row[p] for p in queries) == sorted(keys)
    for p in queries:
        assert lab[p] == answer[row[p]] == row[p + 1]
    assert all(row[p] not in answer and row[p] >= NUM_SPECIAL for p in range(2 * n + 2, T) if p not in queries)


@pytest.mark.parametrize("T, n, V", [(71, 6, 97), (26, 6, 40), (300, 3, 12)])
def test_mqar_row_layout_and_labels(T, n, V):
    for seed in range(6):
        _check_mqar(*mqar_row(seed, T, n, V), T, n, V)
    assert not torch.equal(mqar_row(1, T, n, V)[0], mqar_row(2, T, n, V)[0])
    assert torch.equal(mqar_row(1, T, n, V)[0], mqar_row(1, T, n, V)[0])


def test_passkey_row_layout_and_labels():
    T, V, k = 90, 30, 5
    for seed in range(6):
        ids, labels = passkey_row(seed, T, V)
        ids, labels = ids.tolist(), labels.tolist()
        assert ids[0] == BOS_ID and ids[T - k - 1] == QUERY_ID
        digits = ids[T - k:]
        assert all(FIRST_DIGIT_ID <= d < FIRST_DIGIT_ID + 10 for d in digits)
        start = ids.index(SEP_ID)
        assert ids[start + 1:start + k + 1] == digits and ids[start + k + 1] == SEP_ID and start + k + 1 < T - k - 1
        assert [x for x in labels if x != IGNORE_INDEX] == digits
        assert [p for p, x in enumerate(labels) if x != IGNORE_INDEX] == list(range(T - k - 1, T - 1))
        special = {0, start, *range(start + 1, start + k + 2), *range(T - k - 1, T)}
        assert all(FIRST_FILLER_ID <= ids[p] < V for p in range(T) if p not in special)


@pytest.mark.parametrize("sp, layout", [(2, "zigzag"), (4, "zigzag"), (3, "contiguous")])
@pytest.mark.parametrize("task", ["mqar", "passkey"])
def test_pieces_of_every_rank_make_the_whole_row(sp, layout, task):
    T = 2 * sp * (FILLER_BLOCK // 3 + 7)  # pieces cross filler blocks
    draw = (lambda seed, pieces: mqar_row(seed, T, 8, 64, pieces)) if task == "mqar" else \
        (lambda seed, pieces: passkey_row(seed, T, 64, pieces))
    whole_ids, whole_labels = draw(11, None)
    parts = [draw(11, rank_pieces(T, sp, rank, layout)) for rank in range(sp)]
    assert torch.equal(unshard_sequence([ids[None] for ids, _ in parts], layout)[0], whole_ids)
    assert torch.equal(unshard_sequence([labels[None] for _, labels in parts], layout)[0], whole_labels)
    if task == "mqar":
        _check_mqar(whole_ids, whole_labels, T, 8, 64)


def test_a_piece_draws_only_the_filler_blocks_it_overlaps(monkeypatch):
    T = 8 * FILLER_BLOCK
    drawn = []
    real = rows_module._filler

    def recording(row_seed, start, length, low, high):
        drawn.append((start, length))
        return real(row_seed, start, length, low, high)

    monkeypatch.setattr(rows_module, "_filler", recording)
    calls = []
    real_generator = torch.Generator

    class CountingGenerator(real_generator):
        def manual_seed(self, seed):
            calls.append(seed)
            return super().manual_seed(seed)

    monkeypatch.setattr(rows_module.torch, "Generator", CountingGenerator)
    pieces = rank_pieces(T, 4, 1, "zigzag")  # blocks 1 and 6
    ids, _ = mqar_row(3, T, 8, 64, pieces)
    assert ids.shape == (T // 4,)
    assert drawn == pieces
    assert len(calls) == 1 + 2  # the plan, then one generator per overlapped filler block


def test_bad_pieces_are_refused():
    with pytest.raises(ValueError, match=r"piece \(60, 8\) is invalid"):
        mqar_row(0, 64, 4, 40, [(60, 8)])
    with pytest.raises(ValueError, match="too short"):
        mqar_row(0, 17, 4, 40)
    with pytest.raises(ValueError, match="too small"):
        passkey_row(0, 64, 12)


def test_trainer_ranks_draw_their_pieces_of_the_same_rows():
    T, sp = 64, 2
    config = RunConfig().with_overrides([f"train.seq_len={T}", "train.batch_size=2", "train.num_kv_pairs=4",
                                         f"parallel.sp={sp}", "model.vocab_size=40", "model.segment_len=8",
                                         "model.chunk_len=4", "model.minibatch_len=4"])
    slices = []
    for rank in range(sp):
        data = RankData(config, Mesh(1, sp, 0, rank, None, None, tuple(range(sp))))
        slices.append(data.train_batch(step=2, micro=0))
    ids = unshard_sequence([s[0] for s in slices], "zigzag")
    labels = unshard_sequence([s[1] for s in slices], "zigzag")
    for row in range(2):
        expected = mqar_row(sample_seed(0, TRAIN_SPLIT, 2 * 2 + row), T, 4, 40)
        assert torch.equal(ids[row], expected[0]) and torch.equal(labels[row], expected[1])
