"""Triton cached read (forward + backward) and the partial merge, against a float64 token/state loop.

Runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported), so shapes stay small.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mcdist.kernels import cached_read  # noqa: E402
from mcdist.kernels.cached_read import cached_read_triton  # noqa: E402
from checks import assert_rel_close  # noqa: E402
from read_inputs import DEVICE, make_inputs, random_selection  # noqa: E402
from mcdist.ops import merge_all, merge_partials  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")



# ---------------------------------------------------------------------------------------------------------------
# Reference: float64, explicit loops over tokens and states (vectorised over batch and head only)
# ---------------------------------------------------------------------------------------------------------------


def reference_read(z, u, states, contexts, *, segment_len, gate_scale, query_offset=0, segment_offset=0,
                   selected=None):
    """Returns (out [B, T, H, Dout], lse [B, T, H]) in the dtype of the inputs (float64 in these tests)."""
    B, T, H, _ = z.shape
    n, dout = states.shape[1], states.shape[3]
    outs, lses = [], []
    for t in range(T):
        own = (query_offset + t) // segment_len
        scores, reads, masks = [], [], []
        for j in range(n):
            index = segment_offset + j
            visible = torch.full((B, H), index < own, dtype=torch.bool)
            if selected is not None:
                visible = visible & (selected[:, t].cpu() == index).any(-1)
            masks.append(visible)
            scores.append(gate_scale * (u[:, t] * contexts[:, j]).sum(-1))  # [B, H]
            reads.append(torch.einsum("bhoi,bhi->bho", states[:, j], z[:, t]))  # [B, H, Dout]
        if n == 0:
            outs.append(z.new_zeros(B, H, dout))
            lses.append(z.new_full((B, H), float("-inf")))
            continue
        mask = torch.stack(masks, -1).to(z.device)  # [B, H, n]
        score = torch.stack(scores, -1)  # [B, H, n]
        read = torch.stack(reads, -2)  # [B, H, n, Dout]
        seen = mask.any(-1)
        peak = torch.where(mask, score, float("-inf")).max(-1).values.detach()
        peak = torch.where(seen, peak, torch.zeros_like(peak))
        weight = torch.where(mask, torch.exp(torch.where(mask, score, peak[..., None]) - peak[..., None]), 0.0)
        total = torch.where(seen, weight.sum(-1), torch.ones_like(peak))
        lses.append(torch.where(seen, peak + torch.log(total), float("-inf")))
        outs.append((weight[..., None] * read).sum(-2) / total[..., None])
    return torch.stack(outs, 1), torch.stack(lses, 1)


def run_both(inputs, seed, **kw):
    """Kernel and float64 reference values and gradients under the same random upstream gradients."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out, lse = cached_read_triton(*leaves, **kw)
    gen = torch.Generator().manual_seed(seed + 1000)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out, lse), leaves, (g_out.to(out), g_lse.to(lse)))

    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in inputs]
    kw_ref = dict(kw)
    if kw_ref.get("selected") is not None:
        kw_ref["selected"] = kw_ref["selected"].cpu()
    ref_out, ref_lse = reference_read(*ref_leaves, **kw_ref)
    ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (g_out, g_lse), allow_unused=True)
    return (out, lse, grads), (ref_out, ref_lse, ref_grads)


CASES = {
    # id: (B, T, H, Din, Dout, Dc, Nb, segment_len, extra kwargs)
    "square": (1, 53, 2, 16, 16, 16, 7, 8, {}),
    "rect_din16_dout32": (2, 45, 1, 16, 32, 8, 8, 6, {}),
    "block_before_queries": (1, 37, 2, 16, 16, 8, 3, 8, {"query_offset": 40, "segment_offset": 2}),
    "block_overlaps_queries": (1, 37, 2, 16, 32, 8, 4, 8, {"query_offset": 40, "segment_offset": 4}),
    "block_after_queries": (1, 21, 1, 16, 16, 8, 3, 8, {"query_offset": 0, "segment_offset": 5}),
    "selected_k1": (1, 41, 2, 16, 16, 8, 6, 7, {"k": 1}),
    "selected_k_ge_n": (1, 41, 2, 16, 32, 8, 6, 7, {"k": 9}),
    "selected_invalid_entries": (1, 33, 2, 16, 16, 8, 5, 7, {"k": 3, "with_future": True, "query_offset": 7,
                                                               "segment_offset": 1}),
    "tied_scores": (1, 29, 2, 16, 16, 8, 4, 6, {"tied": True}),
}


