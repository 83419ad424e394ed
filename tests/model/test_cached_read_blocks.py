"""The blocked chunked read of cached states (mcdist.ops.cached_read_chunked) against the token loop.

The chunked read takes the visible states READ_BLOCK_STATES at a time and merges the blocks' partials; linear
states have a hand-written backward. Every case compares outputs and the gradients of z, u, states and
contexts, with a nonzero upstream gradient on lse too, against ``cached_read_reference`` in float64.
"""

import pytest
import torch

from mcdist.ops import cached_read_chunked, cached_read_reference, mlp_read, residual_read_chunked
from mcdist.ops.cached_read import chunked as chunked_read
from checks import assert_rel_close

TOLERANCE = 1e-10


def make_inputs(seed, *, batch=1, tokens=23, heads=2, din=5, dout=7, dc=4, n_states=9, hidden=None):
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    z, u = draw(batch, tokens, heads, din), draw(batch, tokens, heads, dc)
    if hidden is None:
        states = draw(batch, n_states, heads, dout, din) / din ** 0.5
    else:
        states = (draw(batch, n_states, heads, hidden, din) / din ** 0.5,
                  draw(batch, n_states, heads, din, hidden) / hidden ** 0.5)
    contexts = draw(batch, n_states, heads, dc)
    return z, u, states, contexts


def leaves_of(z, u, states, contexts):
    flat = [z, u, *(states if isinstance(states, tuple) else (states,)), contexts]
    return [x.clone().requires_grad_() for x in flat]


def as_call(leaves, deep):
    if deep:
        return leaves[0], leaves[1], (leaves[2], leaves[3]), leaves[4]
    return leaves[0], leaves[1], leaves[2], leaves[3]


def read_with_grads(read, inputs, deep, kwargs, seed=99):
    """(out, lse, grads of every input) for loss = Σ g_out·out + Σ g_lse·lse over the tokens that see a state."""
    leaves = leaves_of(*inputs)
    out, lse = read(*as_call(leaves, deep), **kwargs)
    generator = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=generator, dtype=torch.float64).to(lse.dtype)
    seen = torch.isfinite(lse)
    loss = (out * g_out).sum() + torch.where(seen, lse * g_lse, torch.zeros_like(lse)).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def assert_matches_reference(inputs, deep, **kwargs):
    out, lse, grads = read_with_grads(cached_read_chunked, inputs, deep, kwargs)
    ref_out, ref_lse, ref_grads = read_with_grads(cached_read_reference, inputs, deep, kwargs)
    seen = torch.isfinite(ref_lse)
    assert seen.any(), "no token sees a state: the case tests nothing"
    assert torch.equal(torch.isfinite(lse), seen), "lse is −inf exactly where the reference sees nothing"
    assert torch.all(lse[~seen] == float("-inf")) and torch.all(out[~seen] == 0)
    assert_rel_close(out, ref_out, TOLERANCE, "out")
    assert_rel_close(lse[seen], ref_lse[seen], TOLERANCE, "lse")
    names = ["z", "u", "w1", "w2", "contexts"] if deep else ["z", "u", "states", "contexts"]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert rg.norm() > 0, f"the reference gradient of {name} is zero: the case tests nothing"
        assert_rel_close(g, rg, TOLERANCE, f"d{name}")


@pytest.fixture
def block_of_three(monkeypatch):
    monkeypatch.setattr(chunked_read, "READ_BLOCK_STATES", 3)


# segment_len 2, query_offset 3, segment_offset 1: token t sees states j < (t + 3) // 2 − 1, i.e. 0 to 9 of the
# 9 states (so 0, 1, 2 = one partial block, 3 = one full block, 4 to 9 = two and three blocks of 3).
OFFSETS = dict(segment_len=2, gate_scale=0.7, query_offset=3, segment_offset=1)


