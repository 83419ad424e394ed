"""Triton ssc selection (mcdist.kernels.select_topk) against the PyTorch select_top_k and a token loop.

Integer equality everywhere. Inputs are small multiples of a power of two, so every score is exact in float32
whatever the summation order (the kernel's tl.dot and PyTorch's einsum then agree bit for bit); one case uses
normal floats. Runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported), where the
context blocks are 16 wide, so N = 40 takes three blocks. The output is filled with a sentinel (−2) before the
kernel runs, so an element no program writes fails the comparison (checked by a launch that drops a program).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from mcdist import ops  # noqa: E402
from mcdist.ops import select_top_k, select_top_k_reference  # noqa: E402
from mcdist.config import ModelConfig  # noqa: E402
from mcdist.kernels import select_topk  # noqa: E402
from mcdist.kernels.select_topk import UNWRITTEN, select_top_k_triton  # noqa: E402
from mcdist.layer import MemoryCachingLayer  # noqa: E402
from read_inputs import DEVICE  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or the Triton interpreter")

GATE_SCALE = 0.75

CASES = {
    # id: (B, T, H, D, N, segment_len, K, query_offset, values, dtype)
    "three_blocks_batch2_heads2": (2, 83, 2, 16, 40, 2, 8, 0, "dyadic", torch.float32),
    "normal_floats": (1, 61, 2, 16, 31, 2, 5, 0, "normal", torch.float32),
    "tied_few_values": (1, 83, 2, 16, 40, 2, 6, 0, "tied", torch.float32),
    "all_equal_across_blocks": (1, 37, 1, 8, 40, 1, 4, 3, "equal", torch.float32),
    "query_offset_and_blind_tokens": (1, 57, 3, 8, 20, 5, 3, 13, "tied", torch.float32),
    "k1": (2, 45, 1, 16, 22, 2, 1, 0, "tied", torch.float32),
    "k_above_n": (1, 40, 2, 8, 6, 7, 9, 0, "dyadic", torch.float32),
    "first_block_sees_nothing": (1, 50, 2, 8, 3, 20, 2, 0, "dyadic", torch.float32),
    "tiny_d_k_not_pow2": (1, 50, 2, 4, 25, 2, 3, 0, "tied", torch.float32),
    "bf16": (1, 70, 2, 32, 34, 2, 5, 0, "dyadic", torch.bfloat16),
    "bf16_tied": (1, 70, 2, 16, 34, 2, 5, 0, "tied", torch.bfloat16),
    "fp16_u_fp32_contexts": (1, 50, 2, 16, 24, 2, 4, 0, "dyadic", (torch.float16, torch.float32)),
    "fp32_u_bf16_contexts": (1, 50, 2, 16, 24, 2, 4, 0, "fine_u", (torch.float32, torch.bfloat16)),
    "fp16": (1, 50, 2, 16, 24, 2, 4, 0, "fine_u", torch.float16),
}


def case_inputs(case):
    B, T, H, D, N, C, K, query_offset, values, dtype = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    if values in ("dyadic", "fine_u"):  # multiples of 1/16 below 4: exact in float32, bfloat16 and float16 sums
        u = torch.randint(-63, 64, (B, T, H, D), generator=gen) / 16
        contexts = torch.randint(-63, 64, (B, N, H, D), generator=gen) / 16
        if values == "fine_u":  # multiples of 2^-10: u is rounded when cast to 16 bits, the products stay exact
            u = (torch.randn(B, T, H, D, generator=gen) * 1024).round().clamp(-3900, 3900) / 1024
    elif values == "normal":
        u, contexts = torch.randn(B, T, H, D, generator=gen), torch.randn(B, N, H, D, generator=gen)
    elif values == "tied":  # three distinct scores: ties at the k-th place and across context blocks
        u = torch.zeros(B, T, H, D)
        u[..., 0] = 1.0
        contexts = torch.randint(-1, 2, (B, N, H, D), generator=gen).float()
    else:  # every score equal: the lowest indices win, even over the blocks after the first
        u, contexts = torch.ones(B, T, H, D), torch.ones(B, N, H, D)
    u_dtype, c_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    kw = dict(segment_len=C, top_k=K, gate_scale=GATE_SCALE, query_offset=query_offset)
    return u.to(DEVICE, u_dtype), contexts.to(DEVICE, c_dtype), kw


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pytorch_and_token_loop(case, one_thread):
    u, contexts, kw = case_inputs(case)
    got = select_top_k_triton(u, contexts, **kw)
    ref = select_top_k(u, contexts, **kw, token_block=32)
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert not (got == UNWRITTEN).any(), "an output element was never written"
    assert torch.equal(got.cpu(), ref.cpu()), f"{(got != ref).sum().item()} of {got.numel()} indices differ"
    assert torch.equal(got.cpu(), select_top_k_reference(u, contexts, **kw))
    assert (got >= 0).any() and (got == -1).any()  # both kinds of entry occur in every case


def test_non_contiguous_inputs_and_no_contexts(one_thread):
    u, contexts, kw = case_inputs("k_above_n")
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] view with H outermost
    assert not u_t.is_contiguous()
    assert torch.equal(select_top_k_triton(u_t, contexts, **kw), select_top_k(u, contexts, **kw))
    empty = select_top_k_triton(u, contexts[:, :0], **kw)
    assert empty.shape == (*u.shape[:3], kw["top_k"]) and (empty == -1).all()


def test_a_program_that_is_not_launched_leaves_the_sentinel(monkeypatch, one_thread):
    """The sentinel catches unwritten outputs: with one program fewer in the grid (the last token block's), the
    result holds UNWRITTEN exactly in that block's rows."""
    u, contexts, kw = case_inputs("k1")
    real = select_topk.select_top_k_fwd_kernel

    class Short:
        def __getitem__(self, grid):
            return real[(grid[0] - 1, *grid[1:])]

    monkeypatch.setattr(select_topk, "select_top_k_fwd_kernel", Short())
    got = select_top_k_triton(u, contexts, **kw)
    block_t = select_topk._meta(u, contexts, kw["top_k"])[0]["BLOCK_T"]
    last = (u.shape[1] - 1) // block_t * block_t
    assert (got[:, last:] == UNWRITTEN).all() and not (got[:, :last] == UNWRITTEN).any()


@triton.jit
def _first_max_kernel(x_ptr, value_ptr, index_ptr, N: tl.constexpr):
    row = tl.program_id(0)
    x = tl.load(x_ptr + row * N + tl.arange(0, N))
    value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(value_ptr + row, value)
    tl.store(index_ptr + row, index)


def test_max_with_indices_takes_the_first_of_equal_values():
    """The kernel relies on tl.max(..., return_indices_tie_break_left=True) returning the lowest index among equal
    maxima, for finite and for −inf rows (Triton 3.6; the interpreter uses numpy's argmax)."""
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0, 1.0] * 2,
                      [-1.0] * 15 + [2.0],
                      [float("-inf")] * 16,
                      [0.0] * 5 + [4.0] * 11], device=DEVICE)
    value = torch.empty(4, device=DEVICE)
    index = torch.empty(4, dtype=torch.int32, device=DEVICE)
    _first_max_kernel[(4,)](x, value, index, N=16)
    assert index.tolist() == [1, 15, 0, 5]
    assert value.tolist() == [3.0, 2.0, float("-inf"), 4.0]


