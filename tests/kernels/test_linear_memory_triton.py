"""Triton linear memory kernel (run by the Triton interpreter on CPU) against a float64 token loop."""

import os
import re

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from checks import assert_rel_close  # noqa: E402
from mcdist.kernels import linear_memory as lm  # noqa: E402
from mcdist.kernels.linear_memory import linear_memory_triton  # noqa: E402

FP32_BOUND = 1e-5  # the interpreter's tl.dot is exact fp32, so only summation order differs from the loop


def token_loop(q, k, v, log_decay, segment_len, state_init, initial_state):
    """M_t = exp(g_t) M_{t-1} + v_t k_tᵀ, o_t = M_t q_t, token by token, in the inputs' dtype (float64 here)."""
    B, T, H, D = q.shape
    zeros = q.new_zeros(B, H, D, D)
    state = initial_state if initial_state is not None else zeros  # [B, H, D, D]
    outs, cached = [], []
    for t in range(T):
        if state_init == "independent" and t % segment_len == 0:
            state = zeros
        if log_decay is not None:
            state = torch.exp(log_decay[:, t])[:, :, None, None] * state
        state = state + v[:, t, :, :, None] * k[:, t, :, None, :]
        outs.append(torch.einsum("bhij,bhj->bhi", state, q[:, t]))
        if (t + 1) % segment_len == 0 or t == T - 1:
            cached.append(state)
    return torch.stack(outs, 1), torch.stack(cached, 1), state


