"""Deep memory (docs/math.md §3.2, §4): the chunked path against the independent token loop
(``mcdist.ops.deep_memory.naive``: per-token losses differentiated by torch.autograd.grad, its own loop, MLP
read and update), in float64. Every case compares what each mini-batch reads, the cached states, the final state
(momenta included) and every gradient (k, v, θ, the initial weights, μ, α, the incoming state) within 1e-10.
Planted wrong update rules in the chunked path must make that comparison fail."""

import importlib

import pytest
import torch

from checks import assert_rel_close, relative_error
from mcdist import ops
from mcdist.ops.deep_memory import chunked as deep_chunked

TOLERANCE = 1e-10
D, E, H = 4, 6, 2


def make_case(seed, *, kind, state_init, batch=2, tokens=23, with_initial=False, dtype=torch.float64):
    """Inputs of a deep memory pass as leaves requiring gradients, and the pass's keyword arguments."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()

    leaves = {"k": randn(batch, tokens, H, D, scale=0.7), "v": randn(batch, tokens, H, D, scale=0.7),
              "theta": torch.sigmoid(torch.randn(batch, tokens, H, generator=g, dtype=torch.float64))
              .to(dtype).requires_grad_(),
              "w1": randn(H, E, D, scale=0.5), "w2": randn(H, D, E, scale=0.5)}
    if kind == "titans":
        leaves["momentum"] = torch.sigmoid(torch.randn(H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        leaves["decay"] = (0.2 * torch.rand(H, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    if with_initial:
        leaves["initial"] = tuple(randn(batch, *shape, scale=0.3) for shape in ((H, E, D), (H, D, E), (H, E, D),
                                                                               (H, D, E)))
    return leaves


def run(function, leaves, *, kind, state_init, segment_len=8, minibatch_len=4, inner_lr=None):
    if inner_lr is None:  # steps that move the weights well away from the start, without titans blowing up
        inner_lr = 0.5 if kind == "dla" else 0.1
    initial = leaves.get("initial")
    return function(leaves["k"], leaves["v"], leaves["theta"], kind=kind, segment_len=segment_len,
                    minibatch_len=minibatch_len, state_init=state_init, inner_lr=inner_lr,
                    init_weights=(leaves["w1"], leaves["w2"]), momentum=leaves.get("momentum"),
                    decay=leaves.get("decay"), initial_state=ops.DeepState(*initial) if initial else None)


def flat_outputs(result, q, minibatch_len):
    """Every tensor a pass returns, and the online read of q through the mini-batch weights (the layer's use)."""
    online = ops.deep_online_read(q, result.minibatch_weights, minibatch_len)
    return [*result.minibatch_weights, *result.cached_states, *result.final_state, online]


def outputs_and_gradients(function, leaves, settings, seed=99):
    """(outputs, gradients of a random linear function of all outputs with respect to every leaf)."""
    q = torch.randn(leaves["k"].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = q.to(leaves["k"].dtype)
    outputs = flat_outputs(run(function, leaves, **settings), q, settings.get("minibatch_len", 4))
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum() for x in outputs)
    inputs = [x for value in leaves.values() for x in (value if isinstance(value, tuple) else (value,))]
    gradients = torch.autograd.grad(loss, inputs, allow_unused=True)
    return outputs, [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, gradients)]


def compare(leaves, settings, tolerance=TOLERANCE):
    """Chunked against the token loop: every output and every gradient within ``tolerance``."""
    want, want_grads = outputs_and_gradients(ops.deep_memory_reference, leaves, settings)
    got, got_grads = outputs_and_gradients(ops.deep_memory_chunked, leaves, settings)
    assert_rel_close(got, want, tolerance, "outputs (read weights, cached, final state, online read)")
    assert_rel_close(got_grads, want_grads, tolerance, "gradients")
    return want, want_grads


