"""GPU check and benchmark of the Triton cached read (mcdist.kernels.cached_read).

    python benchmarks/gpu_cached_read.py [--skip-check] [--skip-bench] [--ptxas] [--json runs/gpu_cached_read.json]

``check(device)``: float32 (FP32_DOT_PRECISION as set, and "tf32x3") and bfloat16 correctness against a float64
PyTorch reference at a modest shape (out, lse and every gradient, printed as relative errors), under every tile set
of BENCH_TILES. ``check("cpu")`` runs a tiny shape under the Triton interpreter (TRITON_INTERPRET=1 must be set
before triton is imported). ``bench(device)``: forward, forward+backward and backward (their difference) times
(triton.testing.do_bench) for B=1, H=16, D in {64, 128}, C=256, T in {8K, 32K, 128K}, bfloat16 states, grm (every
earlier segment) and ssc (K=8 random earlier segments per token), the backward under each tile set of BENCH_TILES
side by side with its speed-up over the previous tiles. ``compile_table()`` (``--ptxas``, no GPU needed): registers,
spills and shared memory of every kernel for sm_90. Does not import ray.

FLOP convention: 2·Dout·Din per visible (token, state) pair for the forward (M_j z_t), three times that for
forward+backward (M_j z_t; M_jᵀ dout_t; dout_t z_tᵀ) and twice for the backward; the backward's recomputation of
M_j z_t is not counted."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import torch

DENSE_BF16_TFLOPS = 790.0  # reference peak used for the "fraction of dense bf16" column

# Tile sets timed side by side (mcdist.kernels.cached_read.TILE_OVERRIDES): the choice before BLOCK_S (one state
# per dM/dc program, 64-token dz/du blocks), _meta's current one, and a candidate that compiles without spills for
# bf16 at D = 64 only (BENCH_TILES_ONLY_D). The forward is the same under all of them.
BENCH_TILES = {"previous": {"heuristics": "previous"}, "current": {},
               "dmdc_s4_t16": {"dmdc": {"BLOCK_S": 4, "BLOCK_T": 16}}}
BENCH_TILES_ONLY_D = {"dmdc_s4_t16": (64,)}


def _reference(z, u, states, contexts, *, segment_len, gate_scale, query_offset=0, segment_offset=0,
               selected=None):
    """Dense float64 read: all scores, masked softmax, every state applied to every token. Small shapes only."""
    B, T, H, _ = z.shape
    n = states.shape[1]
    own = (torch.arange(T, device=z.device) + query_offset) // segment_len  # [T]
    index = torch.arange(n, device=z.device) + segment_offset  # [n]
    mask = (index[None, :] < own[:, None])[None, :, None, :].expand(B, T, H, n)  # [B, T, H, n]
    if selected is not None:
        mask = mask & (selected[..., None, :] == index[:, None]).any(-1)
    scores = gate_scale * torch.einsum("bthc,bnhc->bthn", u, contexts)
    seen = mask.any(-1)
    peak = torch.where(mask, scores, float("-inf")).amax(-1).detach()
    peak = torch.where(seen, peak, torch.zeros_like(peak))
    weight = torch.where(mask, torch.exp(torch.where(mask, scores, peak[..., None]) - peak[..., None]), 0.0)
    total = torch.where(seen, weight.sum(-1), torch.ones_like(peak))
    lse = torch.where(seen, peak + torch.log(total), float("-inf"))
    reads = torch.einsum("bnhoi,bthi->bthno", states, z)  # [B, T, H, n, Dout]
    out = torch.einsum("bthn,bthno->btho", weight / total[..., None], reads)
    return out, lse


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    if torch.isnan(x).any():
        return float("nan")
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(x), finite):
        return float("inf")
    return ((x[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)).item()


def random_selection(B, T, H, n, k, *, segment_len, device, query_offset=0, generator=None, chunk=8192):
    """[B, T, H, k] int64: k distinct random earlier segments (global indices < n) per token, −1 where fewer."""
    out = torch.empty(B, T, H, k, dtype=torch.int64, device=device)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        own = (torch.arange(start, stop, device=device) + query_offset) // segment_len  # [t]
        keys = torch.rand(B, stop - start, H, n, device=device, generator=generator)
        visible = torch.arange(n, device=device)[None, :] < own[:, None]  # [t, n]
        keys = keys.masked_fill(~visible[None, :, None, :], -1.0)
        width = min(k, n)
        value, index = keys.topk(width, dim=-1)
        index = torch.where(value >= 0, index, torch.full_like(index, -1))
        if width < k:
            index = torch.nn.functional.pad(index, (0, k - width), value=-1)
        out[:, start:stop] = index
    return out


def check(device="cuda", tiles=None) -> dict:
    """Correctness of forward and backward in float32 and bfloat16 against float64; prints relative errors. The
    current tiles run every case; the other tile sets of ``tiles`` (default: BENCH_TILES on CUDA, two states per
    dM/dc program on the CPU) run the bfloat16 ones.

    Returns:
        {"ok": bool, "errors": {"fp32" | "fp32_precise" | "bf16": {"grm/out": rel_err, ...}}, "bounds": {...},
         "shape": {...}, "device": str}; keys of tile sets other than "current" start with "<name>:".
    """
    from mcdist.kernels import cached_read

    device = torch.device(device)
    if device.type == "cuda":
        shape = dict(B=2, T=1000, H=4, din=64, dout=128, dc=64, segment_len=64, query_offset=64, segment_offset=1)
    else:  # the interpreter is slow: tiny shape
        shape = dict(B=1, T=37, H=2, din=16, dout=32, dc=8, segment_len=8, query_offset=8, segment_offset=1)
    B, T, H = shape["B"], shape["T"], shape["H"]
    din, dout, dc, C = shape["din"], shape["dout"], shape["dc"], shape["segment_len"]
    n = (shape["query_offset"] + T) // C - shape["segment_offset"]  # up to the last closed segment
    gen = torch.Generator(device="cpu").manual_seed(0)
    base = dict(
        z=torch.randn(B, T, H, din, generator=gen),
        u=torch.randn(B, T, H, dc, generator=gen),
        states=torch.randn(B, n, H, dout, din, generator=gen) / math.sqrt(din),
        contexts=torch.randn(B, n, H, dc, generator=gen),
    )
    g_out = torch.randn(B, T, H, dout, generator=gen, dtype=torch.float64).to(device)
    g_lse = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(device)
    selected = random_selection(B, T, H, n + shape["segment_offset"], 4, segment_len=C, device="cpu",
                                query_offset=shape["query_offset"], generator=gen).to(device)
    # bf16: inputs are rounded to bf16, the reference reads the same rounded values; the backward rounds dout and
    # the stored gradients to bf16. fp32: float32 inputs with the module's FP32_DOT_PRECISION as set (default
    # "tf32x3"; bound for "bf16" operands); fp32_precise: "tf32x3". The interpreter (CPU) multiplies in float32.
    bounds = {"fp32": 2e-2, "fp32_precise": 1e-4, "bf16": 2e-2}
    dtypes = {"fp32": torch.float32, "fp32_precise": torch.float32, "bf16": torch.bfloat16}
    if tiles is None:
        tiles = BENCH_TILES if device.type == "cuda" else {"current": {}, "dmdc_s2": {"dmdc": {"BLOCK_S": 2}}}
    errors = {}
    default_precision, default_tiles = cached_read.FP32_DOT_PRECISION, cached_read.TILE_OVERRIDES
    for (label, dtype), (tile_name, overrides) in itertools.product(dtypes.items(), tiles.items()):
        if tile_name != "current" and label != "bf16":
            continue  # the other tile sets are about 16-bit operands; with "tf32x3" float32 operands they may not
            # fit in shared memory (four 64×128 states at BLOCK_T = 32 need 273 KiB)
        cached_read.FP32_DOT_PRECISION = "tf32x3" if label == "fp32_precise" else default_precision
        cached_read.TILE_OVERRIDES = overrides
        prefix = "" if tile_name == "current" else f"{tile_name}:"
        try:
            for mode, sel in (("grm", None), ("ssc", selected)):
                inputs = [base[k].to(device=device, dtype=dtype) for k in ("z", "u", "states", "contexts")]
                kw = dict(segment_len=C, gate_scale=1 / math.sqrt(dc), query_offset=shape["query_offset"],
                          segment_offset=shape["segment_offset"], selected=sel)
                leaves = [x.clone().requires_grad_() for x in inputs]
                out, lse = cached_read.cached_read_triton(*leaves, **kw)
                grads = torch.autograd.grad((out, lse), leaves, (g_out.float(), g_lse.float()))
                ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
                ref_out, ref_lse = _reference(*ref_leaves, **kw)
                ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (g_out, g_lse))
                errs = {"out": _rel(out, ref_out), "lse": _rel(lse, ref_lse)}
                for name, g, rg in zip(("dz", "du", "dstates", "dcontexts"), grads, ref_grads):
                    errs[name] = _rel(g, rg)
                errors.setdefault(label, {}).update({f"{prefix}{mode}/{name}": v for name, v in errs.items()})
                print(f"check {label:12s} {tile_name:12s} {mode}: "
                      + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
        finally:
            cached_read.FP32_DOT_PRECISION, cached_read.TILE_OVERRIDES = default_precision, default_tiles
    ok = all(math.isfinite(v) and v < bounds[label] for label, errs in errors.items() for v in errs.values())
    print(f"check {'passed' if ok else 'FAILED'} (bounds {bounds})", flush=True)
    return {"ok": ok, "errors": errors, "bounds": bounds, "shape": shape, "device": str(device)}


def _visible_pairs(T, H, n, segment_len, selected):
    """Number of visible (token, state) pairs summed over heads (B = 1)."""
    if selected is not None:
        return int((selected >= 0).sum())  # distinct earlier segments by construction
    own = torch.arange(T) // segment_len
    return int(own.clamp(max=n).sum()) * H


def bench(device="cuda", *, seq_lens=(8192, 32768, 131072), head_dims=(64, 128), top_k=8, heads=16,
          segment_len=256, tiles=None) -> list:
    """Forward, forward+backward and backward (the difference) timings under each tile set of ``tiles`` (default
    BENCH_TILES); prints ms, TFLOP/s, the fraction of dense bf16 peak and the speed-up over "previous".

    Returns:
        list of dicts {mode, D, T, segments, pass ("fwd" | "fwd+bwd" | "bwd"), tiles, ms, tflops,
        fraction_of_dense_bf16, visible_pairs, speedup_vs_previous (fwd+bwd and bwd rows)}
    """
    import triton.testing

    from mcdist.kernels import cached_read

    tiles = BENCH_TILES if tiles is None else tiles
    B, H, C = 1, heads, segment_len
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    saved = cached_read.TILE_OVERRIDES
    try:
        for D in head_dims:
            for T in seq_lens:
                n = T // C
                z = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, generator=gen)
                u = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, generator=gen)
                states = (torch.randn(B, n, H, D, D, device=device, generator=gen) / math.sqrt(D)).to(torch.bfloat16)
                contexts = torch.randn(B, n, H, D, device=device, dtype=torch.bfloat16, generator=gen)
                leaves = [x.requires_grad_() for x in (z, u, states, contexts)]
                for mode in ("grm", "ssc"):
                    selected = (random_selection(B, T, H, n, top_k, segment_len=C, device=device, generator=gen)
                                if mode == "ssc" else None)
                    kw = dict(segment_len=C, gate_scale=1 / math.sqrt(D), selected=selected)
                    pairs = _visible_pairs(T, H, n, C, selected)
                    flops_fwd = 2.0 * D * D * pairs
                    out, lse = cached_read.cached_read_triton(*leaves, **kw)
                    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)

                    def fwd():
                        with torch.no_grad():
                            cached_read.cached_read_triton(*leaves, **kw)

                    def fwd_bwd():
                        o, s = cached_read.cached_read_triton(*leaves, **kw)
                        torch.autograd.grad((o, s), leaves, (g_out, g_lse))

                    def record(label, name, ms, flops, base=None):
                        tflops = flops / (ms * 1e-3) / 1e12
                        row = {"mode": mode, "D": D, "T": T, "segments": n, "pass": label, "tiles": name, "ms": ms,
                               "tflops": tflops, "fraction_of_dense_bf16": tflops / DENSE_BF16_TFLOPS,
                               "visible_pairs": pairs}
                        if base is not None:
                            row["speedup_vs_previous"] = base / ms
                        results.append(row)
                        speed = f"  {base / ms:5.2f}x previous" if base is not None else ""
                        print(f"{mode:3s} D={D:3d} T={T:6d} N={n:3d} {label:7s} {name:12s} {ms:9.3f} ms "
                              f"{tflops:7.1f} TFLOP/s  {100 * tflops / DENSE_BF16_TFLOPS:5.1f}% of "
                              f"{DENSE_BF16_TFLOPS:.0f}{speed}", flush=True)
                        return ms

                    cached_read.TILE_OVERRIDES = {}
                    fwd()  # compile outside the timing
                    ms_fwd = record("fwd", "all", triton.testing.do_bench(fwd, warmup=10, rep=50), flops_fwd)
                    base = {}
                    for name, overrides in tiles.items():
                        if D not in BENCH_TILES_ONLY_D.get(name, (D,)):
                            continue
                        cached_read.TILE_OVERRIDES = overrides
                        fwd_bwd()
                        ms = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50)
                        # the backward alone, as the difference: 2 of the 3 counted products
                        for label, value, flops in (("fwd+bwd", ms, 3 * flops_fwd),
                                                    ("bwd", ms - ms_fwd, 2 * flops_fwd)):
                            if name == "previous":  # first in BENCH_TILES: the others are compared with it
                                base[label] = value
                            record(label, name, value, flops, base.get(label))
                    del out, lse, g_out, g_lse, selected
                del z, u, states, contexts, leaves
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    finally:
        cached_read.TILE_OVERRIDES = saved
    return results


def _ptxas_usage(fn, meta, launch, dtypes):
    """(registers, spill bytes, shared bytes) of one kernel compiled for sm_90a: Triton's compiler, then its bundled
    ptxas -v on the PTX (no GPU needed). Pointers are marked 16-byte aligned, as a real launch of contiguous
    tensors specialises them."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[name] = "constexpr", meta[name]
        elif name.endswith("_ptr"):
            signature[name], attrs[(i,)] = "*" + dtypes.get(name, dtypes["*"]), [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "gate_scale" else "i32"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(launch))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", str(ptx), "-o",
                              str(Path(tmp) / "kernel.o")], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))
    return registers, spills, kernel.metadata.shared


