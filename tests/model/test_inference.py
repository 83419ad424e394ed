"""Inference in one process (docs/inference.md): prefill + decode equals the full forward; generation; bad calls."""

import itertools

import pytest
import torch

from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS, ModelConfig
from mcdist.infer import Session, generate, sample_next
from mcdist.model import MCLanguageModel


def tiny_model(memory="gated", aggregation="grm", state_init="checkpoint", **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory, aggregation=aggregation,
                  state_init=state_init, segment_len=4, chunk_len=2, minibatch_len=2, top_k=2, inner_lr=0.1)
    return MCLanguageModel(ModelConfig(**{**fields, **overrides})).double()


def session_logits(model, ids, prompt_len, **options):
    """Next-token logits after the prompt and after each later token, from a Session."""
    session = Session(model, **options)
    steps = [session.prefill(ids[:, :prompt_len])]
    steps += [session.decode(ids[:, t]) for t in range(prompt_len, ids.shape[1] - 1)]
    return torch.stack(steps, 1), session


@pytest.mark.parametrize("memory,aggregation,state_init", list(itertools.product(MEMORY_KINDS, AGGREGATIONS,
                                                                                  STATE_INITS)))
def test_prefill_and_decode_equal_the_full_forward(memory, aggregation, state_init):
    model = tiny_model(memory, aggregation, state_init)
    ids = torch.randint(0, 32, (2, 19))
    full = model(ids, impl="chunked").logits
    # prompts: one token; mid-segment and mid-mini-batch; one segment end; just past it
    for prompt_len in (1, 7, 8, 9):
        got, session = session_logits(model, ids, prompt_len, impl="chunked")
        torch.testing.assert_close(got, full[:, prompt_len - 1:-1], rtol=1e-10, atol=1e-10)
        assert session.position == ids.shape[1] - 1
        assert [cache.position for cache in session.cache.layers] == [ids.shape[1] - 1] * 2
        assert [len(cache.segments) for cache in session.cache.layers] == [(ids.shape[1] - 1) // 4] * 2


def test_the_model_forward_with_a_cache_is_prefill_then_decode():
    """The model's own forward: an empty cache makes it a prefill, a filled one continues token by token (several
    tokens at once, too), each equal to the full forward's logits at those positions."""
    model = tiny_model("titans", "ssc", conv_size=3)
    ids = torch.randint(0, 32, (2, 17))
    full = model(ids, impl="chunked").logits
    cache = model.new_cache()
    assert cache.position == 0 and not any(layer.filled for layer in cache.layers)
    out = model(ids[:, :9], cache=cache, impl="chunked")  # ends mid-segment and mid-mini-batch
    assert out.cache is cache and cache.position == 9
    pieces = [out.logits]
    for start, stop in ((9, 10), (10, 14), (14, 17)):
        pieces.append(model(ids[:, start:stop], cache=cache, impl="chunked").logits)
    assert cache.position == 17
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="cache holds 1 layers"):
        model(ids, cache=type(cache)(cache.layers[:1]))
    with pytest.raises(ValueError, match="reference"):
        model(ids[:, :1], cache=cache, impl="reference")


def test_decode_never_rereads_the_prompt():
    """The cache after a long prompt holds one state per closed segment plus fixed-size running state."""
    model = tiny_model("linear", "grm")
    session = Session(model, impl="chunked")
    session.prefill(torch.randint(0, 32, (1, 43)))
    cache = session.cache.layers[0]
    assert cache.states.shape[1] == 10 and cache.contexts.shape[1] == 10
    assert cache.state.shape == (1, 2, 8, 8) and cache.pending is None


def test_triton_kernels_decode_under_the_interpreter():
    model = tiny_model("gated", "ssc", segment_len=16, chunk_len=16).float()  # the kernel's smallest chunk
    ids = torch.randint(0, 32, (1, 36))
    full = model(ids, impl="chunked").logits
    got, _ = session_logits(model, ids, 20, impl="triton")  # the prompt ends mid-segment; two segments close
    torch.testing.assert_close(got, full[:, 19:-1], rtol=1e-4, atol=1e-5)