@pytest.mark.parametrize("deep", [False, True], ids=["linear", "deep"])
def test_blocks_below_at_and_above_the_block_size(block_of_three, deep):
    inputs = make_inputs(1, hidden=6 if deep else None)
    visible = {max(0, min(9, (t + 3) // 2 - 1)) for t in range(23)}
    assert {0, 2, 3, 4, 6, 7, 9} <= visible
    assert_matches_reference(inputs, deep, **OFFSETS)


@pytest.mark.parametrize("deep", [False, True], ids=["linear", "deep"])
def test_selected_states(block_of_three, deep):
    inputs = make_inputs(2, hidden=6 if deep else None)
    generator = torch.Generator().manual_seed(3)
    # indices from −1 (empty) up to past the last state: invisible and unknown indices must be ignored
    selected = torch.randint(-1, 12, (1, 23, 2, 3), generator=generator)
    assert_matches_reference(inputs, deep, selected=selected, **OFFSETS)


def test_selection_that_leaves_a_token_nothing(block_of_three):
    """Tokens whose selected segments are all invisible get out 0 and lse −inf, with finite gradients."""
    inputs = make_inputs(4)
    selected = torch.full((1, 23, 2, 2), -1, dtype=torch.int64)
    selected[:, ::2, :, 0] = 1  # every other token selects global segment 1 only
    assert_matches_reference(inputs, False, selected=selected, **OFFSETS)


@pytest.mark.parametrize("deep", [False, True], ids=["linear", "deep"])
def test_default_block_size(deep):
    """With the module's block size: up to 2 blocks and more, and Dout ≠ Din for linear states."""
    block = chunked_read.READ_BLOCK_STATES
    n_states = block + 5
    inputs = make_inputs(5, tokens=2 * n_states + 3, heads=1, n_states=n_states, hidden=4 if deep else None,
                         din=3, dout=4, dc=3)
    assert_matches_reference(inputs, deep, segment_len=2, gate_scale=0.5, query_offset=1, segment_offset=0)


def test_batch_and_query_runs_shorter_than_a_segment(block_of_three):
    """B = 2 and a query offset inside a segment, so the first and last runs of tokens are partial segments."""
    inputs = make_inputs(6, batch=2, tokens=31, n_states=6)
    assert_matches_reference(inputs, False, segment_len=4, gate_scale=1.1, query_offset=6, segment_offset=0)


def test_float32_against_the_float64_reference(block_of_three):
    inputs = make_inputs(7)
    kwargs = dict(OFFSETS)
    out, lse, grads = read_with_grads(cached_read_chunked, [x.float() for x in inputs], False, kwargs)
    ref_out, ref_lse, ref_grads = read_with_grads(cached_read_reference, inputs, False, kwargs)
    assert out.dtype == torch.float32
    seen = torch.isfinite(ref_lse)
    assert_rel_close(out, ref_out, 1e-5, "out")
    assert_rel_close(lse[seen], ref_lse[seen], 1e-5, "lse")
    assert_rel_close(grads, ref_grads, 1e-5, "gradients")


@pytest.mark.parametrize("deep", [False, True], ids=["linear", "deep"])
def test_backward_stores_nothing_of_size_tokens_times_states(block_of_three, deep):
    """The autograd graph keeps O(T · D) tensors (inputs, out, lse), never a [T, n, D] read of every state."""
    inputs = make_inputs(8, tokens=40, n_states=18, hidden=6 if deep else None)
    leaves = leaves_of(*inputs)
    largest_input = max(x.numel() for x in leaves)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, lse = cached_read_chunked(*as_call(leaves, deep), **OFFSETS)
        (out.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()).backward()
    assert saved, "nothing was saved: the hook did not see the read"
    # one token's read of every visible state would be 40 · 18 · 2 · 7 elements; a [T, H, D] tensor is 40 · 2 · 7
    assert max(saved) <= max(largest_input, out.numel())


def test_deep_residual_read_is_the_sum_of_mlp_reads(block_of_three):
    """residual_read_chunked on deep states: Σ over visible j of M_j(z_t), checked with a token loop."""
    z, _, (w1, w2), _ = make_inputs(9, tokens=13, hidden=6)
    leaves = [x.clone().requires_grad_() for x in (z, w1, w2)]
    out = residual_read_chunked(leaves[0], (leaves[1], leaves[2]), segment_len=2, query_offset=3, segment_offset=1)
    expected = torch.zeros_like(z)
    for t in range(z.shape[1]):
        for j in range(max(0, (t + 3) // 2 - 1)):
            expected[:, t] += mlp_read(z[:, t], w1[:, j], w2[:, j])
    assert_rel_close(out, expected, TOLERANCE, "out")
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (z, w1, w2)]
    total = sum((mlp_read(ref_leaves[0][:, t], ref_leaves[1][:, j], ref_leaves[2][:, j]) * upstream[:, t]).sum()
                for t in range(z.shape[1]) for j in range(max(0, (t + 3) // 2 - 1)))
    assert_rel_close(grads, torch.autograd.grad(total, ref_leaves), TOLERANCE, "gradients of z, w1, w2")