def case_setup(table, case, seed_offset=0, duplicates=None):
    """(inputs, seed, read keywords) of one case row (B, T, H, din, dout, dc, n, segment_len, extra); with ssc
    selection the last slot repeats the first (duplicates) when ``duplicates`` is true, default when K ≥ n."""
    B, T, H, din, dout, dc, n, segment_len, extra = table[case]
    extra = dict(extra)
    seed = sum(map(ord, case)) + seed_offset
    k, with_future, tied = extra.pop("k", None), extra.pop("with_future", False), extra.pop("tied", False)
    inputs = make_inputs(seed, B, T, H, din, dout, dc, n, tied=tied)
    selected = None
    if k is not None:
        selected = random_selection(seed, B, T, H, k, segment_len=segment_len,
                                    query_offset=extra.get("query_offset", 0), with_invalid=with_future).to(DEVICE)
        if duplicates if duplicates is not None else k >= n:  # K ≥ N: some tokens select every visible state
            selected[..., -1] = selected[..., 0]
    return inputs, seed, dict(segment_len=segment_len, gate_scale=0.75, selected=selected, **extra)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cached_read_matches_reference(case):
    B, T, H, din, dout, dc, n, segment_len, extra = CASES[case]
    inputs, seed, kw = case_setup(CASES, case)
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = run_both(inputs, seed, **kw)

    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (B, T, H, dout) and lse.shape == (B, T, H)
    assert_rel_close(lse, ref_lse, 1e-5, "lse", same_infinities=True)
    if ref_out.abs().sum() > 0:
        assert_rel_close(out, ref_out, 1e-5, "out")
    blind = ~torch.isfinite(ref_lse)
    assert torch.all(out.detach().cpu()[blind] == 0), "a token that sees nothing must read 0"
    for name, g, rg in zip(("z", "u", "cached_states", "contexts"), grads, ref_grads, strict=True):
        assert g.shape == rg.shape and g.dtype == inputs[("z", "u", "cached_states", "contexts").index(name)].dtype
        if rg.abs().sum() == 0:
            assert torch.all(g == 0), f"d{name} must be 0"
        else:
            assert_rel_close(g, rg, 1e-5, f"d{name}")


BLOCK_S_CASES = {
    # id: (B, T, H, Din, Dout, Dc, Nb, segment_len, extra kwargs); Nb = 7 is a multiple of neither 2 nor 4
    "grm_rect_offsets": (1, 45, 2, 16, 32, 8, 7, 6, {"query_offset": 5, "segment_offset": 1}),
    "ssc_ties_duplicates_invalid": (1, 41, 2, 16, 16, 8, 7, 5, {"k": 9, "with_future": True, "tied": True}),
    "ssc_sparse_din32_dout16": (1, 39, 1, 32, 16, 8, 7, 4, {"k": 2, "query_offset": 7, "segment_offset": 2}),
}


@pytest.mark.parametrize("block_s", [2, 4])
@pytest.mark.parametrize("case", list(BLOCK_S_CASES), ids=list(BLOCK_S_CASES))
def test_backward_with_several_states_per_program(case, block_s, monkeypatch):
    """dM/dc programs owning BLOCK_S states (a partial last program, states some tokens or whole query blocks do
    not see, ssc ties, duplicates, −1 and future entries) give all four gradients of the float64 reference; the
    outputs start as NaN, so an element no program writes fails."""
    n = BLOCK_S_CASES[case][6]
    inputs, seed, kw = case_setup(BLOCK_S_CASES, case, seed_offset=block_s, duplicates=True)
    monkeypatch.setattr(cached_read, "TILE_OVERRIDES", {"dmdc": {"BLOCK_S": block_s}})
    meta, _ = cached_read._meta(inputs[0], inputs[2], inputs[3], kw["selected"], "dmdc")
    assert meta["BLOCK_S"] == block_s and n % block_s
    (_, _, grads), (_, _, ref_grads) = run_both(inputs, seed, **kw)
    for name, g, rg in zip(("z", "u", "cached_states", "contexts"), grads, ref_grads, strict=True):
        assert rg.abs().sum() > 0, f"d{name}: the reference gradient is zero, the case tests nothing"
        assert_rel_close(g, rg, 1e-5, f"d{name}")


