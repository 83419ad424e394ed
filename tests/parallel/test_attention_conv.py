"""The attention baseline with the short convolution (model.conv_size > 0, docs/math.md §15): SDPA path vs the
token loop, causality, prefill + decode vs the full forward, and (spawned gloo processes) SP vs one process."""

import json

import attention_workers
import pytest
import torch

from checks import assert_rel_close, assert_within
from mcdist.attention import AttentionLayer, attention_reference
from mcdist.config import ModelConfig
from mcdist.model import MCLanguageModel

VOCAB = 32


def config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, segment_len=4, chunk_len=2, minibatch_len=2,
                top_k=2, mixer="attention", init_std=0.3, conv_size=3)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("T", [1, 2, 13])
def test_conv_attention_equals_token_loop(T):
    torch.manual_seed(0)
    layer = AttentionLayer(config(rope_base=100.0)).double()
    assert layer.conv_weight.shape == (3 * 16, 3)
    x = torch.randn(2, T, 16, dtype=torch.float64)
    assert_rel_close(layer(x, impl="chunked"), layer(x, impl="reference"), 1e-12, f"T = {T}")
    plain = AttentionLayer(config(conv_size=0)).double()
    plain.qkv.weight.data.copy_(layer.qkv.weight)
    plain.out_proj.weight.data.copy_(layer.out_proj.weight)
    if T > 1:  # the convolution changes the output (a test that cannot fail is a defect)
        assert (plain(x) - layer(x)).abs().max() > 1e-3


def test_conv_attention_is_causal():
    torch.manual_seed(0)
    model = MCLanguageModel(config()).double()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :7], after[:, :7])
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-6


@pytest.mark.parametrize("pattern,prompt", [("attention,attention", 6), ("mc,attention", 1), ("attention,mc", 2)])
def test_conv_prefill_and_decode_equal_full_forward(pattern, prompt):
    torch.manual_seed(0)
    model = MCLanguageModel(config(layer_pattern=pattern)).double()
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    cache = model.new_cache()
    steps = [model(ids[:, :prompt], cache=cache, impl="chunked").logits]
    steps.append(model(ids[:, prompt:9], cache=cache, impl="chunked").logits)  # several tokens at once
    steps += [model(ids[:, t:t + 1], cache=cache, impl="chunked").logits for t in range(9, 15)]
    assert_rel_close(torch.cat(steps, 1), full, 1e-10, f"{pattern}: prefill + decode vs full forward")


@pytest.mark.parametrize("conv_size,low,high", [(0, 2.0, 8.0), (3, 0.1, 2.0)])
def test_qk_start_far_from_uniform(conv_size, low, high):
    torch.manual_seed(0)
    layer = AttentionLayer(config(d_model=64, n_heads=4, init_std=0.02, conv_size=conv_size))
    assert abs(float(layer.qkv.weight.std()) / (2 / 64 ** 0.5) - 1) < 0.05  # 2/sqrt(d_model), not init_std
    assert abs(float(layer.out_proj.weight.std()) / 0.02 - 1) < 0.05
    x = torch.randn(2, 50, 64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))  # rms 1, as after the block's RMSNorm
    with torch.no_grad():
        q, k, _ = layer.project(x, torch.arange(50))
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / 16 ** 0.5
    # std ≈ 4 without the convolution, ≈ 0.4 with it (its taps, uniform in ±1/sqrt(w), and SiLU shrink q, k ~3×);
    # at init_std 0.02 the logits started near 1e-3 (without) and 3e-4 (with)
    assert low < float(logits.std()) < high


def test_conv_attention_parameter_count():
    layer = AttentionLayer(config())
    assert sum(p.numel() for p in layer.parameters()) == 4 * 16 * 16 + 3 * 16 * 3


# -- sequence parallelism (P = 2, 4), through the attention SP test's own workers with conv_size = 3 ---------------

FORWARD = {2: [("zigzag", "attention", 16), ("contiguous", "attention,mc", 24)],
           4: [("zigzag", "attention", 32), ("contiguous", "attention", 16)]}
DECODE = {2: [("zigzag", "attention", 19, 6), ("zigzag", "attention", 2, 5)],
          4: [("contiguous", "attention,mc", 19, 6)]}


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    from mcdist.parallel.spawn import spawn

    out = {}
    for world in (2, 4):
        path = tmp_path_factory.mktemp("conv") / f"conv-{world}.json"
        spawn(attention_workers.attention_worker, world, FORWARD[world], DECODE[world], str(path), 3,
              timeout_s=300)
        out[world] = json.loads(path.read_text())
    return out


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in FORWARD.items() for c in cases])
def test_sp_conv_attention_equals_one_process(sp_results, world, case):
    errors = sp_results[world]["-".join(map(str, case))]
    assert any("conv_weight" in name for name in errors), errors  # the filters' gradients were compared
    assert_within(errors, 1e-10, f"P = {world}, {case}")


@pytest.mark.parametrize("world,case", [(w, c) for w, cases in DECODE.items() for c in cases])
def test_sp_conv_decode_equals_full_forward(sp_results, world, case):
    assert_within(sp_results[world]["-".join(map(str, case))]["error"], 1e-10, f"P = {world}, {case}")
