"""ssc selection (docs/math.md §6): each token's top-k closed segments by gate score, ties to the lower index."""

import pytest
import torch

from mcdist.ops import select_top_k, select_top_k_reference


@pytest.mark.parametrize("top_k", [1, 3, 8])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("query_offset", [0, 13])
def test_matches_token_loop(top_k, tied, query_offset):
    g = torch.Generator().manual_seed(7 + top_k)
    B, T, H, D, N, C = 2, 37, 3, 4, 6, 5
    u = torch.randn(B, T, H, D, generator=g)
    contexts = torch.randn(B, N, H, D, generator=g)
    if tied:  # few distinct scores: most rows hold several equal ones, also at the k-th place
        u = torch.zeros_like(u)
        u[..., 0] = 1.0
        contexts = torch.randint(-1, 2, (B, N, H, D), generator=g).float()
    got = select_top_k(u, contexts, segment_len=C, top_k=top_k, gate_scale=0.5, query_offset=query_offset,
                       token_block=16)
    torch.testing.assert_close(got, select_top_k_reference(u, contexts, segment_len=C, top_k=top_k, gate_scale=0.5,
                                                          query_offset=query_offset), rtol=0, atol=0)


def test_bf16_contexts_with_many_segments_keep_lowest_indices_on_ties():
    # 300 segments, all scores equal: the kept indices must be exactly 0..k−1 (index keys wider than bf16's
    # 8-bit mantissa must not collide).
    B, T, H, D, N, C = 1, 4, 1, 2, 300, 1
    u = torch.ones(B, T, H, D)
    contexts = torch.ones(B, N, H, D, dtype=torch.bfloat16)
    got = select_top_k(u, contexts, segment_len=C, top_k=4, gate_scale=1.0, query_offset=N)
    assert got.tolist() == [[[[0, 1, 2, 3]]] * T]


def test_no_segments_and_top_k_above_n():
    u = torch.randn(1, 3, 2, 4)
    empty = select_top_k(u, torch.zeros(1, 0, 2, 4), segment_len=2, top_k=3, gate_scale=1.0, query_offset=10)
    assert empty.shape == (1, 3, 2, 3) and (empty == -1).all()
    contexts = torch.randn(1, 2, 2, 4)
    wide = select_top_k(u, contexts, segment_len=2, top_k=5, gate_scale=1.0, query_offset=10)
    assert wide.shape == (1, 3, 2, 5) and (wide[..., 2:] == -1).all()
    assert sorted(wide[0, 0, 0, :2].tolist()) == [0, 1]