def test_tile_overrides_are_validated(monkeypatch):
    """TILE_OVERRIDES: unknown keys, bad values and an unknown heuristics name raise a ValueError naming them."""
    z, u, states, contexts = make_inputs(12, 1, 9, 1, 16, 16, 8, 2)
    kw = dict(segment_len=4, gate_scale=1.0)
    bad = [({"bwd": {}}, "'bwd'.*allowed.*'dmdc'"), ({"dzdu": {"BLOCK_S": 2}}, "'BLOCK_S'.*allowed"),
           ({"dmdc": {"BLOCK_S": 3}}, "'BLOCK_S'.*a power of two"), ({"fwd": {"BLOCK_T": 8}}, "'BLOCK_T'"),
           ({"dmdc": {"BLOCK_S": 16}}, "'BLOCK_S'"), ({"heuristics": "old"}, "'heuristics'.*'previous'")]
    for overrides, message in bad:
        monkeypatch.setattr(cached_read, "TILE_OVERRIDES", overrides)
        with pytest.raises(ValueError, match=message):
            cached_read_triton(z, u, states, contexts, **kw)
    monkeypatch.setattr(cached_read, "TILE_OVERRIDES", {"heuristics": "previous", "dzdu": {"num_stages": 3}})
    assert cached_read._meta(z, states, contexts, None, "dmdc")[0]["BLOCK_S"] == 1
    assert cached_read._meta(z, states, contexts, None, "dzdu")[1] == {"num_stages": 3}


def test_cases_cover_what_they_claim():
    """The parametrised cases really contain blind tokens, partly visible blocks and T % BLOCK_T != 0."""
    B, T, H, din, dout, dc, n, segment_len, extra = CASES["square"]
    z, u, states, contexts = make_inputs(0, B, T, H, din, dout, dc, n)
    _, lse = reference_read(z.double(), u.double(), states.double(), contexts.double(), segment_len=segment_len,
                            gate_scale=1.0)
    assert (~torch.isfinite(lse)).sum() == B * segment_len * H  # the first segment sees no state
    assert all(T % 16 for (_, T, *_rest) in CASES.values())
    B, T, H, din, dout, dc, n, segment_len, extra = CASES["block_after_queries"]
    z, u, states, contexts = make_inputs(0, B, T, H, din, dout, dc, n)
    _, lse = reference_read(z.double(), u.double(), states.double(), contexts.double(), segment_len=segment_len,
                            gate_scale=1.0, **extra)
    assert not torch.isfinite(lse).any()


def test_bf16_states():
    """bfloat16 states (interpreter: fp32 dot) against the reference on the rounded states; grads in bf16."""
    B, T, H, din, dout, dc, n, segment_len = 1, 35, 2, 16, 32, 8, 5, 7
    inputs = make_inputs(11, B, T, H, din, dout, dc, n, state_dtype=torch.bfloat16)
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = run_both(inputs, 11, segment_len=segment_len,
                                                                gate_scale=0.5)
    assert grads[2].dtype == torch.bfloat16
    assert_rel_close(out, ref_out, 1e-5, "out")
    assert_rel_close(lse, ref_lse, 1e-5, "lse", same_infinities=True)
    for name, g, rg, bound in zip(("z", "u", "cached_states", "contexts"), grads, ref_grads, (1e-5, 1e-5, 1e-2, 1e-5),
                                  strict=True):
        assert_rel_close(g, rg, bound, f"d{name}")


def test_no_states():
    """Nb = 0: every token reads 0 with lse −inf; gradients are zeros of the right shapes."""
    z, u, states, contexts = make_inputs(3, 1, 19, 2, 16, 16, 8, 0)
    leaves = [x.requires_grad_() for x in (z, u, states, contexts)]
    out, lse = cached_read_triton(*leaves, segment_len=4, gate_scale=1.0)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    grads = torch.autograd.grad((out, lse), leaves, (torch.ones_like(out), torch.ones_like(lse)))
    assert all(g.shape == x.shape and torch.all(g == 0) for g, x in zip(grads, leaves, strict=True))


@pytest.mark.parametrize("use_selected", [False, True], ids=["grm", "ssc"])
def test_split_and_merge_equals_full_read(use_selected):
    """partial(states [0, a)) ⊕ partial(states [a, N)) == read of all N states; values and gradients."""
    B, T, H, din, dout, dc, n, segment_len, split = 1, 47, 2, 16, 16, 8, 7, 6, 3
    seed = 21 + use_selected
    inputs = make_inputs(seed, B, T, H, din, dout, dc, n)
    selected = random_selection(seed, B, T, H, 2, segment_len=segment_len).to(DEVICE) if use_selected else None
    kw = dict(segment_len=segment_len, gate_scale=0.9, selected=selected)
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(B, T, H, dout, generator=gen).to(DEVICE)
    g_lse = torch.randn(B, T, H, generator=gen).to(DEVICE)

    leaves = [x.clone().requires_grad_() for x in inputs]
    full = cached_read_triton(*leaves, **kw)
    full_grads = torch.autograd.grad(full, leaves, (g_out, g_lse))

    leaves = [x.clone().requires_grad_() for x in inputs]
    z, u, states, contexts = leaves
    first = cached_read_triton(z, u, states[:, :split], contexts[:, :split], **kw)
    second = cached_read_triton(z, u, states[:, split:], contexts[:, split:], segment_offset=split, **kw)
    merged = merge_partials(first, second)
    merged_grads = torch.autograd.grad(merged, leaves, (g_out, g_lse))

    assert_rel_close(merged[0], full[0], 1e-6, "out")
    assert_rel_close(merged[1], full[1], 1e-6, "lse", same_infinities=True)
    assert_rel_close(merged_grads, full_grads, 1e-5, "gradients")


