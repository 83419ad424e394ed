"""The sliding-window linear attention memory, ``memory = "swla"`` (docs/math.md §3.3):
M_t = a_t M_{t-1} + β_t v_{t-1} k_{t-1}ᵀ + λ_t v_t k_tᵀ.

The chunked path (two gated memories over 2H heads, summed) against the token loop of mcdist/reference.py, and the
token loop against the closed form of the recurrence written here; splitting a pass; prefill + decode against the
full forward; the Triton path under the interpreter; planted wrong recurrences that must fail. Every aggregation
and state_init without the convolution is also in tests/model/test_layer.py and test_inference.py, and sequence
parallelism in tests/parallel/ (all iterate over MEMORY_KINDS)."""

import itertools

import pytest
import torch

import mcdist.layer
import mcdist.readers
from checks import assert_rel_close, relative_error
from mcdist.config import AGGREGATIONS, STATE_INITS, ModelConfig
from mcdist.infer import Session
from mcdist.layer import MemoryCachingLayer
from mcdist.model import MCLanguageModel
from mcdist.reference import memory_caching_reference

C = 8  # segment_len of the layer tests


def make_layer(aggregation="grm", state_init="checkpoint", dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(d_model=12, n_heads=2, memory="swla", aggregation=aggregation, state_init=state_init,
                    segment_len=C, chunk_len=4, top_k=2)
    settings.update(overrides)
    layer = MemoryCachingLayer(ModelConfig(**settings)).to(dtype)
    with torch.no_grad():  # β, λ spread well away from their initial values, so both terms weigh per token
        layer.window_proj.weight.normal_(0.0, 0.5)
    return layer


def outputs_and_grads(layer, x, impl):
    x = x.detach().clone().requires_grad_()
    y = layer(x, impl=impl)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(y.dtype)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    grads = torch.autograd.grad((y * upstream).sum(), [x] + list(layer.parameters()), allow_unused=True)
    return y, dict(zip(names, grads, strict=True))


def inputs(T=27, seed=5):
    return torch.randn(2, T, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("aggregation,state_init", list(itertools.product(AGGREGATIONS, STATE_INITS)),
                         ids=lambda value: str(value))
def test_chunked_with_convolution_matches_the_token_loop(aggregation, state_init):
    """With the short convolution (k, v of neighbouring tokens already mixed); 27 tokens: a partial last segment and
    chunk. Outputs and every gradient (input and each parameter, the window's projection among them)."""
    layer = make_layer(aggregation, state_init, conv_size=3)
    x = inputs()
    y_ref, g_ref = outputs_and_grads(layer, x, "reference")
    y, g = outputs_and_grads(layer, x, "chunked")
    assert_rel_close(y, y_ref, 1e-10, "y")
    assert_rel_close(g, g_ref, 1e-10, "gradients")
    assert float(g["window_proj.weight"].abs().max()) > 0  # the window's gates take part


def window_closed_form(p, segment_len, state_init):
    """o_t = M_t q_t from M_t = Σ_{s=r}^{t} (Π_{j=s+1}^{t} a_j) (λ_s v_s k_sᵀ + β_s v_{s-1} k_{s-1}ᵀ [s > r]), where r
    is where t's memory starts (0, or t's segment start under independent): a sum over sources, not a recurrence."""
    q, k, v = p.q, p.k, p.v
    B, T, H, D = q.shape
    decay = torch.exp(p.log_decay)  # [B, T, H]
    beta, lam = p.window[:, :, 0], p.window[:, :, 1]
    out = torch.zeros(B, T, H, D, dtype=q.dtype)
    for t in range(T):
        first = (t // segment_len) * segment_len if state_init == "independent" else 0
        M = torch.zeros(B, H, D, D, dtype=q.dtype)
        for s in range(first, t + 1):
            carried = torch.prod(decay[:, s + 1:t + 1], 1)[..., None, None]  # [B, H, 1, 1], 1 when s = t
            write = lam[:, s, :, None, None] * torch.einsum("bhi,bhj->bhij", v[:, s], k[:, s])
            if s > first:
                write = write + beta[:, s, :, None, None] * torch.einsum("bhi,bhj->bhij", v[:, s - 1], k[:, s - 1])
            M = M + carried * write
        out[:, t] = torch.einsum("bhij,bhj->bhi", M, q[:, t])
    return out


@pytest.mark.parametrize("state_init", STATE_INITS)
def test_token_loop_is_the_window_recurrence(state_init):
    """The oracle itself against the equation (aggregation none: y_t = M_t q_t)."""
    layer = make_layer("none", state_init)
    p = layer.project(inputs(T=19))
    assert_rel_close(memory_caching_reference(layer, p), window_closed_form(p, C, state_init), 1e-12,
                     "token loop against the closed form")


def test_initial_gates_and_config():
    layer = MemoryCachingLayer(ModelConfig(d_model=12, n_heads=3, memory="swla", segment_len=8, chunk_len=4))
    beta, lam = torch.sigmoid(layer.window_proj.bias).view(2, 3)
    assert torch.allclose(beta, torch.full((3,), 0.5)) and torch.allclose(lam, torch.sigmoid(torch.tensor(3.0)))
    assert hasattr(layer, "decay_proj") and not hasattr(MemoryCachingLayer(ModelConfig(memory="gated")),
                                                        "window_proj")


@pytest.mark.parametrize("state_init", STATE_INITS)
def test_a_pass_split_at_a_segment_end_continues_from_its_state_and_last_token(state_init):
    """memory_pass over [0, T) equals [0, 16) then [16, T) started from the first part's final state (checkpoint:
    into the first half of the heads) and its last token's (k, v): the plumbing the decode cache relies on."""
    layer = make_layer("none", state_init)
    p = layer.project(inputs(T=29))
    whole = layer.memory_pass(p, impl="chunked")
    head = layer.memory_pass(p._replace(**{f: getattr(p, f)[:, :16] for f in ("q", "k", "v", "u", "log_decay",
                                                                                "window")}), impl="chunked")
    rest = {f: getattr(p, f)[:, 16:] for f in ("q", "k", "v", "u", "log_decay", "window")}
    initial = head.final_state if state_init == "checkpoint" else None
    tail = layer.memory_pass(p._replace(**rest), impl="chunked", initial_state=initial,
                             previous=(p.k[:, 15], p.v[:, 15]))
    assert_rel_close(torch.cat([head.online_out, tail.online_out], 1), whole.online_out, 1e-12, "online reads")
    assert_rel_close(torch.cat([head.cached_states, tail.cached_states], 1), whole.cached_states, 1e-12, "states")
    assert_rel_close(tail.final_state, whole.final_state, 1e-12, "final state")


def tiny_model(state_init="checkpoint", aggregation="grm", **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory="swla", aggregation=aggregation,
                  state_init=state_init, segment_len=4, chunk_len=2, minibatch_len=2, top_k=2)
    model = MCLanguageModel(ModelConfig(**{**fields, **overrides})).double()
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.window_proj.weight.normal_(0.0, 0.5)
    return model


def session_logits(model, ids, prompt_len, impl="chunked"):
    session = Session(model, impl=impl)
    steps = [session.prefill(ids[:, :prompt_len])]
    steps += [session.decode(ids[:, t]) for t in range(prompt_len, ids.shape[1] - 1)]
    return torch.stack(steps, 1)


@pytest.mark.parametrize("state_init,aggregation", [("checkpoint", "grm"), ("independent", "ssc"),
                                                    ("checkpoint", "residual")])
def test_prefill_and_decode_with_convolution_equal_the_full_forward(state_init, aggregation):
    """The cache keeps the last token's (k, v) for the window; prompts of one token, mid-segment, a segment end and
    just past it; later tokens cross segment ends (under independent the window restarts there)."""
    model = tiny_model(state_init, aggregation, conv_size=3)
    ids = torch.randint(0, 32, (2, 15), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    for prompt_len in (1, 6, 8, 9):
        assert_rel_close(session_logits(model, ids, prompt_len), full[:, prompt_len - 1:-1], 1e-10,
                         f"logits after a prompt of {prompt_len}")


def test_triton_path_matches_chunked_under_the_interpreter():
    """The Triton kernel runs the 2H-head gated pass unchanged (its smallest chunk: 16); forward and gradients."""
    torch.manual_seed(0)
    layer = MemoryCachingLayer(ModelConfig(d_model=16, n_heads=2, memory="swla", aggregation="grm",
                                           segment_len=16, chunk_len=16))
    x = torch.randn(1, 40, 16, generator=torch.Generator().manual_seed(2))
    y, g = outputs_and_grads(layer, x, "triton")
    y_ref, g_ref = outputs_and_grads(layer, x, "chunked")
    assert_rel_close(y, y_ref, 1e-5, "y")
    assert_rel_close(g, g_ref, 1e-4, "gradients")


# -- planted bugs: a wrong recurrence must fail the comparisons above ------------------------------------------


def unweighted_window(p, config, previous=None, initial_state=None):
    """The older token written without its weight β_t."""
    return RIGHT_INPUTS(p._replace(window=torch.stack([torch.ones_like(p.window[:, :, 0]), p.window[:, :, 1]], 2)),
                        config, previous, initial_state)


def window_of_three(p, config, previous=None, initial_state=None):
    """The older token is t − 2 instead of t − 1."""
    q, k, v, log_decay, initial_state = RIGHT_INPUTS(p, config, previous, initial_state)
    H = p.k.shape[2]
    k = torch.cat([k[:, :, :H], torch.cat([torch.zeros_like(k[:, :1, H:]), k[:, :-1, H:]], 1)], 2)
    v = torch.cat([v[:, :, :H], torch.cat([torch.zeros_like(v[:, :1, H:]), v[:, :-1, H:]], 1)], 2)
    return q, k, v, log_decay, initial_state


def window_across_segments(p, config, previous=None, initial_state=None):
    """Under independent, the segment's first token still writes the previous segment's last token."""
    return RIGHT_INPUTS(p, config.replace(state_init="checkpoint"), previous, initial_state)


RIGHT_INPUTS = mcdist.layer.swla_inputs


@pytest.mark.parametrize("planted,state_init", [(unweighted_window, "checkpoint"), (window_of_three, "checkpoint"),
                                                (window_across_segments, "independent")],
                         ids=["no-beta", "shift-by-two", "window-across-segments"])
def test_a_wrong_recurrence_fails_the_comparison(monkeypatch, planted, state_init):
    layer = make_layer("grm", state_init)
    x = inputs()
    y_ref, _ = outputs_and_grads(layer, x, "reference")
    assert relative_error(outputs_and_grads(layer, x, "chunked")[0], y_ref) <= 1e-10
    monkeypatch.setattr(mcdist.layer, "swla_inputs", planted)
    assert relative_error(outputs_and_grads(layer, x, "chunked")[0], y_ref) > 1e-3


def test_decoding_without_the_previous_token_fails_the_comparison(monkeypatch):
    """The decode step must read the cached (k, v) of the token before: a cache that forgets it is caught."""
    model = tiny_model()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    original = mcdist.readers.DecodeReader.memory

    def forgetful(self, layer, p):
        self.cache.previous = None
        return original(self, layer, p)

    monkeypatch.setattr(mcdist.readers.DecodeReader, "memory", forgetful)
    assert relative_error(session_logits(model, ids, 5), full[:, 4:-1]) > 1e-3
