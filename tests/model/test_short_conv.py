"""The short causal convolution of q, k, v (model.conv_size): its definition against a loop, causality, the token
loop, decoding from the cache, and the config's limits. (Sequence parallelism: tests/parallel.)"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mcdist.config import AGGREGATIONS, ConfigError, ModelConfig
from mcdist.infer import Session
from mcdist.layer import MemoryCachingLayer
from mcdist.model import MCLanguageModel


def conv_layer(conv_size=3, **overrides):
    torch.manual_seed(0)
    fields = dict(d_model=8, n_heads=2, memory="gated", aggregation="grm", segment_len=4, chunk_len=2,
                  minibatch_len=2, conv_size=conv_size)
    return MemoryCachingLayer(ModelConfig(**{**fields, **overrides})).double()


def test_short_conv_is_the_causal_filter_over_the_last_tokens_then_silu():
    layer = conv_layer(conv_size=3)
    raw = torch.randn(2, 7, 24, dtype=torch.float64)
    prefix = torch.randn(2, 2, 24, dtype=torch.float64)
    w = layer.conv_weight  # [channels, taps]: tap 2 weighs the token itself, tap 0 the one two back
    for given in (None, prefix):
        history = torch.zeros(2, 2, 24, dtype=torch.float64) if given is None else given
        extended = torch.cat([history, raw], 1)  # index i + 2 is token i
        expected = torch.stack([F.silu(sum(w[:, j] * extended[:, t + j] for j in range(3))) for t in range(7)], 1)
        torch.testing.assert_close(layer.short_conv(raw, given), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.conv_tail(raw, given), raw[:, -2:])
    short = raw[:, :1]  # fewer tokens than the tail: the tail keeps the end of the prefix
    torch.testing.assert_close(layer.conv_tail(short, prefix), torch.cat([prefix[:, 1:], short], 1))


def test_a_layer_with_convolution_is_causal_and_the_chunked_path_equals_the_token_loop():
    layer = conv_layer(conv_size=4, aggregation="ssc", top_k=2)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    out = layer(x, impl="chunked")
    torch.testing.assert_close(out, layer(x, impl="reference"), rtol=1e-10, atol=1e-10)
    changed = x.clone()
    changed[:, 6:] += 1.0
    torch.testing.assert_close(layer(changed, impl="chunked")[:, :6], out[:, :6], rtol=0, atol=0)
    assert not torch.allclose(layer(changed, impl="chunked")[:, 6:9], out[:, 6:9])
    plain = conv_layer(conv_size=0)
    assert not hasattr(plain, "conv_weight")
    assert not torch.allclose(plain(x, impl="chunked"), out)


@pytest.mark.parametrize("memory,aggregation", list(itertools.product(("linear", "dla"), AGGREGATIONS)))
def test_decoding_with_the_convolution_equals_the_full_forward(memory, aggregation):
    torch.manual_seed(0)
    model = MCLanguageModel(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, memory=memory,
                                        aggregation=aggregation, segment_len=4, chunk_len=2, minibatch_len=2,
                                        top_k=2, conv_size=3)).double()
    ids = torch.randint(0, 32, (2, 15), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    for prompt_len in (1, 2, 7, 8):  # shorter than the filter's history; mid-segment; a segment end
        session = Session(model, impl="chunked")
        steps = [session.prefill(ids[:, :prompt_len])]
        steps += [session.decode(ids[:, t]) for t in range(prompt_len, ids.shape[1] - 1)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt_len - 1:-1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv_size", [1, -1, 6, True])
def test_conv_size_outside_its_range_is_refused(conv_size):
    with pytest.raises(ConfigError, match=rf"model.conv_size = {conv_size!r} is invalid; expected 0 \(no "
                                          r"convolution\) or a width in \[2, segment_len \+ 1 = 5\]"):
        ModelConfig(segment_len=4, chunk_len=2, minibatch_len=2, conv_size=conv_size)


def test_the_triton_kernels_take_the_convolved_projections_under_the_interpreter():
    torch.manual_seed(0)
    model = MCLanguageModel(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, memory="gated",
                                        aggregation="grm", segment_len=16, chunk_len=16, conv_size=4))
    ids = torch.randint(0, 32, (1, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids, impl="triton").logits, model(ids, impl="chunked").logits, rtol=1e-4,
                               atol=1e-5)