CASES = [
    # (id, kind, state_init, segment_len, minibatch_len, tokens, with_initial)
    ("dla-checkpoint", "dla", "checkpoint", 8, 4, 23, False),
    ("dla-independent", "dla", "independent", 8, 4, 23, False),
    ("dla-initial-state-b1", "dla", "checkpoint", 4, 1, 11, True),
    ("titans-checkpoint", "titans", "checkpoint", 8, 4, 23, False),
    ("titans-independent", "titans", "independent", 8, 4, 23, False),
    ("titans-initial-state", "titans", "checkpoint", 8, 4, 21, True),
    ("titans-b1", "titans", "checkpoint", 4, 1, 11, False),
    ("titans-one-minibatch-per-segment", "titans", "checkpoint", 6, 6, 20, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_chunked_equals_the_token_loop(case):
    _, kind, state_init, segment_len, minibatch_len, tokens, with_initial = case
    leaves = make_case(len(case[0]), kind=kind, state_init=state_init, tokens=tokens, with_initial=with_initial)
    settings = dict(kind=kind, state_init=state_init, segment_len=segment_len, minibatch_len=minibatch_len)
    want, want_grads = compare(leaves, settings)
    result = run(ops.deep_memory_reference, leaves, **settings)
    n_minibatches, n_segments = -(-tokens // minibatch_len), -(-tokens // segment_len)
    assert result.minibatch_weights[0].shape == (2, n_minibatches, H, E, D)
    assert result.cached_states[1].shape == (2, n_segments, H, D, E)
    # the case tests something: the memory moved away from its start, and every input has a gradient
    moved = relative_error(result.cached_states[0][:, -1], leaves["w1"].detach().expand(2, H, E, D))
    assert moved > 1e-2, f"the weights barely moved ({moved:.1e}): the case tests nothing"
    largest = float(torch.stack([w.detach().abs().max() for w in result.cached_states]).max())  # NaN stays NaN
    assert largest < 10, f"the inner steps diverge (|W| up to {largest:.1e}): not a meaningful case"
    names = [name for name, value in leaves.items() for _ in (value if isinstance(value, tuple) else (value,))]
    for name, gradient in zip(names, want_grads, strict=True):
        if with_initial and name in ("w1", "w2"):
            assert gradient.norm() == 0, "the learned initial weights are unused when an initial state is given"
        else:
            assert gradient.norm() > 0, f"the reference gradient of {name} is zero: the case tests nothing"


def test_dispatch_reference_is_the_token_loop_and_auto_the_chunked_path(monkeypatch):
    leaves = make_case(3, kind="titans", state_init="checkpoint")
    settings = dict(kind="titans", state_init="checkpoint")
    calls = []
    package = importlib.import_module("mcdist.ops.deep_memory")  # ops.deep_memory is the function
    for name in ("deep_memory_reference", "deep_memory_chunked"):
        def spy(*args, _real=getattr(package, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(package, name, spy)
    for impl in ("reference", "chunked", "auto"):
        run(lambda *a, **kw: ops.deep_memory(*a, impl=impl, **kw), leaves, **settings)
    assert calls == ["deep_memory_reference", "deep_memory_chunked", "deep_memory_chunked"]


def test_the_token_loop_without_gradients_gives_the_same_states():
    leaves = make_case(4, kind="titans", state_init="independent")
    settings = dict(kind="titans", state_init="independent")
    with torch.no_grad():
        loop = run(ops.deep_memory_reference, leaves, **settings)
        chunked = run(ops.deep_memory_chunked, leaves, **settings)
    assert not loop.cached_states[0].requires_grad
    assert_rel_close(list(loop.cached_states) + list(loop.final_state),
                     list(chunked.cached_states) + list(chunked.final_state), TOLERANCE, "states")


def test_float32_chunked_against_the_float64_token_loop():
    leaves = make_case(5, kind="titans", state_init="checkpoint")
    single = {name: value.detach().float().requires_grad_() for name, value in leaves.items()}
    settings = dict(kind="titans", state_init="checkpoint")
    want, want_grads = outputs_and_gradients(ops.deep_memory_reference, leaves, settings)
    got, got_grads = outputs_and_gradients(ops.deep_memory_chunked, single, settings)
    assert got[0].dtype == torch.float32
    assert_rel_close(got, want, 1e-5, "outputs")
    assert_rel_close(got_grads, want_grads, 1e-4, "gradients")


# -- planted wrong rules: the comparison above must catch each --------------------------------------------------


def wrong_momentum_sign(state, g1, g2, kind, inner_lr, momentum, decay):
    mu, keep = momentum[None, :, None, None], 1.0 - decay[None, :, None, None]
    s1, s2 = -mu * state.s1 - inner_lr * g1, -mu * state.s2 - inner_lr * g2
    return ops.DeepState(keep * state.w1 + s1, keep * state.w2 + s2, s1, s2)


def decay_applied_twice(state, g1, g2, kind, inner_lr, momentum, decay):
    mu, keep = momentum[None, :, None, None], 1.0 - decay[None, :, None, None]
    s1, s2 = mu * state.s1 - inner_lr * g1, mu * state.s2 - inner_lr * g2
    return ops.DeepState(keep * keep * state.w1 + s1, keep * keep * state.w2 + s2, s1, s2)


def momentum_without_the_step(state, g1, g2, kind, inner_lr, momentum, decay):
    """W ← (1 − α) W − η G: the momentum kept but never applied."""
    mu, keep = momentum[None, :, None, None], 1.0 - decay[None, :, None, None]
    s1, s2 = mu * state.s1 - inner_lr * g1, mu * state.s2 - inner_lr * g2
    return ops.DeepState(keep * state.w1 - inner_lr * g1, keep * state.w2 - inner_lr * g2, s1, s2)


def gradient_without_gelu_derivative(w1, w2, k, v, theta, kind):
    pre = torch.einsum("bhed,bthd->bthe", w1, k)
    hidden = torch.nn.functional.gelu(pre)
    read = k + torch.einsum("bhde,bthe->bthd", w2, hidden)
    d_read = (-v if kind == "dla" else 2.0 * (read - v)) * theta[..., None]
    g2 = torch.einsum("bthd,bthe->bhde", d_read, hidden)
    g1 = torch.einsum("bthe,bthd->bhed", torch.einsum("bhde,bthd->bthe", w2, d_read), k)
    return g1, g2


PLANTED = [("_apply_update", wrong_momentum_sign, "titans"), ("_apply_update", decay_applied_twice, "titans"),
           ("_apply_update", momentum_without_the_step, "titans"),
           ("_gradients_batched", gradient_without_gelu_derivative, "dla")]


@pytest.mark.parametrize("name,planted,kind", PLANTED, ids=[p[1].__name__ for p in PLANTED])
def test_a_planted_wrong_rule_fails_the_comparison(monkeypatch, name, planted, kind):
    leaves = make_case(6, kind=kind, state_init="checkpoint")
    settings = dict(kind=kind, state_init="checkpoint")
    compare(leaves, settings)  # the true rule passes on these inputs
    monkeypatch.setattr(deep_chunked, name, planted)
    want, _ = outputs_and_gradients(ops.deep_memory_reference, leaves, settings)
    got, _ = outputs_and_gradients(ops.deep_memory_chunked, leaves, settings)
    assert relative_error(got, want) > 1e-3, "the planted rule moved nothing: the test would not see it"
    with pytest.raises(AssertionError, match="relative error"):
        compare(leaves, settings)


def test_bad_arguments_are_named():
    leaves = make_case(7, kind="dla", state_init="checkpoint")
    with pytest.raises(ValueError, match="minibatch_len = 3 must be a positive divisor of segment_len = 8"):
        run(ops.deep_memory_reference, leaves, kind="dla", state_init="checkpoint", minibatch_len=3)
    with pytest.raises(ValueError, match="deep memory kind = 'gd'"):
        run(ops.deep_memory_reference, leaves, kind="gd", state_init="checkpoint")