def compile_table(*, head_dims=(64, 128), tiles=None, kernels=("fwd", "dzdu", "dmdc")) -> list:
    """Registers, spills and shared memory of the cached-read kernels for sm_90 (Hopper), without a GPU.

    For D in ``head_dims`` (Din = Dout = Dc = D), bf16 and float32 inputs (FP32_DOT_PRECISION as set, "tf32x3" by
    default), grm and ssc (K = 8), under each named TILE_OVERRIDES of ``tiles`` (default: the previous and the
    current heuristics). Must run without TRITON_INTERPRET=1.

    Returns:
        list of dicts {tiles, kernel, dtype, D, mode, BLOCK_T, BLOCK_S, num_warps, num_stages, regs, spill_bytes,
        smem_bytes}
    """
    from mcdist.kernels import cached_read

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_table compiles for sm_90: run it without TRITON_INTERPRET=1")
    tiles = tiles or {"previous": {"heuristics": "previous"}, "current": {}}
    functions = {"fwd": cached_read.cached_read_fwd_kernel, "dzdu": cached_read.cached_read_bwd_kernel_dzdu,
                 "dmdc": cached_read.cached_read_bwd_kernel_dmdc}
    rows, saved = [], cached_read.TILE_OVERRIDES
    try:
        for label, overrides in tiles.items():
            cached_read.TILE_OVERRIDES = overrides
            for D in head_dims:
                for dtype in (torch.bfloat16, torch.float32):
                    for mode in ("grm", "ssc"):
                        z = torch.empty(1, 1, 1, D, dtype=dtype, device="meta")
                        states = torch.empty(1, 1, 1, D, D, dtype=dtype, device="meta")
                        selected = torch.empty(1, 1, 1, 8, dtype=torch.int64, device="meta") if mode == "ssc" else None
                        for kernel in kernels:
                            meta, launch = cached_read._meta(z, states, z, selected, kernel)
                            name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
                            regs, spill, smem = _ptxas_usage(
                                functions[kernel], meta, launch,
                                {"*": name, "selected_ptr": "i64", "lse_ptr": "fp32", "delta_ptr": "fp32",
                                 "out_ptr": "fp32", "dout_ptr": str(meta["DOT_DTYPE"])})
                            row = {"tiles": label, "kernel": kernel, "dtype": name, "D": D, "mode": mode,
                                   "BLOCK_T": meta["BLOCK_T"], "BLOCK_S": meta.get("BLOCK_S", 1), **launch,
                                   "regs": regs, "spill_bytes": spill, "smem_bytes": smem}
                            rows.append(row)
                            print(f"{label:9s} {kernel:4s} {name} D={D:3d} {mode} BLOCK_T={row['BLOCK_T']:3d} "
                                  f"BLOCK_S={row['BLOCK_S']} warps={launch.get('num_warps')} "
                                  f"stages={launch.get('num_stages')}: {regs} regs, {spill} B spilled, "
                                  f"{smem / 1024:.0f} KiB shared", flush=True)
    finally:
        cached_read.TILE_OVERRIDES = saved
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--ptxas", action="store_true", help="also compile every kernel for sm_90 (no GPU needed)")
    parser.add_argument("--json", default=os.path.join("runs", "gpu_cached_read.json"))
    args = parser.parse_args()
    report = {"torch": torch.__version__, "tiles": BENCH_TILES}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    start = time.time()
    if args.ptxas:
        report["ptxas"] = compile_table()
    if not args.skip_check:
        report["check"] = check(args.device)
    if not args.skip_bench:
        report["bench"] = bench(args.device)
    report["seconds"] = time.time() - start
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    if "check" in report and not report["check"]["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
