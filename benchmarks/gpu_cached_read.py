"""GPU check and benchmark of the Triton cached read (mcdist.kernels.cached_read).

    python benchmarks/gpu_cached_read.py [--skip-check] [--skip-bench] [--json runs/gpu_cached_read.json]

``check(device)``: float32 (default bf16 dot operands, and "tf32x3") and bfloat16 correctness against a float64
PyTorch reference at a modest shape (out, lse and every gradient, printed as relative errors). ``check("cpu")``
runs a tiny shape under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
``bench(device)``: forward and forward+backward times (triton.testing.do_bench) for B=1, H=16, D in {64, 128},
C=256, T in {8K, 32K, 128K}, bfloat16 states, grm (every earlier segment) and ssc (K=8 random earlier segments
per token). Does not import ray.

FLOP convention: 2·Dout·Din per visible (token, state) pair for the forward (M_j z_t), three times that for
forward+backward (M_j z_t; M_jᵀ dout_t; dout_t z_tᵀ); the backward's recomputation of M_j z_t is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

DENSE_BF16_TFLOPS = 790.0  # reference peak used for the "fraction of dense bf16" column


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


def check(device="cuda") -> dict:
    """Correctness of forward and backward in float32 and bfloat16 against float64; prints relative errors.

    Returns:
        {"ok": bool, "errors": {"fp32" | "fp32_precise" | "bf16": {"grm/out": rel_err, ...}}, "bounds": {...},
         "shape": {...}, "device": str}
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
    # the stored gradients to bf16. fp32: float32 inputs with the default FP32_DOT_PRECISION ("bf16" dot operands
    # on GPU); fp32_precise: the same with "tf32x3". The interpreter (CPU) always multiplies in float32.
    bounds = {"fp32": 2e-2, "fp32_precise": 1e-4, "bf16": 2e-2}
    dtypes = {"fp32": torch.float32, "fp32_precise": torch.float32, "bf16": torch.bfloat16}
    errors = {}
    default_precision = cached_read.FP32_DOT_PRECISION
    for label, dtype in dtypes.items():
        cached_read.FP32_DOT_PRECISION = "tf32x3" if label == "fp32_precise" else default_precision
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
                errors.setdefault(label, {}).update({f"{mode}/{name}": value for name, value in errs.items()})
                print(f"check {label:12s} {mode}: " + "  ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
        finally:
            cached_read.FP32_DOT_PRECISION = default_precision
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
          segment_len=256) -> list:
    """Forward and forward+backward timings; prints ms, TFLOP/s and the fraction of dense bf16 peak.

    Returns:
        list of dicts {mode, D, T, segments, pass, ms, tflops, fraction_of_dense_bf16}
    """
    import triton.testing

    from mcdist.kernels.cached_read import cached_read_triton

    B, H, C = 1, heads, segment_len
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
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
                out, lse = cached_read_triton(*leaves, **kw)
                g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)

                def fwd():
                    with torch.no_grad():
                        cached_read_triton(*leaves, **kw)

                def fwd_bwd():
                    o, s = cached_read_triton(*leaves, **kw)
                    torch.autograd.grad((o, s), leaves, (g_out, g_lse))

                for label, fn, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", fwd_bwd, 3 * flops_fwd)):
                    fn()  # compile outside the timing
                    ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                    tflops = flops / (ms * 1e-3) / 1e12
                    row = {"mode": mode, "D": D, "T": T, "segments": n, "pass": label, "ms": ms,
                           "tflops": tflops, "fraction_of_dense_bf16": tflops / DENSE_BF16_TFLOPS,
                           "visible_pairs": pairs}
                    results.append(row)
                    print(f"{mode:3s} D={D:3d} T={T:6d} N={n:3d} {label:7s} {ms:9.3f} ms  {tflops:7.1f} TFLOP/s  "
                          f"{100 * tflops / DENSE_BF16_TFLOPS:5.1f}% of {DENSE_BF16_TFLOPS:.0f}", flush=True)
                del out, lse, g_out, g_lse, selected
            del z, u, states, contexts, leaves
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--json", default=os.path.join("runs", "gpu_cached_read.json"))
    args = parser.parse_args()
    report = {"torch": torch.__version__}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    start = time.time()
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
