"""The GPU check and benchmark, one script for one lent GPU (issue: Triton kernels).

    python benchmarks/gpu.py --out DIR            # on a CUDA machine: checks, then benchmarks
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke --device cpu --out /tmp/x   # the script's logic, tiny

Sections (each guarded: a failure is printed and recorded, the rest still runs; results are written to
DIR/gpu.json after every section):
1. correctness of each kernel in bf16 and fp32 against float64 PyTorch references (the kernels' own check());
2. the MC layer with impl='triton' against impl='chunked' (outputs and gradients);
3. the MC core (memory pass + read) forward+backward for none / grm / ssc (k = 8) beside
   scaled_dot_product_attention (flash backend) at the same B, H, T, d: milliseconds, TFLOP/s and the ratio;
4. the kernels' own benchmarks.
Needs torch, triton, numpy; not ray, not an installed mcdist (it loads the repository in place).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = float("inf")  # wall-clock time after which remaining benchmark shapes are skipped (--budget-s)


def _load_repository() -> None:
    """Import mcdist from this checkout, with kernels/ as mcdist.kernels, without installing it."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import mcdist  # noqa: F401  (the package must load before its kernels are attached below)

    if "mcdist.kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location("mcdist.kernels", os.path.join(ROOT, "kernels", "__init__.py"),
                                                      submodule_search_locations=[os.path.join(ROOT, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["mcdist.kernels"] = module
        spec.loader.exec_module(module)


_load_repository()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mcdist import ops  # noqa: E402
from mcdist.aggregate import merge_partials, online_scores, segment_contexts, select_top_k  # noqa: E402
from mcdist.config import ModelConfig  # noqa: E402
from mcdist.layer import MemoryCachingLayer  # noqa: E402


def relative_error(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def timed(fn, device) -> float:
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


# -- 2. the layer end to end -----------------------------------------------------------------------------------


def layer_check(device, smoke) -> list:
    rows = []
    T = 96 if smoke else 1000  # not a multiple of the chunk: exercises the padding
    for memory, aggregation in [("gated", "grm"), ("linear", "ssc"), ("gated", "soup"), ("linear", "residual")]:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            config = ModelConfig(d_model=128 if not smoke else 32, n_heads=2, memory=memory, aggregation=aggregation,
                                 segment_len=64 if not smoke else 32, chunk_len=16, top_k=3)
            layer = MemoryCachingLayer(config).to(device)
            x = torch.randn(2, T, config.d_model, device=device)
            upstream = torch.randn(2, T, config.d_model, device=device)
            results = {}
            # reference: chunked in float32; then chunked and triton at the dtype under test, so the kernels'
            # own error shows beside the error of the dtype itself
            for name, impl, run_dtype in (("reference", "chunked", torch.float32), ("chunked", "chunked", dtype),
                                          ("triton", "triton", dtype)):
                xi = x.clone().to(run_dtype).requires_grad_()
                with torch.autocast(device_type=device, dtype=dtype, enabled=run_dtype != torch.float32):
                    y = layer(xi, impl=impl)
                layer.zero_grad()
                (y.float() * upstream).sum().backward()
                results[name] = (y.float(), xi.grad.float(), [p.grad.clone() for p in layer.parameters()])
            ref = results["reference"]
            row = dict(memory=memory, aggregation=aggregation, dtype=str(dtype).replace("torch.", ""))
            for name in ("chunked", "triton"):
                got = results[name]
                row[name] = dict(out=relative_error(got[0], ref[0]), grad_x=relative_error(got[1], ref[1]),
                                 grad_params=max(relative_error(a, b) for a, b in zip(got[2], ref[2])))
            print("layer", row, flush=True)
            rows.append(row)
    return rows


# -- 4. MC core vs SDPA ------------------------------------------------------------------------------------------


def mc_core(q, k, v, u, aggregation, segment_len, top_k, state_dtype):
    scale = 1.0 / math.sqrt(q.shape[-1])
    memory = ops.linear_memory(q, k, v, None, segment_len=segment_len, chunk_len=64, state_init="independent",
                               impl="triton")
    online = memory.online_out
    if aggregation == "none":
        return online
    closed, running = segment_contexts(k, segment_len, "mean")
    r_online = online_scores(u, running, scale)
    selected = None
    if aggregation == "ssc":
        selected = select_top_k(u, closed, segment_len=segment_len, top_k=top_k, gate_scale=scale)
    part = ops.cached_read(q, u, memory.cached_states.to(state_dtype), closed, segment_len=segment_len,
                           gate_scale=scale, selected=selected, impl="triton")
    return merge_partials(part, (online.float(), r_online))[0]


def core_flops(T, H, d, segment_len, aggregation, top_k, chunk=64):
    """Forward multiply-adds × 2 of the memory pass and the read (the backward is counted as 2× forward)."""
    memory = 2 * T * H * (2 * chunk * d + 2 * d * d)  # intra-chunk (qk, pv) + state update and read
    n = T // segment_len
    if aggregation == "none":
        read = 0
    elif aggregation == "grm":
        read = 2 * H * d * d * segment_len * n * (n - 1) / 2
    else:
        read = 2 * H * d * d * T * min(top_k, n)
    return 3 * (memory + read)


def core_bench(device, smoke) -> list:
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if smoke:
        shapes = [(64, 256, 32, 4)]
    else:
        shapes = [(256, 8192, 64, 16), (256, 16384, 64, 16), (256, 32768, 64, 16), (256, 65536, 64, 16),
                  (256, 131072, 64, 16), (256, 8192, 128, 16), (256, 32768, 128, 16), (256, 131072, 128, 16),
                  (1024, 32768, 64, 16), (1024, 131072, 64, 16)]
    for segment_len, T, d, H in shapes:
        if time.time() > DEADLINE:
            print(f"time budget spent: skipping T={T} d={d} C={segment_len} and later shapes", flush=True)
            rows.append(dict(kind="skipped", T=T, d=d, H=H, segment_len=segment_len, ms=float("nan"),
                             tflops=float("nan")))
            continue
        torch.manual_seed(0)
        q, k, v, u = (torch.randn(1, T, H, d, device=device, dtype=dtype) for _ in range(4))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        upstream = torch.randn(1, T, H, d, device=device, dtype=torch.float32)

        def sdpa():
            qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backends = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            out.float().backward(upstream.transpose(1, 2))

        try:
            sdpa_ms = timed(sdpa, device)
        except Exception as error:  # e.g. out of memory
            sdpa_ms = float("nan")
            print("sdpa failed", T, d, repr(error), flush=True)
        sdpa_flops = 3 * 2 * 2 * H * T * T * d / 2  # causal: half of QKᵀ and PV; backward ≈ 2× forward
        rows.append(dict(kind="sdpa", T=T, d=d, H=H, segment_len=segment_len, ms=sdpa_ms,
                         tflops=sdpa_flops / sdpa_ms / 1e9))
        print(rows[-1], flush=True)
        for aggregation in ("none", "grm", "ssc"):
            def run():
                leaves = [x.detach().requires_grad_() for x in (q, k, v, u)]
                y = mc_core(*leaves, aggregation, segment_len, 8, dtype)
                y.float().backward(upstream)

            try:
                ms = timed(run, device)
            except Exception as error:
                ms = float("nan")
                print("mc failed", aggregation, T, d, repr(error), flush=True)
            flops = core_flops(T, H, d, segment_len, aggregation, 8)
            rows.append(dict(kind=f"mc-{aggregation}", T=T, d=d, H=H, segment_len=segment_len, ms=ms,
                             tflops=flops / ms / 1e9, speedup_vs_sdpa=sdpa_ms / ms))
            print(rows[-1], flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def fla_compare(device) -> list:
    """Our chunked linear-memory kernel beside flash-linear-attention's chunk_simple_gla (the same recurrence,
    B = 1, H = 16, bf16), when fla can be imported (carried as a wheel; see docs/benchmarks.md). fla 0.6 refuses
    the gated backward on Hopper with Triton < 3.7.1 (its issue #640), so gated is timed forward only and the
    plain (ungated) recurrence forward + backward."""
    from fla.ops.simple_gla import chunk_simple_gla

    from mcdist.kernels.linear_memory import linear_memory_triton

    rows = []
    for d in (64, 128):
        for T in (8192, 32768, 131072):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, T, 16, d, device=device, dtype=torch.bfloat16) for _ in range(3))
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            g = F.logsigmoid(torch.randn(1, T, 16, device=device) + 4.0)
            upstream = torch.randn(1, T, 16, d, device=device, dtype=torch.bfloat16)

            def ours(gate, backward):
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                out = linear_memory_triton(*leaves, gate, segment_len=256, chunk_len=64, state_init="checkpoint")[0]
                if backward:
                    out.backward(upstream)

            def theirs(gate, backward):
                leaves = [x.detach().requires_grad_(backward) for x in (q, k, v)]
                out = chunk_simple_gla(*leaves, gate, scale=1.0)[0]
                if backward:
                    out.backward(upstream)

            for name, gate, backward in (("gated fwd", g, False), ("linear fwd+bwd", None, True)):
                with torch.no_grad():
                    agree = relative_error(
                        linear_memory_triton(q, k, v, gate, segment_len=256, chunk_len=64, state_init="checkpoint")[0],
                        chunk_simple_gla(q, k, v, gate, scale=1.0)[0])
                row = dict(case=name, T=T, d=d, ours_ms=timed(lambda: ours(gate, backward), device),
                           fla_ms=timed(lambda: theirs(gate, backward), device), output_rel_diff=agree)
                row["ours_over_fla"] = row["ours_ms"] / row["fla_ms"]
                print("fla", row, flush=True)
                rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script itself")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: checks,layer,core,fla,kernels")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new benchmark shapes/sections after this many seconds")
    args = parser.parse_args(argv)
    global DEADLINE
    DEADLINE = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    import triton

    report = dict(torch=torch.__version__, triton=triton.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", sections={}, errors={})
    print("device:", report["device"], "torch", report["torch"], "triton", report["triton"], flush=True)

    def section(name, fn):
        if name in skip:
            return
        if time.time() > DEADLINE:
            print(f"time budget spent: skipping section {name}", flush=True)
            report["errors"][name] = "skipped: time budget spent"
            return
        start = time.time()
        try:
            report["sections"][name] = fn()
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(f"section {name} FAILED:\n{report['errors'][name]}", flush=True)
        print(f"== {name}: {time.time() - start:.1f} s", flush=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as handle:
            json.dump(report, handle, indent=1, default=str)

    import gpu_cached_read
    import gpu_linear_memory

    section("checks", lambda: {"linear_memory": gpu_linear_memory.check(args.device),
                               "cached_read": gpu_cached_read.check(args.device)})
    section("layer", lambda: layer_check(args.device, args.smoke))
    section("core", lambda: core_bench(args.device, args.smoke))
    if not args.smoke:
        section("fla", lambda: fla_compare(args.device))
    if not args.smoke:
        section("kernels", lambda: {"linear_memory": gpu_linear_memory.bench(args.device),
                                    "cached_read": gpu_cached_read.bench(args.device)})
    print("\n%-10s %7s %4s %5s %9s %8s %8s" % ("kind", "T", "d", "C", "ms", "TFLOP/s", "vs SDPA"))
    for row in report["sections"].get("core", []):
        print("%-10s %7d %4d %5d %9.3f %8.1f %8s" % (row["kind"], row["T"], row["d"], row["segment_len"], row["ms"],
                                                   row["tflops"], "%.2fx" % row["speedup_vs_sdpa"]
                                                   if "speedup_vs_sdpa" in row else "-"))
    if report["errors"]:
        print("FAILED sections:", sorted(report["errors"]))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
