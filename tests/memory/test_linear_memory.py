"""Linear memory (docs/math.md §3.1, §4): the chunked path (docs/math.md §12.1) against the token loop, in
float64: the online output, the cached states, the final state and every gradient (q, k, v, log-decay, the
incoming state) within 1e-10; and mcdist.ops.linear_memory's dispatch and argument checks."""

import pytest
import torch
import torch.nn.functional as F

from checks import assert_rel_close
from mcdist import ops

TOLERANCE = 1e-10


def make_case(seed, *, gated, with_initial, batch=2, tokens=29, heads=2, d=5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (0.5 * torch.randn(batch, tokens, heads, d, generator=g, dtype=torch.float64) for _ in range(3))
    leaves = {"q": q, "k": k, "v": v}
    if gated:  # decays mostly in (0.8, 1): states carry across chunks and segments
        leaves["log_decay"] = F.logsigmoid(2.5 + torch.randn(batch, tokens, heads, generator=g, dtype=torch.float64))
    if with_initial:
        leaves["initial_state"] = 0.3 * torch.randn(batch, heads, d, d, generator=g, dtype=torch.float64)
    return {name: x.requires_grad_() for name, x in leaves.items()}


def outputs_and_gradients(function, leaves, settings, seed=7):
    result = function(leaves["q"], leaves["k"], leaves["v"], leaves.get("log_decay"),
                      initial_state=leaves.get("initial_state"), **settings)
    g = torch.Generator().manual_seed(seed)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=x.dtype)).sum() for x in result)
    return list(result), list(torch.autograd.grad(loss, list(leaves.values())))


CASES = [
    # (id, gated, state_init, with_initial, segment_len, chunk_len)
    ("linear-checkpoint", False, "checkpoint", False, 8, 4),
    ("gated-checkpoint-initial", True, "checkpoint", True, 8, 4),
    ("gated-independent", True, "independent", False, 8, 2),
    ("linear-independent-one-chunk-per-segment", False, "independent", False, 6, 6),
    ("gated-checkpoint-chunk-of-one", True, "checkpoint", True, 4, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_the_token_loop(case):
    name, gated, state_init, with_initial, segment_len, chunk_len = case
    leaves = make_case(len(name), gated=gated, with_initial=with_initial)
    settings = dict(segment_len=segment_len, chunk_len=chunk_len, state_init=state_init)
    want, want_grads = outputs_and_gradients(ops.linear_memory_reference, leaves, settings)
    got, got_grads = outputs_and_gradients(ops.linear_memory_chunked, leaves, settings)
    assert got[1].shape[1] == -(-29 // segment_len)
    assert_rel_close(got, want, TOLERANCE, "online_out, cached_states, final_state")
    assert_rel_close(got_grads, want_grads, TOLERANCE, "gradients")
    for leaf, gradient in zip(leaves, want_grads, strict=True):
        assert gradient.norm() > 0, f"the reference gradient of {leaf} is zero: the case tests nothing"


def test_dispatch_runs_the_path_asked_for():
    leaves = make_case(1, gated=True, with_initial=True)
    settings = dict(segment_len=8, chunk_len=4, state_init="checkpoint")
    for impl, function in (("reference", ops.linear_memory_reference), ("chunked", ops.linear_memory_chunked),
                           ("auto", ops.linear_memory_chunked)):  # CPU tensors: 'auto' is the chunked path
        got = ops.linear_memory(leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"],
                                initial_state=leaves["initial_state"], impl=impl, **settings)
        want = function(leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"],
                        initial_state=leaves["initial_state"], **settings)
        assert_rel_close(tuple(got), tuple(want), 0.0, impl)


def test_bad_arguments_are_named():
    leaves = make_case(2, gated=False, with_initial=False)
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    with pytest.raises(ValueError, match="chunk_len = 3 must be a positive divisor of segment_len = 8"):
        ops.linear_memory(q, k, v, segment_len=8, chunk_len=3, state_init="checkpoint", impl="chunked")
    with pytest.raises(ValueError, match="walk = 'tree'; expected one of 'sequential', 'scan'"):
        ops.linear_memory(q, k, v, segment_len=8, chunk_len=4, state_init="checkpoint", walk="tree")
    with pytest.raises(ValueError, match="state_init = 'carry'"):
        ops.linear_memory(q, k, v, segment_len=8, chunk_len=4, state_init="carry", impl="reference")