def make_inputs(B, T, H, D, gated, state_init, dtype=torch.float32, with_initial=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (0.5 * torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    # Decays mostly in (0.85, 1) so that states carry information across several chunks and segments.
    log_decay = F.logsigmoid(3.0 + 0.7 * torch.randn(B, T, H, generator=gen)) if gated else None
    initial = (0.3 * torch.randn(B, H, D, D, generator=gen)
               if state_init == "checkpoint" and with_initial else None)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_decay, initial


def run_both(q, k, v, log_decay, initial, segment_len, chunk_len, state_init, seed=1, walk="sequential"):
    """Forward + backward of the kernel and of the float64 loop with the same random upstream gradients."""
    inputs = [x for x in (q, k, v, log_decay, initial) if x is not None]
    kernel_in = [x.clone().requires_grad_() for x in inputs]
    ref_in = [x.detach().double().requires_grad_() for x in inputs]

    def unpack(xs):
        it = iter(xs)
        return [next(it) if x is not None else None for x in (q, k, v, log_decay, initial)]

    kq, kk, kv, kg, ki = unpack(kernel_in)
    out = linear_memory_triton(kq, kk, kv, kg, segment_len=segment_len, chunk_len=chunk_len,
                               state_init=state_init, initial_state=ki, walk=walk)
    rq, rk, rv, rg, ri = unpack(ref_in)
    ref = token_loop(rq, rk, rv, rg, segment_len, state_init, ri)

    gen = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref]
    grads = torch.autograd.grad(out, kernel_in, [u.to(o.dtype) for u, o in zip(upstream, out)])
    ref_grads = torch.autograd.grad(ref, ref_in, upstream)
    names = [n for n, x in zip(("q", "k", "v", "log_decay", "initial_state"), (q, k, v, log_decay, initial))
             if x is not None]
    return out, ref, dict(zip(names, grads)), dict(zip(names, ref_grads))


CASES = [
    # (id, B, T, H, D, segment_len, chunk_len, max tile of the parallel kernels, max tile of the sequential ones)
    ("D16-partial-last-segment", 2, 112, 2, 16, 32, 16, 64, 32),  # 3.5 segments of 2 chunks
    ("D32-8-segments", 2, 128, 2, 32, 16, 16, 64, 16),  # one chunk per segment; the walk uses 2×2 tiles
    ("D32-tiled-2x2", 2, 96, 2, 32, 48, 16, 16, 16),  # every kernel on 2×2 tiles of 16
    ("D24-ragged-tiles", 2, 80, 2, 24, 64, 16, 16, 16),  # D not a multiple of the tile: masked tiles
]


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gated"])
@pytest.mark.parametrize("state_init", ["checkpoint", "independent"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_token_loop(case, state_init, gated, monkeypatch):
    _, B, T, H, D, segment_len, chunk_len, max_block, max_state_block = case
    monkeypatch.setattr(lm, "_MAX_BLOCK_D", max_block)
    monkeypatch.setattr(lm, "_MAX_STATE_BLOCK_D", max_state_block)
    q, k, v, log_decay, initial = make_inputs(B, T, H, D, gated, state_init, seed=T + D)
    out, ref, grads, ref_grads = run_both(q, k, v, log_decay, initial, segment_len, chunk_len, state_init)

    num_segments = -(-T // segment_len)
    assert out[0].shape == (B, T, H, D) and out[0].dtype == torch.float32
    assert out[1].shape == (B, num_segments, H, D, D) and out[1].dtype == torch.float32
    assert out[2].shape == (B, H, D, D) and out[2].dtype == torch.float32
    assert_rel_close(out, ref, FP32_BOUND, "(online_out, cached_states, final_state)")
    assert_rel_close(grads, ref_grads, FP32_BOUND, "gradients")


# Scan walk: each case once, so that together they cover linear and gated, both state_init, initial_state given,
# a partial last segment, one chunk per segment, several term tiles and several (and ragged) blocks of the
# elementwise loop (the scan block is lowered to 128 floats: 2, 8 and 4.5 blocks at D = 16, 32, 24).
SCAN_CASES = [
    ("D16-partial-last-segment", "checkpoint", True),
    ("D16-partial-last-segment", "independent", False),
    ("D32-8-segments", "independent", True),
    ("D24-ragged-tiles", "checkpoint", False),
]
WALKS_AGREE = 1e-6  # both walks run the same products; only the order of float32 sums differs


@pytest.mark.parametrize("case_id,state_init,gated", SCAN_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'gated' if c[2] else 'linear'}" for c in SCAN_CASES])
def test_scan_walk_matches_token_loop_and_sequential_walk(case_id, state_init, gated, monkeypatch):
    _, B, T, H, D, segment_len, chunk_len, max_block, max_state_block = next(c for c in CASES if c[0] == case_id)
    monkeypatch.setattr(lm, "_MAX_BLOCK_D", max_block)
    monkeypatch.setattr(lm, "_MAX_STATE_BLOCK_D", max_state_block)
    monkeypatch.setattr(lm, "_MAX_SCAN_BLOCK", 128)
    q, k, v, log_decay, initial = make_inputs(B, T, H, D, gated, state_init, seed=T + D + 1)
    results = {}
    for walk in lm.WALKS:
        results[walk] = run_both(q, k, v, log_decay, initial, segment_len, chunk_len, state_init, walk=walk)

    out, ref, grads, ref_grads = results["scan"]
    assert_rel_close(out, ref, FP32_BOUND, "(online_out, cached_states, final_state)")
    assert_rel_close(grads, ref_grads, FP32_BOUND, "gradients")
    seq_out, _, seq_grads, _ = results["sequential"]
    assert_rel_close(out + tuple(grads.values()), seq_out + tuple(seq_grads.values()), WALKS_AGREE,
                     "scan against sequential (outputs, gradients)")


def test_a_walk_outside_walks_is_refused_by_name():
    """The walk is an argument (no environment variable, no module global); a value outside WALKS raises, from the
    kernel wrapper and from mcdist.ops.linear_memory alike, naming it."""
    from mcdist import ops

    assert not hasattr(lm, "WALK")
    args = _good_args()
    q, k, v, log_decay = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay")
    with pytest.raises(ValueError, match=re.escape("walk = 'tree'; expected one of 'sequential', 'scan'")):
        linear_memory_triton(q, k, v, log_decay, walk="tree", **args)
    with pytest.raises(ValueError, match=re.escape("walk = 'tree'; expected one of 'sequential', 'scan'")):
        ops.linear_memory(q, k, v, log_decay, impl="triton", walk="tree", **args)


@pytest.mark.parametrize("walk", ["sequential", "scan"])
def test_checkpoint_without_initial_state_starts_from_zeros(walk):
    q, k, v, log_decay, _ = make_inputs(1, 64, 2, 16, True, "checkpoint", with_initial=False, seed=3)
    out, ref, grads, ref_grads = run_both(q, k, v, log_decay, None, 32, 16, "checkpoint", walk=walk)
    assert_rel_close(out, ref, FP32_BOUND, "(online_out, cached_states, final_state)")
    assert_rel_close(grads, ref_grads, FP32_BOUND, "gradients")


@pytest.mark.parametrize("walk", ["sequential", "scan"])
def test_gradient_from_online_out_only(walk):
    """Unused outputs give no gradient tensors to the backward; they must count as zeros."""
    q, k, v, log_decay, initial = make_inputs(1, 48, 1, 16, True, "checkpoint", seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_decay, initial)]
    out, _, _ = linear_memory_triton(*leaves[:4], segment_len=16, chunk_len=16, state_init="checkpoint",
                                     initial_state=leaves[4], walk=walk)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, log_decay, initial)]
    ref_out, _, _ = token_loop(*ref_leaves[:4], 16, "checkpoint", ref_leaves[4])
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref_leaves)
    assert_rel_close(grads, ref_grads, FP32_BOUND, "gradients")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    q, k, v, log_decay, initial = make_inputs(1, 64, 2, 16, True, "checkpoint", dtype=dtype, seed=7)
    out, ref, grads, ref_grads = run_both(q, k, v, log_decay, initial, 32, 16, "checkpoint")
    assert out[0].dtype == dtype
    assert_rel_close(out[0], ref[0], 1e-2, "online_out")  # one rounding of the output to 16 bits
    assert_rel_close(out[1], ref[1], FP32_BOUND, "cached_states")
    assert_rel_close(out[2], ref[2], FP32_BOUND, "final_state")
    for name in ref_grads:
        assert grads[name].dtype == (dtype if name in ("q", "k", "v") else torch.float32)
    assert_rel_close(grads, ref_grads, 1e-2, "gradients")


