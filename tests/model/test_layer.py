"""The MC layer: chunked path vs token-loop reference, identities, causality, bad input."""

import itertools

import pytest
import torch

from checks import assert_rel_close, relative_error
from mcdist.config import AGGREGATIONS, MEMORY_KINDS, STATE_INITS, ModelConfig
from mcdist.layer import MemoryCachingLayer, aggregate
from mcdist.readers import LocalReader
from mcdist.ops import linear_memory_chunked, linear_memory_reference
from mcdist.reference import logarithmic_segments

VARIANTS = list(itertools.product(MEMORY_KINDS, AGGREGATIONS, STATE_INITS))


def variant_id(variant):
    return "-".join(variant)


def make_layer(memory, aggregation, state_init, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(d_model=12, n_heads=2, memory=memory, aggregation=aggregation, state_init=state_init,
                    segment_len=8, chunk_len=4, minibatch_len=4, top_k=2, inner_lr=0.5)
    settings.update(overrides)
    return MemoryCachingLayer(ModelConfig(**settings)).to(dtype)


def outputs_and_grads(layer, x, impl):
    x = x.detach().clone().requires_grad_()
    y = layer(x, impl=impl)
    generator = torch.Generator().manual_seed(123)
    upstream = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * upstream).sum(), [x] + params, allow_unused=True)
    return y, grads


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_chunked_matches_reference_float64(variant):
    layer = make_layer(*variant)
    x = torch.randn(2, 27, 12, dtype=torch.float64)  # 27: a partial last segment and mini-batch
    y_ref, g_ref = outputs_and_grads(layer, x, "reference")
    y, g = outputs_and_grads(layer, x, "chunked")
    assert_rel_close(y, y_ref, 1e-10, "y")
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    assert_rel_close(dict(zip(names, g, strict=True)), dict(zip(names, g_ref, strict=True)), 1e-10, "gradients")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_chunked_matches_reference_float32(variant):
    layer64 = make_layer(*variant)
    layer32 = make_layer(*variant, dtype=torch.float32)
    x = torch.randn(2, 19, 12, dtype=torch.float64)
    y_ref, g_ref = outputs_and_grads(layer64, x, "reference")
    y, g = outputs_and_grads(layer32, x.float(), "chunked")
    assert_rel_close(y, y_ref, 1e-5, "y")
    assert_rel_close(g[0], g_ref[0], 1e-5, "dx")  # the input
    # Every parameter's gradient together within 1e-5; each alone within 1e-4, because a parameter whose
    # gradient is a sum with heavy cancellation (the decay bias: ~1e-4 against ~1e-1 elsewhere) sits at float32
    # rounding noise on its own scale.
    assert_rel_close(g[1:], g_ref[1:], 1e-5, "parameter gradients", joint=True)
    assert_rel_close(g[1:], g_ref[1:], 1e-4, "parameter gradients")


def layer_read(layer, x, impl="chunked"):
    """y before the output projection: project → memory pass → aggregate."""
    reader = LocalReader(layer.config, impl)
    p = reader.project(layer, x)
    return p, aggregate(layer.config, p, reader.memory(layer, p), reader)


@pytest.mark.parametrize("memory", ["linear", "gated"])
@pytest.mark.parametrize("state_init", STATE_INITS)
def test_soup_equals_grm_for_linear_memory(memory, state_init):
    """docs/math.md §6: over linear memory (Σ_i γ_i M^(i)) q = Σ_i γ_i (M^(i) q). The token loop of
    mcdist/reference.py mixes the states and reads once; grm's chunked read reads every state and mixes the reads.
    The two are written independently (the layer itself routes soup through grm), so the identity is checked."""
    from mcdist.reference import memory_caching_reference

    x = torch.randn(2, 40, 12, dtype=torch.float64)
    p, mixed_reads = layer_read(make_layer(memory, "grm", state_init), x)
    mixed_states = memory_caching_reference(make_layer(memory, "soup", state_init), p)
    assert_rel_close(mixed_states, mixed_reads, 1e-12, "soup (token loop) against grm (chunked)")
    online_only = memory_caching_reference(make_layer(memory, "none", state_init), p)
    assert relative_error(online_only, mixed_reads) > 1e-2  # the cached states weigh: the case tests something


