import pytest
import torch

from mcdist.data.mqar import (BOS_ID, IGNORE_INDEX, NUM_SPECIAL, SEP_ID, make_mqar_batch, mqar_accuracy,
                              mqar_min_seq_len)


def _batch(seed=0, B=5, T=71, n=6, V=97):
    return make_mqar_batch(B, T, n, V, torch.Generator().manual_seed(seed))


def test_layout_and_labels():
    B, T, n, V = 5, 71, 6, 97
    input_ids, labels = _batch(B=B, T=T, n=n, V=V)
    assert input_ids.shape == labels.shape == (B, T)
    assert input_ids.dtype == labels.dtype == torch.int64
    assert bool((input_ids >= 0).all()) and bool((input_ids < V).all())
    num_key_ids = (V - NUM_SPECIAL) // 2
    first_value = NUM_SPECIAL + num_key_ids
    for b in range(B):
        row, lab = input_ids[b].tolist(), labels[b].tolist()
        assert row[0] == BOS_ID and row[2 * n + 1] == SEP_ID
        keys, values = row[1:2 * n + 1:2], row[2:2 * n + 2:2]
        assert len(set(keys)) == n
        assert all(NUM_SPECIAL <= k < first_value for k in keys)
        assert all(first_value <= v < V for v in values)
        answer = dict(zip(keys, values))
        query_positions = [p for p in range(T) if lab[p] != IGNORE_INDEX]
        assert len(query_positions) == n
        assert min(query_positions) >= 2 * n + 2
        assert sorted(row[p] for p in query_positions) == sorted(keys)
        for p in query_positions:
            assert lab[p] == answer[row[p]]
            assert row[p + 1] == answer[row[p]]  # the value follows its query key
        # outside the pair region and the queries, no key of this row appears
        for p in range(2 * n + 2, T):
            if p not in query_positions:
                assert row[p] not in answer
        assert all(row[p] >= NUM_SPECIAL for p in range(2 * n + 2, T))


def test_deterministic_given_generator():
    a = _batch(seed=3)
    b = _batch(seed=3)
    c = _batch(seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_queries_spread_over_the_sequence():
    input_ids, labels = make_mqar_batch(64, 256, 8, 256, torch.Generator().manual_seed(1))
    positions = (labels != IGNORE_INDEX).nonzero()[:, 1].float()
    assert positions.min() < 64 and positions.max() > 192


def test_minimum_length_fits_exactly():
    n = 5
    T = mqar_min_seq_len(n)
    input_ids, labels = make_mqar_batch(3, T, n, 64, torch.Generator().manual_seed(0))
    assert int((labels != IGNORE_INDEX).sum()) == 3 * n


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq_len=20, num_kv_pairs=5, vocab_size=64), "seq_len = 20"),
    (dict(seq_len=64, num_kv_pairs=8, vocab_size=16), "vocab_size = 16"),
    (dict(seq_len=0, num_kv_pairs=2, vocab_size=64), "seq_len = 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_mqar_batch(2, generator=torch.Generator(), **kwargs)


def test_accuracy():
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 2, 3
    logits = torch.zeros(2, 5, 10)
    logits[0, 1, 7] = 1.0  # right
    logits[1, 3, 2] = 1.0  # right
    logits[1, 4, 5] = 1.0  # wrong
    logits[0, 0, 9] = 5.0  # unlabelled: ignored
    assert mqar_accuracy(logits, labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no position"):
        mqar_accuracy(logits, torch.full((2, 5), IGNORE_INDEX))
    with pytest.raises(ValueError, match="do not match"):
        mqar_accuracy(logits, labels[:, :4])