def test_against_the_pytorch_paths():
    """Same answer as the PyTorch paths in mcdist.ops.cached_read (chunked and reference)."""
    from mcdist.ops import cached_read_chunked, cached_read_reference

    paths = [cached_read_chunked, cached_read_reference]
    B, T, H, din, dout, dc, n, segment_len = 1, 27, 2, 16, 32, 8, 5, 5
    inputs = make_inputs(5, B, T, H, din, dout, dc, n)
    selected = random_selection(5, B, T, H, 2, segment_len=segment_len, query_offset=5).to(DEVICE)
    for sel in (None, selected):
        kw = dict(segment_len=segment_len, gate_scale=0.6, query_offset=5, segment_offset=1, selected=sel)
        leaves = [x.clone().requires_grad_() for x in inputs]
        out, lse = cached_read_triton(*leaves, **kw)
        g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
        grads = torch.autograd.grad((out, lse), leaves, (g_out, g_lse))
        for path in paths:
            ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
            ref_out, ref_lse = path(*ref_leaves, **kw)
            ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (g_out.double(), g_lse.double()))
            assert_rel_close(out, ref_out, 1e-5, f"{path.__name__} out")
            assert_rel_close(lse, ref_lse, 1e-5, f"{path.__name__} lse", same_infinities=True)
            assert_rel_close(grads, ref_grads, 1e-5, f"{path.__name__} gradients")