@pytest.mark.parametrize("memory", ["linear", "gated"])
@pytest.mark.parametrize("state_init", STATE_INITS)
def test_residual_equals_one_presummed_matrix(memory, state_init):
    layer = make_layer(memory, "residual", state_init)
    x = torch.randn(2, 35, 12, dtype=torch.float64)
    p, y = layer_read(layer, x)
    memory_out = layer.memory_pass(p, impl="chunked")
    C = layer.config.segment_len
    expected = []
    for t in range(x.shape[1]):
        presummed = sum((memory_out.cached_states[:, i] for i in range(t // C)),
                        torch.zeros_like(memory_out.cached_states[:, 0]))
        expected.append(memory_out.online_out[:, t] + torch.einsum("bhij,bhj->bhi", presummed, p.q[:, t]))
    assert_rel_close(y, torch.stack(expected, 1), 1e-12, "residual read")


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_ssc_with_top_k_covering_all_segments_equals_grm(memory):
    x = torch.randn(2, 40, 12, dtype=torch.float64)
    _, ssc = layer_read(make_layer(memory, "ssc", "checkpoint", top_k=5), x)
    _, grm = layer_read(make_layer(memory, "grm", "checkpoint"), x)
    assert_rel_close(ssc, grm, 1e-12, "ssc with every segment kept against grm")


@pytest.mark.parametrize("memory", ["linear", "gated"])
def test_none_is_the_plain_recurrence(memory):
    layer = make_layer(memory, "none", "checkpoint")
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    p, y = layer_read(layer, x)
    plain = linear_memory_reference(p.q, p.k, p.v, p.log_decay, segment_len=x.shape[1], state_init="checkpoint")
    assert_rel_close(y, plain.online_out, 1e-12, "y against the plain recurrence")


@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_single_segment_equals_none(memory, aggregation):
    x = torch.randn(2, 8, 12, dtype=torch.float64)  # T = segment_len: one segment
    layer = make_layer(memory, aggregation, "independent")
    _, y = layer_read(layer, x)
    layer.config = layer.config.replace(aggregation="none")
    _, base = layer_read(layer, x)
    assert_rel_close(y, base, 1e-12, "y against aggregation none")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_causality(variant):
    layer = make_layer(*variant)
    x = torch.randn(1, 26, 12, dtype=torch.float64)
    t = 13
    changed = x.clone()
    changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
    with torch.no_grad():
        y, y_changed = layer(x, impl="chunked"), layer(changed, impl="chunked")
    assert torch.equal(y[:, :t + 1], y_changed[:, :t + 1])
    assert not torch.allclose(y[:, t + 1:], y_changed[:, t + 1:])


def test_paper_plain_configuration_has_no_additions():
    config = ModelConfig.paper_plain(d_model=12, n_heads=2, segment_len=8, chunk_len=4)
    layer = MemoryCachingLayer(config).double()
    assert not hasattr(layer, "y_norm") and not hasattr(layer, "gate_proj")
    x = torch.randn(1, 20, 12, dtype=torch.float64)
    p, y = layer_read(layer, x)
    assert torch.allclose(layer(x), layer.out_proj(y.reshape(1, 20, -1)), atol=1e-14)
    assert config.scale == 1.0 and config.qk_norm == "none"


# -- logarithmic segmentation (reference path) -----------------------------------------------------------------


@pytest.mark.parametrize("t", range(40))
def test_logarithmic_blocks_partition_the_prefix(t):
    closed, start = logarithmic_segments(t)
    blocks = closed + [(start, t + 1)]
    assert blocks[0][0] == 0 and blocks[-1][1] == t + 1
    sizes = [end - begin for begin, end in blocks]
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(size & (size - 1) == 0 for size in sizes) and sizes == sorted(sizes, reverse=True)
    assert len(blocks) == bin(t + 1).count("1")


@pytest.mark.parametrize("segmentation", ["constant", "logarithmic"])
def test_residual_independent_linear_is_plain_linear_attention(segmentation):
    # The blocks partition the prefix and linear memory is additive: Σ_blocks M_block = M over the prefix.
    layer = make_layer("linear", "residual", "independent", segmentation=segmentation)
    x = torch.randn(2, 21, 12, dtype=torch.float64)
    p = layer.project(x)
    from mcdist.reference import memory_caching_reference

    y = memory_caching_reference(layer, p)
    plain = linear_memory_reference(p.q, p.k, p.v, None, segment_len=21, state_init="checkpoint")
    assert_rel_close(y, plain.online_out, 1e-12, "y against the plain recurrence")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_logarithmic_segmentation_is_causal(aggregation):
    layer = make_layer("gated", aggregation, "independent", segmentation="logarithmic")
    x = torch.randn(1, 19, 12, dtype=torch.float64)
    changed = x.clone()
    changed[:, 10:] += 1.0
    with torch.no_grad():
        assert torch.equal(layer(x)[:, :10], layer(changed)[:, :10])


def test_logarithmic_segmentation_refuses_the_chunked_path():
    layer = make_layer("linear", "grm", "checkpoint", segmentation="logarithmic")
    with pytest.raises(ValueError, match="logarithmic"):
        layer(torch.randn(1, 8, 12, dtype=torch.float64), impl="chunked")


def test_bad_input_shapes_are_refused():
    layer = make_layer("linear", "grm", "checkpoint")
    with pytest.raises(ValueError, match="q, k, v|shape"):
        linear_memory_chunked(torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2, 5), torch.randn(1, 8, 2, 4),
                              segment_len=8, chunk_len=4)
    with pytest.raises(ValueError, match="chunk_len"):
        linear_memory_chunked(*(torch.randn(1, 8, 2, 4) for _ in range(3)), segment_len=8, chunk_len=3)
    with pytest.raises(RuntimeError):
        layer(torch.randn(1, 8, 13, dtype=torch.float64))  # d_model 13 instead of 12


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_chunked_loss_equals_the_whole_logits_loss_and_its_gradients(tie_embeddings):
    from mcdist.model import MCLanguageModel

    torch.manual_seed(0)
    model = MCLanguageModel(ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, segment_len=4, chunk_len=2,
                                        minibatch_len=2, tie_embeddings=tie_embeddings)).double()
    ids = torch.randint(0, 40, (2, 13))
    labels = torch.randint(0, 40, (2, 13))
    labels[:, ::4] = -100
    expected = torch.nn.functional.cross_entropy(model(ids).logits.reshape(-1, 40), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
    expected.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for chunk in (0, 1, 7, 26, 100):  # whole, one token, uneven, exactly B·T, more than B·T
        model.zero_grad()
        total = model.loss_sum(ids, labels, chunk_tokens=chunk)
        total.backward()
        torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip((p.grad for p in model.parameters()), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    pieces = list(model.logit_chunks(ids, chunk_tokens=5))
    assert [first for first, _ in pieces] == [0, 5, 10]
    torch.testing.assert_close(torch.cat([logits for _, logits in pieces], 1), model(ids).logits)