def test_matches_library_paths():
    """Kernel ↔ mcdist.ops.linear_memory (chunked fast path and token loop), forward and gradients, in float32."""
    from mcdist import ops
    for state_init in ("checkpoint", "independent"):
        q, k, v, log_decay, initial = make_inputs(2, 96, 2, 16, True, state_init, seed=11)
        leaves = [x for x in (q, k, v, log_decay, initial) if x is not None]
        gen = torch.Generator().manual_seed(12)
        results = {}
        for name, fn in (("triton", linear_memory_triton), ("chunked", ops.linear_memory_chunked),
                         ("reference", ops.linear_memory_reference)):
            xs = [x.clone().requires_grad_() for x in leaves]
            ini = xs[4] if initial is not None else None
            out = tuple(fn(xs[0], xs[1], xs[2], xs[3], segment_len=32, chunk_len=16, state_init=state_init,
                           initial_state=ini))
            if not results:
                upstream = [torch.randn(o.shape, generator=gen) for o in out]
            results[name] = (out, torch.autograd.grad(out, xs, upstream))
        for other in ("chunked", "reference"):
            assert_rel_close(results["triton"][0] + results["triton"][1], results[other][0] + results[other][1],
                             FP32_BOUND, f"{state_init}: triton against {other} (outputs, gradients)")


def test_torch_library_registration():
    q, k, v, log_decay, initial = make_inputs(1, 32, 1, 16, True, "checkpoint", seed=13)
    args = tuple(x.requires_grad_() for x in (q, k, v, log_decay, initial)) + (16, 16, False, "sequential")
    torch.library.opcheck(lm._linear_memory_op, args)