def test_custom_op_passes_opcheck(one_thread):
    u, contexts, kw = case_inputs("k1")
    args = (u[:, :20], contexts[:, :12], kw["segment_len"], 2, GATE_SCALE, 3)
    result = torch.library.opcheck(torch.ops.mcdist.select_top_k_triton.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_custom_op_under_torch_compile(one_thread):
    u, contexts, kw = case_inputs("k1")

    def select_and_shift(u, contexts):
        return select_top_k_triton(u, contexts, **kw) + 1

    compiled = torch.compile(select_and_shift, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(u, contexts), select_and_shift(u, contexts))


def test_argument_errors():
    u, contexts, kw = case_inputs("k1")
    with pytest.raises(ValueError, match="dtype torch.float64"):
        select_top_k_triton(u.double(), contexts, **kw)
    with pytest.raises(ValueError, match="top_k = 0"):
        select_top_k_triton(u, contexts, **dict(kw, top_k=0))
    with pytest.raises(ValueError, match="same B, H, D"):
        select_top_k_triton(u, contexts[..., :3], **kw)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch: select_top_k(impl=..., select=...)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = select_topk.select_top_k_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(select_topk, "select_top_k_triton", spy)
    return calls


def test_select_routes_to_the_kernel_only_for_triton_and_fused(kernel_calls, one_thread):
    u, contexts, kw = case_inputs("k1")
    ref = select_top_k(u, contexts, **kw)
    assert torch.equal(select_top_k(u, contexts, **kw, impl="triton"), ref) and not kernel_calls  # default 'sort'
    assert torch.equal(select_top_k(u, contexts, **kw, impl="triton", select="sort"), ref) and not kernel_calls
    for impl in ("chunked", "reference"):
        assert torch.equal(select_top_k(u, contexts, **kw, impl=impl, select="fused"), ref) and not kernel_calls
    assert torch.equal(select_top_k(u, contexts, **kw, impl="triton", select="fused"), ref) and len(kernel_calls) == 1
    assert kernel_calls[0]["query_offset"] == kw["query_offset"]


def test_a_bad_select_is_named():
    u, contexts, kw = case_inputs("k1")
    for impl in ("chunked", "triton"):  # checked on every call, whichever path it would take
        with pytest.raises(ValueError, match="select = 'fuse'; expected one of 'sort', 'fused'"):
            select_top_k(u, contexts, **kw, impl=impl, select="fuse")


def select_by_default(monkeypatch, choice):
    """Make ``choice`` the default ``select`` of ops.select_top_k: the layer and decoding do not pass the variant,
    so this is how a test runs them with the fused kernel (the function object itself changes, however it was
    imported; monkeypatch restores it)."""
    defaults = dict(ops.select_top_k.__kwdefaults__, select=choice)
    monkeypatch.setattr(ops.select_top_k, "__kwdefaults__", defaults)


def test_layer_output_is_the_same_with_fused_and_sort(monkeypatch, kernel_calls, one_thread):
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=2, memory="linear", aggregation="ssc", segment_len=16, chunk_len=16,
                         top_k=2)
    layer = MemoryCachingLayer(config).to(DEVICE)
    x = torch.randn(1, 80, config.d_model, device=DEVICE)
    outputs = {}
    with torch.no_grad():
        for choice in ("sort", "fused"):
            select_by_default(monkeypatch, choice)
            outputs[choice] = layer(x, impl="triton")
    assert len(kernel_calls) == 1  # the fused run called the kernel, the sort run did not
    assert torch.equal(outputs["fused"], outputs["sort"])