def test_custom_op_under_torch_compile():
    """The custom op traces with fullgraph=True (fake implementation + autograd formula) and matches eager."""
    inputs = make_inputs(8, 1, 23, 1, 16, 16, 8, 3)
    kw = dict(segment_len=6, gate_scale=1.0, query_offset=3)

    def read(z, u, states, contexts):
        out, lse = cached_read_triton(z, u, states, contexts, **kw)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    leaves = [x.clone().requires_grad_() for x in inputs]
    eager = torch.autograd.grad(read(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(read, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    traced = torch.autograd.grad(compiled(*leaves), leaves)
    assert_rel_close(traced, eager, 1e-6, "gradients")


def test_custom_op_passes_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of mcdist::cached_read_triton."""
    z, u, states, contexts = make_inputs(10, 1, 20, 1, 16, 16, 8, 3)
    selected = random_selection(10, 1, 20, 1, 2, segment_len=6).to(DEVICE)
    for sel in (None, selected):
        args = (z.requires_grad_(), u.requires_grad_(), states.requires_grad_(), contexts.requires_grad_(), sel,
                6, 1.0, 0, 0)
        result = torch.library.opcheck(torch.ops.mcdist.cached_read_triton.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_bad_arguments_are_named():
    z, u, states, contexts = make_inputs(9, 1, 9, 1, 16, 16, 8, 2)
    kw = dict(segment_len=4, gate_scale=1.0)
    with pytest.raises(ValueError, match="cached_states"):
        cached_read_triton(z, u, states[..., :8], contexts, **kw)
    with pytest.raises(ValueError, match="contexts"):
        cached_read_triton(z, u, states, contexts[..., :4], **kw)
    with pytest.raises(ValueError, match="segment_len"):
        cached_read_triton(z, u, states, contexts, segment_len=0, gate_scale=1.0)
    with pytest.raises(ValueError, match="segment_offset"):
        cached_read_triton(z, u, states, contexts, segment_offset=-1, **kw)
    with pytest.raises(ValueError, match="selected"):
        cached_read_triton(z, u, states, contexts, selected=torch.zeros(1, 9, 1, 2, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match="float64"):
        cached_read_triton(z.double(), u, states, contexts, **kw)


# ---------------------------------------------------------------------------------------------------------------
# merge_partials / merge_all
# ---------------------------------------------------------------------------------------------------------------


def _partial(gen, shape, d, blind_fraction):
    out = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    lse = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    blind = torch.rand(*shape, generator=gen) < blind_fraction
    return out.masked_fill(blind[..., None], 0.0), lse.masked_fill(blind, float("-inf"))


def test_merge_partials_with_infinities():
    """−inf on one side gives the other side exactly; on both sides (0, −inf); no NaN forward or backward."""
    gen = torch.Generator().manual_seed(31)
    out_a, lse_a = _partial(gen, (3, 5), 4, 0.0)
    out_b, lse_b = _partial(gen, (3, 5), 4, 0.0)
    lse_a[0] = float("-inf")
    out_a[0] = 0.0  # a blind, b sees
    lse_b[1] = float("-inf")
    out_b[1] = 0.0  # b blind, a sees
    lse_a[2, :3] = lse_b[2, :3] = float("-inf")
    out_a[2, :3] = out_b[2, :3] = 0.0  # both blind
    leaves = [x.requires_grad_() for x in (out_a, lse_a, out_b, lse_b)]
    out, lse = merge_partials((leaves[0], leaves[1]), (leaves[2], leaves[3]))

    assert torch.equal(lse[0], lse_b[0]) and torch.allclose(out[0], out_b[0], rtol=0, atol=1e-15)
    assert torch.equal(lse[1], lse_a[1]) and torch.allclose(out[1], out_a[1], rtol=0, atol=1e-15)
    assert torch.all(lse[2, :3] == float("-inf")) and torch.all(out[2, :3] == 0)
    both = torch.logaddexp(lse_a[2, 3:], lse_b[2, 3:])
    assert torch.allclose(lse[2, 3:], both, rtol=1e-14, atol=0)
    expected = out_a[2, 3:] * torch.exp(lse_a[2, 3:] - both)[..., None] \
        + out_b[2, 3:] * torch.exp(lse_b[2, 3:] - both)[..., None]
    assert torch.allclose(out[2, 3:], expected, rtol=1e-13, atol=0)

    grads = torch.autograd.grad((out, lse), leaves, (torch.randn_like(out), torch.randn_like(lse)))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.all(grads[1][0] == 0) and torch.all(grads[3][1] == 0)  # a blind side gets no score gradient
    assert torch.all(grads[1][2, :3] == 0) and torch.all(grads[3][2, :3] == 0)


def test_merge_partials_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(32)
    a = _partial(gen, (2, 3), 3, 0.3)
    b = _partial(gen, (2, 3), 3, 0.3)
    a[1][0, 0] = b[1][0, 0] = float("-inf")  # at least one position blind on both sides

    def merged(out_a, out_b, lse_a, lse_b):
        out, lse = merge_partials((out_a, lse_a), (out_b, lse_b))
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    # gradcheck perturbs every entry, −inf ones included (−inf ± eps stays −inf): the function stays exact there.
    leaves = [x.clone().requires_grad_() for x in (a[0], b[0], a[1], b[1])]
    assert torch.autograd.gradcheck(merged, leaves)


def test_merge_all_any_order_and_grouping():
    gen = torch.Generator().manual_seed(33)
    parts = [_partial(gen, (4, 6), 5, 0.4) for _ in range(5)]
    left = merge_all(parts)
    shuffled = merge_all([parts[i] for i in (3, 0, 4, 2, 1)])
    grouped = merge_partials(merge_all(parts[:2]), merge_all(parts[2:]))
    for other in (shuffled, grouped):
        assert_rel_close(other[0], left[0], 1e-14, "out")
        assert_rel_close(other[1], left[1], 1e-14, "lse", same_infinities=True)
    # against a direct log-sum-exp over all partials
    lse_all = torch.logsumexp(torch.stack([p[1] for p in parts]), 0)
    finite = torch.isfinite(lse_all)
    weights = torch.exp(torch.stack([p[1] for p in parts]) - torch.where(finite, lse_all, 0.0))
    out_all = (weights[..., None] * torch.stack([p[0] for p in parts])).sum(0)
    assert_rel_close(left[1], lse_all, 1e-14, "lse", same_infinities=True)
    assert_rel_close(left[0], out_all, 1e-14, "out")
    assert merge_all(parts[:1])[0] is parts[0][0]
    with pytest.raises(ValueError, match="at least one"):
        merge_all([])


# ---------------------------------------------------------------------------------------------------------------
# The GPU check script runs here too, at a tiny shape under the interpreter
# ---------------------------------------------------------------------------------------------------------------


def test_gpu_script_check_runs_on_cpu():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_cached_read.py"
    spec = importlib.util.spec_from_file_location("gpu_cached_read", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.check(DEVICE)
    assert result["ok"], result
    assert {"fp32", "bf16"} <= set(result["errors"])