def test_greedy_generation_equals_argmax_of_the_full_forward():
    model = tiny_model("titans", "soup")
    prompt = torch.randint(0, 32, (2, 6))
    new = generate(Session(model, impl="chunked"), prompt, 7)
    sequence = prompt
    for _ in range(7):  # the independent reference: the whole sequence again for every token
        next_token = model(sequence, impl="chunked").logits[:, -1].argmax(-1)
        sequence = torch.cat([sequence, next_token[:, None]], 1)
    assert torch.equal(new, sequence[:, 6:])


def test_sampling_is_reproducible_and_respects_top_k():
    model = tiny_model()
    prompt = torch.randint(0, 32, (3, 5))
    first = generate(Session(model), prompt, 6, temperature=1.0, top_k=3, seed=11)
    again = generate(Session(model), prompt, 6, temperature=1.0, top_k=3, seed=11)
    assert torch.equal(first, again)
    logits = torch.randn(4, 32)
    allowed = torch.topk(logits, 3).indices
    for seed in range(20):
        token = sample_next(logits, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert all(token[b] in allowed[b] for b in range(4))


def test_bad_calls_are_refused():
    model = tiny_model()
    session = Session(model)
    with pytest.raises(RuntimeError, match="prefill"):
        session.decode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        session.prefill(torch.zeros(2, 0, dtype=torch.long))
    session.prefill(torch.randint(0, 32, (2, 3)))
    with pytest.raises(ValueError, match="B = 2"):
        session.decode(torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="already"):
        session.prefill(torch.randint(0, 32, (2, 3)))
    with pytest.raises(ValueError, match="layout"):
        Session(model, layout="diagonal")
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.randn(1, 4), temperature=-1.0)
    with pytest.raises(ValueError, match="segmentation"):
        Session(tiny_model(segmentation="logarithmic"))


@pytest.mark.parametrize("with_selection", [False, True])
def test_decoding_reads_equal_the_chunked_read(monkeypatch, with_selection):
    """Decoding's two reads of the closed segments against cached_read_chunked: the Triton one cuts the states into
    groups read as one batch (flash-decoding) plus a remainder; the PyTorch one mixes the states first."""
    from mcdist import readers
    from mcdist.ops import cached_read_chunked
    from mcdist.readers import DecodeReader, LayerCache

    monkeypatch.setattr(readers, "SPLIT_STATES", 4)
    g = torch.Generator().manual_seed(3)
    B, H, D, n = 2, 2, 16, 11  # two groups of 4 and a remainder of 3
    z, u = torch.randn(B, 1, H, D, generator=g), torch.randn(B, 1, H, D, generator=g)
    states, contexts = torch.randn(B, n, H, D, D, generator=g), torch.randn(B, n, H, D, generator=g)
    selected = None
    if with_selection:  # a whole group unselected; a row selecting nothing; −1 slots; duplicates
        selected = torch.tensor([[[[0, 9, 9, -1], [5, 6, 10, 2]]], [[[-1, -1, -1, -1], [3, 8, 7, 4]]]])
    want = cached_read_chunked(z, u, states, contexts, segment_len=4, gate_scale=0.5, query_offset=n * 4,
                               selected=selected)
    config = ModelConfig(d_model=H * D, n_heads=H, segment_len=4, chunk_len=2, minibatch_len=2)
    for impl in ("triton", "chunked"):
        got = DecodeReader(config, LayerCache(contexts=contexts), impl).read(z, u, states, gate_scale=0.5,
                                                                             selected=selected)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2])
def test_eos_ends_a_row_which_then_repeats_it_and_generation_stops_when_all_did(rows):
    model = tiny_model()
    prompt = torch.randint(0, 32, (rows, 5))
    greedy = generate(Session(model), prompt, 8)
    eos = int(greedy[0, 2])
    got = generate(Session(model), prompt, 8, eos_id=eos)
    ends = []
    for row in range(rows):
        hits = (greedy[row] == eos).nonzero()
        first = int(hits[0]) if len(hits) else None
        ends.append(8 if first is None else first + 1)
        if first is None:
            assert torch.equal(got[row], greedy[row, :got.shape[1]])
        else:
            assert torch.equal(got[row, :first + 1], greedy[row, :first + 1])
            assert (got[row, first:] == eos).all()
    assert got.shape[1] == max(ends)