def test_torch_compile_fullgraph():
    q, k, v, log_decay, _ = make_inputs(1, 32, 1, 16, True, "independent", seed=17)

    def step(q, k, v, g):
        out, cached, final = linear_memory_triton(q, k, v, g, segment_len=16, chunk_len=16,
                                                  state_init="independent")
        return out.square().sum() + cached.sum() + final.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_decay)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    eager_leaves = [x.clone().requires_grad_() for x in (q, k, v, log_decay)]
    eager_grads = torch.autograd.grad(step(*eager_leaves), eager_leaves)
    assert_rel_close(grads, eager_grads, FP32_BOUND, "gradients")


def _good_args():
    q, k, v, log_decay, initial = make_inputs(1, 32, 2, 16, True, "checkpoint")
    return dict(q=q, k=k, v=v, log_decay=log_decay, segment_len=32, chunk_len=16, state_init="checkpoint",
                initial_state=initial)


BAD_INPUTS = [
    ("T-not-multiple-of-chunk", dict(q=torch.zeros(1, 40, 2, 16), k=torch.zeros(1, 40, 2, 16),
                                     v=torch.zeros(1, 40, 2, 16), log_decay=None), "T=40, chunk_len=16"),
    ("chunk-not-dividing-segment", dict(segment_len=40), "segment_len=40, chunk_len=16"),
    ("chunk-not-power-of-two", dict(chunk_len=24, segment_len=48), "power of two"),
    ("chunk-too-small", dict(chunk_len=8, segment_len=32), "chunk_len must be a power of two >= 16"),
    ("bad-state-init", dict(state_init="carry"), "state_init must be one of"),
    ("initial-under-independent", dict(state_init="independent"), "initial_state must be None"),
    ("initial-shape", dict(initial_state=torch.zeros(1, 2, 16, 8)), "initial_state must be [B, H, D, D]"),
    ("k-shape", dict(k=torch.zeros(1, 32, 2, 8)), "same shape"),
    ("mixed-dtypes", dict(v=torch.zeros(1, 32, 2, 16, dtype=torch.float16)), "one dtype"),
    ("float64", dict(q=torch.zeros(1, 32, 2, 16, dtype=torch.float64), k=torch.zeros(1, 32, 2, 16, dtype=torch.float64),
                     v=torch.zeros(1, 32, 2, 16, dtype=torch.float64)), "float32, bfloat16, float16"),
    ("log-decay-shape", dict(log_decay=torch.zeros(1, 32, 3)), "log_decay must be [B, T, H]"),
    ("three-dims", dict(q=torch.zeros(32, 2, 16)), "q must be [B, T, H, D]"),
    ("segment-len-zero", dict(segment_len=0), "segment_len must be a positive int"),
]


@pytest.mark.parametrize("overrides,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise(overrides, match):
    args = _good_args()
    args.update(overrides)
    q, k, v, log_decay = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay")
    with pytest.raises(ValueError, match=re.escape(match)):
        linear_memory_triton(q, k, v, log_decay, **args)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _good_args()
    q, k, v, log_decay = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        linear_memory_triton(q, k, v, log_decay, **args)


def test_gpu_benchmark_check_runs_on_cpu():
    """benchmarks/gpu_linear_memory.py: check() of both walks under the interpreter at its tiny CPU shape."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_linear_memory.py"
    spec = importlib.util.spec_from_file_location("gpu_linear_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.check("cpu")
    oks = {key: v for key, v in results.items() if key.endswith("/ok")}
    assert len(oks) == 9 and all(oks.values()), results  # 3 cases × (sequential, scan, their agreement)
    assert {key.split("/")[0] for key in oks} == {"sequential", "scan", "walks"}
    timing = {"fwd_ms": 1.0, "fwd_tflops": 1.0, "fwd_bwd_ms": 4.0, "fwd_bwd_tflops": 1.0}
    table = module.walk_table([{"D": 64, "T": 8192, "memory": "gated", "sequential": timing, "scan": timing,
                                "fwd_ratio": 0.5, "fwd_bwd_ratio": 0.25}])
    assert "0.50" in table and "0.25" in table
