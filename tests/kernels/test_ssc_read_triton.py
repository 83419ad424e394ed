"""Triton ssc gather read (mcdist.kernels.ssc_read), forward and backward, against the PyTorch paths.

References: ``cached_read_reference`` (token and state loops) and ``cached_read_chunked``, both in float64.
Runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported), so shapes stay small.
Every buffer and output is filled with NaN before the kernels run (``POISON_BUFFERS``), so an element no program
writes fails the comparison.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mcdist import ops  # noqa: E402
from checks import assert_rel_close  # noqa: E402
from read_inputs import DEVICE, make_inputs, random_selection  # noqa: E402
from mcdist.ops import cached_read_chunked, cached_read_reference  # noqa: E402
from mcdist.kernels import ssc_read  # noqa: E402
from mcdist.kernels.cached_read import cached_read_triton  # noqa: E402
from mcdist.kernels.ssc_read import ssc_read_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")

NAMES = ("z", "u", "cached_states", "contexts")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ssc_read, "POISON_BUFFERS", True)


CASES = {
    # id: (B, T, H, Din, Dout, Dc, Nb, segment_len, K, extra)
    "odd_T_8_segments": (1, 53, 2, 16, 16, 8, 7, 7, 3, {}),
    "rect_din16_dout32_batch2": (2, 45, 1, 16, 32, 8, 8, 6, 2, {}),
    "k1": (1, 41, 2, 16, 16, 8, 6, 7, 1, {}),
    "k_ge_n_duplicates": (1, 41, 2, 16, 32, 8, 6, 7, 9, {"duplicates": True}),
    "tied_scores": (1, 29, 2, 16, 16, 8, 4, 6, 3, {"tied": True}),
    "offsets_invalid_entries": (1, 33, 2, 16, 16, 8, 5, 7, 3,
                                {"query_offset": 7, "segment_offset": 1, "with_invalid": True, "blind": True}),
    "all_select_state_0": (1, 47, 1, 16, 16, 8, 5, 8, 2, {"first": True}),
}


def case_inputs(case):
    B, T, H, din, dout, dc, n, segment_len, k, extra = CASES[case]
    extra = dict(extra)
    seed = sum(map(ord, case))
    inputs = make_inputs(seed, B, T, H, din, dout, dc, n, tied=extra.pop("tied", False))
    query_offset = extra.get("query_offset", 0)
    selected = random_selection(seed, B, T, H, k, segment_len=segment_len, query_offset=query_offset,
                                with_invalid=extra.pop("with_invalid", False))
    if extra.pop("duplicates", False):
        selected[..., -1] = selected[..., 0]
    if extra.pop("first", False):  # one large group: many tiles, and a long loop in the dM kernel
        own = (torch.arange(T) + query_offset) // segment_len
        selected[:, own > 0, :, 0] = 0
    if extra.pop("blind", False):
        # the last token has earlier segments, but selects only indices below the block, its own and a future one
        own = (query_offset + T - 1) // segment_len
        selected[:, -1, :, :3] = torch.tensor([0, own, own + 1])
    kw = dict(segment_len=segment_len, gate_scale=0.75, selected=selected.to(DEVICE), **extra)
    return inputs, kw


def kernel_and_grads(inputs, kw, g_out=None, g_lse=None, seed=0):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out, lse = ssc_read_triton(*leaves, **kw)
    gen = torch.Generator().manual_seed(seed + 1000)
    if g_out is None:
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out, lse), leaves, (g_out.to(out), g_lse.to(lse)))
    return out, lse, grads, g_out, g_lse


def path_and_grads(path, inputs, kw, g_out, g_lse):
    leaves = [x.detach().double().cpu().requires_grad_() for x in inputs]
    kw = dict(kw, selected=kw["selected"].cpu())
    out, lse = path(*leaves, **kw)
    grads = torch.autograd.grad((out, lse), leaves, (g_out, g_lse), allow_unused=True)
    return out, lse, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ssc_read_matches_pytorch_paths(case):
    inputs, kw = case_inputs(case)
    seed = sum(map(ord, case))
    out, lse, grads, g_out, g_lse = kernel_and_grads(inputs, kw, seed=seed)
    B, T, H = inputs[0].shape[:3]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (B, T, H, inputs[2].shape[3]) and lse.shape == (B, T, H)
    for path in (cached_read_reference, cached_read_chunked):
        ref_out, ref_lse, ref_grads = path_and_grads(path, inputs, kw, g_out, g_lse)
        assert_rel_close(lse, ref_lse, 1e-5, f"{path.__name__} lse", same_infinities=True)
        assert_rel_close(out, ref_out, 1e-5, f"{path.__name__} out")
        blind = ~torch.isfinite(ref_lse)
        assert blind.any(), "every case has tokens that see nothing"
        assert torch.all(out.detach().cpu()[blind] == 0), "a token that sees nothing must read 0"
        for name, x, g, rg in zip(NAMES, inputs, grads, ref_grads, strict=True):
            assert g.shape == x.shape and g.dtype == x.dtype, name
            if rg.abs().sum() == 0:
                assert torch.all(g == 0), f"d{name} must be 0"
            else:
                assert_rel_close(g, rg, 1e-5, f"{path.__name__} d{name}")


def test_cases_cover_what_they_claim():
    """The blind token is blind, a group spans several tiles, T is odd, and K = 9 exceeds the visible states."""
    inputs, kw = case_inputs("offsets_invalid_entries")
    lse = cached_read_chunked(*[x.double().cpu() for x in inputs], **dict(kw, selected=kw["selected"].cpu()))[1]
    own = (kw["query_offset"] + lse.shape[1] - 1) // kw["segment_len"]
    assert own - kw["segment_offset"] > 0 and not torch.isfinite(lse[:, -1]).any()
    inputs, kw = case_inputs("all_select_state_0")
    block_p = ssc_read._block_pairs(inputs[0], inputs[2])
    plan = ssc_read._pair_plan(kw["selected"], inputs[2].shape[1], kw["segment_len"], 0, 0, block_p)
    assert int((plan[0] == 0).sum()) > 2 * block_p
    assert all(T % 2 for (_, T, *_rest) in CASES.values())
    assert CASES["k_ge_n_duplicates"][8] > CASES["k_ge_n_duplicates"][6]


def test_matches_blocked_kernel_and_is_deterministic():
    """Same values and gradients as cached_read_triton with selected; two runs give bitwise equal results."""
    inputs, kw = case_inputs("offsets_invalid_entries")
    out, lse, grads, g_out, g_lse = kernel_and_grads(inputs, kw)
    again = kernel_and_grads(inputs, kw, g_out, g_lse)
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    assert all(torch.equal(a, b) for a, b in zip(grads, again[2], strict=True))
    leaves = [x.clone().requires_grad_() for x in inputs]
    blocks = cached_read_triton(*leaves, **kw)
    blocks_grads = torch.autograd.grad(blocks, leaves, (g_out.to(out), g_lse.to(lse)))
    assert_rel_close(out, blocks[0], 1e-6, "out")
    assert_rel_close(lse, blocks[1], 1e-6, "lse", same_infinities=True)
    assert_rel_close(grads, blocks_grads, 1e-5, "gradients")


def test_bf16_states_and_inputs():
    """bfloat16 inputs (the interpreter multiplies in float32): against float64 on the rounded values; the
    gradients come back in bfloat16."""
    inputs, kw = case_inputs("odd_T_8_segments")
    inputs = [x.to(torch.bfloat16) for x in inputs]
    out, lse, grads, g_out, g_lse = kernel_and_grads(inputs, kw, seed=4)
    ref_out, ref_lse, ref_grads = path_and_grads(cached_read_chunked, inputs, kw, g_out, g_lse)
    assert_rel_close(out, ref_out, 1e-5, "out")
    assert_rel_close(lse, ref_lse, 1e-5, "lse", same_infinities=True)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert_rel_close(grads, ref_grads, 1e-2, "gradients")


def test_nothing_to_read():
    """Nb = 0, and K = 0: every token reads 0 with lse −inf; gradients are zeros of the right shapes."""
    for n, k in ((0, 3), (3, 0)):
        inputs = make_inputs(3, 1, 19, 2, 16, 16, 8, n)
        selected = torch.zeros(1, 19, 2, k, dtype=torch.int64, device=DEVICE)
        leaves = [x.requires_grad_() for x in inputs]
        out, lse = ssc_read_triton(*leaves, segment_len=4, gate_scale=1.0, selected=selected)
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))
        grads = torch.autograd.grad((out, lse), leaves, (torch.ones_like(out), torch.ones_like(lse)))
        assert all(g.shape == x.shape and torch.all(g == 0) for g, x in zip(grads, leaves, strict=True))


def test_unwritten_output_would_be_seen():
    """The poison is real: with the per-token kernel not launched, the NaN-filled output reaches the caller."""
    inputs, kw = case_inputs("k1")
    kernel = ssc_read.ssc_read_fwd_kernel_combine

    class Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    ssc_read.ssc_read_fwd_kernel_combine = Skip()
    try:
        out, lse = ssc_read_triton(*inputs, **kw)
    finally:
        ssc_read.ssc_read_fwd_kernel_combine = kernel
    assert torch.isnan(out).all() and torch.isnan(lse).all()


def test_custom_op_passes_opcheck():
    """Schema, fake tensor, autograd registration and AOT dispatch of mcdist::ssc_read_triton."""
    z, u, states, contexts = make_inputs(10, 1, 20, 1, 16, 16, 8, 3)
    selected = random_selection(10, 1, 20, 1, 2, segment_len=6).to(DEVICE)
    block_p = ssc_read._block_pairs(z, states)
    plan = ssc_read._pair_plan(selected, 3, 6, 0, 0, block_p)
    args = (z.requires_grad_(), u.requires_grad_(), states.requires_grad_(), contexts.requires_grad_(), *plan, 1.0,
            block_p)
    result = torch.library.opcheck(torch.ops.mcdist.ssc_read_triton.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_custom_op_under_torch_compile():
    """The plan (PyTorch) and the op trace with fullgraph=True and match eager."""
    inputs = make_inputs(8, 1, 23, 1, 16, 16, 8, 3)
    selected = random_selection(8, 1, 23, 1, 2, segment_len=6, query_offset=3).to(DEVICE)
    kw = dict(segment_len=6, gate_scale=1.0, query_offset=3, selected=selected)

    def read(z, u, states, contexts):
        out, lse = ssc_read_triton(z, u, states, contexts, **kw)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    leaves = [x.clone().requires_grad_() for x in inputs]
    eager = torch.autograd.grad(read(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(read, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    traced = torch.autograd.grad(compiled(*leaves), leaves)
    assert_rel_close(traced, eager, 1e-6, "gradients")


def test_bad_arguments_are_named():
    z, u, states, contexts = make_inputs(9, 1, 9, 1, 16, 16, 8, 2)
    kw = dict(segment_len=4, gate_scale=1.0)
    selected = torch.zeros(1, 9, 1, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="selected is required"):
        ssc_read_triton(z, u, states, contexts, selected=None, **kw)
    with pytest.raises(ValueError, match="selected"):
        ssc_read_triton(z, u, states, contexts, selected=selected.int(), **kw)
    with pytest.raises(ValueError, match="cached_states"):
        ssc_read_triton(z, u, states[..., :8], contexts, selected=selected, **kw)
    with pytest.raises(ValueError, match="segment_len"):
        ssc_read_triton(z, u, states, contexts, selected=selected, segment_len=0, gate_scale=1.0)


# ---------------------------------------------------------------------------------------------------------------
# The switch in mcdist.ops
# ---------------------------------------------------------------------------------------------------------------


def test_ssc_read_argument_routes_ssc_to_the_gather_kernel(monkeypatch):
    inputs, kw = case_inputs("k1")
    calls = []
    real = ssc_read.ssc_read_triton

    def spy(*args, **kwargs):
        calls.append(kwargs["selected"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ssc_read, "ssc_read_triton", spy)
    out, lse = ops.cached_read(*inputs, impl="triton", ssc_read="gather", **kw)
    assert len(calls) == 1
    ops.cached_read(*inputs, impl="triton", ssc_read="gather", **dict(kw, selected=None))  # grm: the blocked kernel
    assert len(calls) == 1
    blocks = ops.cached_read(*inputs, impl="triton", ssc_read="blocks", **kw)
    assert len(calls) == 1
    ops.cached_read(*inputs, impl="triton", **kw)  # the default is 'blocks'
    assert len(calls) == 1
    assert_rel_close(out, blocks[0], 1e-6, "out")
    assert_rel_close(lse, blocks[1], 1e-6, "lse", same_infinities=True)


def test_a_bad_ssc_read_is_named():
    inputs, kw = case_inputs("k1")
    for impl in ("chunked", "triton"):  # checked on every call, whichever path it would take
        with pytest.raises(ValueError, match="ssc_read = 'gathr'; expected one of 'blocks', 'gather'"):
            ops.cached_read(*inputs, impl=impl, ssc_read="gathr", **kw)


# ---------------------------------------------------------------------------------------------------------------
# The GPU script's check of this kernel runs here too, at a tiny shape under the interpreter
# ---------------------------------------------------------------------------------------------------------------


def test_gpu_script_ssc_check_runs_on_cpu():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("mcdist_gpu_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.ssc_gather_check(DEVICE, smoke=True)
    assert result["ok"], result
    assert set(result["errors"]) == {"fp32", "bf16"} and set(result["errors"]["fp32"]) == {"gather", "blocks"}