def test_decoding_is_the_same_with_fused_and_sort(monkeypatch, kernel_calls, one_thread):
    """mcdist.infer passes its impl to the selection too: prefill, then one token at a time (query_offset at the
    end of the closed segments)."""
    from mcdist.infer import Session
    from mcdist.model import MCLanguageModel

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, memory="gated", aggregation="ssc",
                         segment_len=16, chunk_len=16, top_k=2)
    model = MCLanguageModel(config).to(DEVICE)
    ids = torch.randint(0, 32, (1, 52), device=DEVICE)
    logits = {}
    with torch.no_grad():
        for choice in ("sort", "fused"):
            select_by_default(monkeypatch, choice)
            session = Session(model, impl="triton")
            steps = [session.prefill(ids[:, :30])] + [session.decode(ids[:, t]) for t in range(30, 51)]
            logits[choice] = torch.stack(steps, 1)
    assert len(kernel_calls) == 22  # the fused run's prefill and 21 decoded tokens
    assert torch.equal(logits["fused"], logits["sort"])


def test_gpu_script_select_rows_run_on_cpu(one_thread):
    """benchmarks/gpu.py's ssc rows at a tiny shape under the interpreter: both selections timed on the same
    inputs, and their comparison (equal on integer-valued scores, no token differing here)."""
    import importlib.util
    from pathlib import Path

    import torch.nn.functional as F

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("mcdist_gpu_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = dict(ops.select_top_k.__kwdefaults__)
    q, k, v, u = (torch.randn(1, 192, 1, 16, device=DEVICE) for _ in range(4))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    rows = module.ssc_read_bench(q, k, v, u, torch.randn(1, 192, 1, 16, device=DEVICE), 64, torch.float32, 1.0,
                                 DEVICE, top_k=2)
    assert [row["kind"] for row in rows] == ["read-ssc-blocks", "read-ssc-gather", "ssc-select-sort",
                                             "ssc-select-fused"]
    assert not any("error" in row for row in rows), rows
    fused = rows[-1]
    assert fused["tied_inputs_equal"] and fused["tokens_differing"] == 0 and fused["tokens"] == 192
    assert ops.select_top_k.__kwdefaults__ == defaults  # the script passes its choice, never changes the default
