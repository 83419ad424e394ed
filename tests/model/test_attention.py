"""The attention baseline mixer (docs/math.md, "Attention baseline"): SDPA against the token-loop reference,
causality, prefill + decode against the full forward (attention and hybrid models), configuration errors."""

import pytest
import torch

from checks import assert_rel_close
from mcdist.attention import AttentionLayer, KVCache
from mcdist.cli import main
from mcdist.config import ConfigError, ModelConfig
from mcdist.infer import Session, generate
from mcdist.layer import MemoryCachingLayer
from mcdist.model import MCLanguageModel
from mcdist.readers import LayerCache

VOCAB = 32


def config(**overrides) -> ModelConfig:
    # init_std 0.3: attention weights far from uniform, so a wrong mask, scale or rotation shows
    base = dict(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, segment_len=4, chunk_len=2, minibatch_len=2,
                top_k=2, mixer="attention", init_std=0.3)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.mark.parametrize("T", [1, 13])
def test_sdpa_equals_token_loop(T):
    torch.manual_seed(0)
    layer = AttentionLayer(config(rope_base=100.0)).double()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, 16, generator=generator, dtype=torch.float64)
    upstream = torch.randn(2, T, 16, generator=generator, dtype=torch.float64)
    grads = []
    for impl in ("chunked", "reference"):
        x_in = x.clone().requires_grad_()
        layer.zero_grad()
        out = layer(x_in, impl=impl)
        (out * upstream).sum().backward()
        grads.append([out, x_in.grad] + [p.grad.clone() for p in layer.parameters()])
    assert_rel_close(grads[0], grads[1], 1e-12, "SDPA vs token loop: output, input and parameter gradients")


def test_rope_makes_positions_matter():
    """RoPE: the scores ⟨q_t, k_s⟩ depend on t − s only (shifting every position leaves them unchanged), while the
    rotated q itself moves (the rotation is applied)."""
    torch.manual_seed(0)
    layer = AttentionLayer(config()).double()
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q, k, _ = layer.project(x, torch.arange(5))
    q_shift, k_shift = layer.project(x, torch.arange(5) + 7)[:2]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    assert_rel_close(torch.einsum("bqhd,bkhd->bhqk", q_shift, k_shift), scores, 1e-12, "scores are shift-invariant")
    assert (q_shift - q).abs().max() > 1e-3  # but q itself moved


def test_causal():
    torch.manual_seed(0)
    model = MCLanguageModel(config(layer_pattern="attention,mc")).double()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :7], after[:, :7])
    assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-6  # the later tokens did change


@pytest.mark.parametrize("pattern", ["attention,attention", "mc,attention", "attention,mc"])
def test_prefill_and_decode_equal_full_forward(pattern):
    torch.manual_seed(0)
    model = MCLanguageModel(config(layer_pattern=pattern)).double()
    ids = torch.randint(0, VOCAB, (2, 15), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    cache = model.new_cache()
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [KVCache if kind == "attention" else LayerCache for kind in pattern.split(",")]
    steps = [model(ids[:, :6], cache=cache, impl="chunked").logits]  # prefill
    steps.append(model(ids[:, 6:9], cache=cache, impl="chunked").logits)  # several tokens at once
    steps += [model(ids[:, t:t + 1], cache=cache, impl="chunked").logits for t in range(9, 15)]
    assert cache.position == 15
    assert_rel_close(torch.cat(steps, 1), full, 1e-10, f"{pattern}: prefill + decode vs full forward")


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_session_and_generate_on_attention(prompt_len):
    torch.manual_seed(0)
    model = MCLanguageModel(config(layer_pattern="mc,attention")).double()
    ids = torch.randint(0, VOCAB, (2, prompt_len + 5), generator=torch.Generator().manual_seed(1))
    full = model(ids, impl="chunked").logits
    session = Session(model, impl="chunked")
    steps = [session.prefill(ids[:, :prompt_len])]
    steps += [session.decode(ids[:, t]) for t in range(prompt_len, prompt_len + 4)]
    assert_rel_close(torch.stack(steps, 1), full[:, prompt_len - 1:-1], 1e-10, "Session vs full forward")
    new = generate(Session(model), ids[:, :prompt_len], 4)
    greedy = ids[:, :prompt_len]
    for _ in range(4):  # greedy decoding by full forwards over the growing sequence
        greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(new, greedy[:, prompt_len:])


def test_blocks_follow_the_pattern_and_parameter_counts():
    model = MCLanguageModel(config(n_layers=3, layer_pattern="mc, attention,mc", mixer="mc"))
    assert [type(block.mixer) for block in model.blocks] == [MemoryCachingLayer, AttentionLayer, MemoryCachingLayer]
    d, HD = 16, 16
    attention = sum(p.numel() for p in model.blocks[1].mixer.parameters())
    assert attention == 4 * d * HD  # q, k, v, o (docs/math.md, "Attention baseline")
    assert all(isinstance(b.mixer, AttentionLayer) for b in MCLanguageModel(config(n_layers=2)).blocks)


@pytest.mark.parametrize("overrides,words", [
    (dict(n_layers=2, layer_pattern="mc"), "2 (= model.n_layers)"),
    (dict(n_layers=2, layer_pattern="mc,attn"), "layer_pattern = 'mc,attn'"),
    (dict(mixer="transformer"), "model.mixer"),
    (dict(d_model=12, n_heads=4), "head_dim = 3 is odd"),
    (dict(rope_base=-1.0), "model.rope_base"),
])
def test_bad_mixer_config_is_a_clear_error(overrides, words):
    with pytest.raises(ConfigError) as info:
        config(**overrides)
    assert words in str(info.value)


def test_bad_pattern_on_the_command_line_exits_2(capsys):
    assert main(["train", "--set", "model.n_layers=2", "--set", "model.layer_pattern=mc,mc,attention"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layer_pattern" in err and len(err.splitlines()) == 1, err


def test_reference_rejects_cache():
    layer = AttentionLayer(config()).double()
    with pytest.raises(ValueError, match="reference"):
        layer(torch.zeros(1, 3, 16, dtype=torch.float64), impl="reference", cache=KVCache())
