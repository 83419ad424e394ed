"""GPU check and benchmark of the Triton linear memory kernel (``mcdist.kernels.linear_memory``).

    python benchmarks/gpu_linear_memory.py [--check-only | --bench-only] [--json PATH]

Both state walks of the kernel (``mcdist.kernels.linear_memory.WALKS``: the sequential walk and the two-level
scan) run side by side. ``check(device)`` compares each (float32 and bfloat16 inputs) against a float64 chunked
reference: outputs, cached states, final state and every gradient, printing relative errors, and the two walks
against each other. ``bench(device)`` times forward and forward + backward of both walks with
``triton.testing.do_bench`` for B = 1, H = 16, D ∈ {64, 128}, T ∈ {8K, 32K, 128K}, C = 256, c = 64, bfloat16,
linear and gated memory, and prints a table with the ratio scan / sequential; about a minute of GPU time, most
of it Triton compilation.

On a machine without a GPU, ``check("cpu")`` runs the same logic under the Triton interpreter at a tiny shape
(the environment variable TRITON_INTERPRET=1 is set before triton is imported when ``--device cpu`` is given, or
must be set by the caller when importing this module).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

if __name__ == "__main__" and "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mcdist.kernels import linear_memory as lm  # noqa: E402
from mcdist.kernels.linear_memory import linear_memory_triton  # noqa: E402

# Expected bounds on relative errors (printed beside the numbers; check() does not raise). fp32 inputs use
# 3-pass TF32 products (~fp32); bf16 inputs are rounded once and multiplied in TF32.
BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# The two walks see the same rounded inputs and differ only in the order of float32 sums.
WALK_BOUND = 1e-4


def chunked_reference(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state):
    """Chunkwise linear memory in the inputs' dtype (float64 here); autograd gives the reference gradients.

    Same recurrence as the kernel (M_t = exp(g_t) M_{t-1} + v_t k_tᵀ, o_t = M_t q_t), computed chunk by chunk
    with dense per-chunk matrices, so it stays fast enough at a few thousand tokens.
    """
    B, T, H, D = q.shape
    c = chunk_len
    nc = T // c
    qc, kc, vc = (x.reshape(B, nc, c, H, D).transpose(2, 3) for x in (q, k, v))  # [B, NC, H, c, D]
    if log_decay is None:
        cum = q.new_zeros(B, nc, H, c)
    else:
        cum = log_decay.reshape(B, nc, c, H).transpose(2, 3).cumsum(-1)  # [B, NC, H, c]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # [B, NC, H, c, D]
    to_end = torch.exp(cum[..., -1:] - cum)[..., None]  # [B, NC, H, c, 1]
    updates = vc.transpose(-1, -2) @ (kc * to_end)  # [B, NC, H, D, D]
    zeros = q.new_zeros(B, H, D, D)
    state = initial_state if initial_state is not None else zeros
    starts, cached = [], []
    per_segment = segment_len // c
    for n in range(nc):
        if state_init == "independent" and n % per_segment == 0:
            state = zeros
        starts.append(state)
        state = torch.exp(cum[:, n, :, -1])[..., None, None] * state + updates[:, n]
        if (n + 1) % per_segment == 0 or n == nc - 1:
            cached.append(state)
    starts = torch.stack(starts, 1)  # [B, NC, H, D, D]
    inter = (qc * torch.exp(cum)[..., None]) @ starts.transpose(-1, -2)
    out = (intra + inter).transpose(2, 3).reshape(B, T, H, D)
    return out, torch.stack(cached, 1), state


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("nan")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(device) -> dict:
    """Relative errors of both walks against the float64 reference, and against each other, fp32 and bf16 inputs.

    Args:
        device: "cuda" (B=2, T=1024, H=4, D=64 and 128, C=256, c=64) or "cpu" (the Triton interpreter must be on;
            B=1, T=64, H=2, D=16, C=32, c=16).
    Returns:
        {"<walk>/<dtype>/<memory>/<state_init>/D<d>/<name>": relative error} for online_out, cached_states,
        final_state, dq, dk, dv, dlog_decay, dinitial_state; "<walk>/<...>/ok": all within BOUNDS[dtype];
        "walks/<...>/max_rel_diff": the largest relative difference between the two walks over the same outputs
        and gradients, and "walks/<...>/ok": within WALK_BOUND.
    """
    device = torch.device(device)
    if device.type == "cuda":
        B, T, H, segment_len, chunk_len, dims = 2, 1024, 4, 256, 64, (64, 128)
    else:
        B, T, H, segment_len, chunk_len, dims = 1, 64, 2, 32, 16, (16,)
    cases = [(torch.float32, True, "checkpoint"), (torch.bfloat16, True, "checkpoint"),
             (torch.bfloat16, False, "independent")]
    results = {}
    for D in dims:
        for dtype, gated, state_init in cases:
            gen = torch.Generator(device="cpu").manual_seed(D)
            # L2-normalised q and k, as the model uses them (qk_norm = "l2").
            q, k = (F.normalize(torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), dim=-1)
                    for _ in range(2))
            v = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
            q, k, v = (x.to(dtype).double() for x in (q, k, v))  # the reference sees the rounded inputs
            log_decay = F.logsigmoid(4.0 + torch.randn(B, T, H, generator=gen, dtype=torch.float64)) if gated else None
            initial = (0.1 * torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
                       if state_init == "checkpoint" else None)
            leaves = {n: x for n, x in zip(("q", "k", "v", "log_decay", "initial_state"),
                                            (q, k, v, log_decay, initial)) if x is not None}
            ref_in = {n: x.to(device).requires_grad_() for n, x in leaves.items()}
            ref = chunked_reference(ref_in["q"], ref_in["k"], ref_in["v"], ref_in.get("log_decay"), segment_len,
                                    chunk_len, state_init, ref_in.get("initial_state"))
            upstream = [torch.randn(r.shape, generator=gen, dtype=torch.float64).to(device) for r in ref]
            ref_grads = torch.autograd.grad(ref, list(ref_in.values()), upstream)
            tag = f"{str(dtype).replace('torch.', '')}/{'gated' if gated else 'linear'}/{state_init}/D{D}"
            values = {}
            for name in lm.WALKS:
                ker_in = {n: (x.to(device, dtype if n in ("q", "k", "v") else torch.float32)).requires_grad_()
                          for n, x in leaves.items()}
                out = linear_memory_triton(ker_in["q"], ker_in["k"], ker_in["v"], ker_in.get("log_decay"),
                                           segment_len=segment_len, chunk_len=chunk_len, state_init=state_init,
                                           initial_state=ker_in.get("initial_state"), walk=name)
                grads = torch.autograd.grad(out, list(ker_in.values()),
                                            [u.to(o.dtype) for u, o in zip(upstream, out)])
                values[name] = list(out) + list(grads)
                errors = {"online_out": _rel(out[0], ref[0]), "cached_states": _rel(out[1], ref[1]),
                          "final_state": _rel(out[2], ref[2])}
                errors.update({f"d{n}": _rel(g, r) for n, g, r in zip(ker_in, grads, ref_grads)})
                ok = all(e <= BOUNDS[dtype] for e in errors.values())  # NaN compares False
                print(f"[check] {name:10s} {tag}: " + "  ".join(f"{n} {e:.2e}" for n, e in errors.items())
                      + f"  (bound {BOUNDS[dtype]:.0e}) {'ok' if ok else 'FAIL'}", flush=True)
                results.update({f"{name}/{tag}/{n}": e for n, e in errors.items()})
                results[f"{name}/{tag}/ok"] = ok
            diff = max(_rel(x, y) for x, y in zip(values["scan"], values["sequential"]))
            ok = diff <= WALK_BOUND
            print(f"[check] scan vs sequential {tag}: max relative difference {diff:.2e} (bound {WALK_BOUND:.0e}) "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
            results[f"walks/{tag}/max_rel_diff"] = diff
            results[f"walks/{tag}/ok"] = ok
    return results


def _flops(B, T, H, D, chunk_len, backward):
    """Multiply-add flops the kernels execute (×2), causal masking not discounted.

    Forward per token: state update 2D², inter-chunk read 2D², Q Kᵀ 2cD, scores·V 2cD. The backward recomputes
    the state walk and runs five more D² products and five c·D products.
    """
    forward = B * T * H * (4 * D * D + 4 * chunk_len * D)
    return forward + (B * T * H * (10 * D * D + 10 * chunk_len * D) if backward else 0)


def bench(device) -> list:
    """Forward and forward+backward times (ms) and TFLOP/s of both walks, bf16, B=1, H=16, C=256, c=64.

    Args:
        device: a CUDA device.
    Returns:
        A list of {"D", "T", "memory", "<walk>": {"fwd_ms", "fwd_tflops", "fwd_bwd_ms", "fwd_bwd_tflops"} for each
        walk, "fwd_ratio", "fwd_bwd_ratio" (scan / sequential time)} records; also printed as a table.
    """
    from triton.testing import do_bench

    device = torch.device(device)
    B, H, segment_len, chunk_len, dtype = 1, 16, 256, 64, torch.bfloat16
    records = []
    for D in (64, 128):
        for gated in (False, True):
            for T in (8192, 32768, 131072):
                gen = torch.Generator(device=device).manual_seed(0)
                q, k = (F.normalize(torch.randn(B, T, H, D, generator=gen, device=device), dim=-1).to(dtype)
                        for _ in range(2))
                v = torch.randn(B, T, H, D, generator=gen, device=device, dtype=dtype)
                log_decay = (F.logsigmoid(4.0 + torch.randn(B, T, H, generator=gen, device=device))
                             if gated else None)
                leaves = [x.requires_grad_() for x in (q, k, v, log_decay) if x is not None]
                kwargs = dict(segment_len=segment_len, chunk_len=chunk_len, state_init="checkpoint")

                def forward(name):
                    with torch.no_grad():
                        return linear_memory_triton(q, k, v, log_decay, walk=name, **kwargs)

                out = linear_memory_triton(q, k, v, log_decay, **kwargs)
                upstream = [torch.randn_like(o) for o in out]
                del out

                def forward_backward(name):
                    outs = linear_memory_triton(q, k, v, log_decay, walk=name, **kwargs)
                    torch.autograd.backward(outs, upstream)

                record = {"D": D, "T": T, "memory": "gated" if gated else "linear"}
                for name in lm.WALKS:
                    fwd_ms = do_bench(functools.partial(forward, name), warmup=10, rep=40)
                    fwd_bwd_ms = do_bench(functools.partial(forward_backward, name), warmup=10, rep=40,
                                          grad_to_none=leaves)
                    record[name] = {
                        "fwd_ms": fwd_ms, "fwd_tflops": _flops(B, T, H, D, chunk_len, False) / fwd_ms * 1e-9,
                        "fwd_bwd_ms": fwd_bwd_ms,
                        "fwd_bwd_tflops": _flops(B, T, H, D, chunk_len, True) / fwd_bwd_ms * 1e-9,
                    }
                    print(f"[bench] D={D:3d} T={T:6d} {record['memory']:6s} {name:10s}  fwd {fwd_ms:8.3f} ms "
                          f"{record[name]['fwd_tflops']:6.1f} TFLOP/s   fwd+bwd {fwd_bwd_ms:8.3f} ms "
                          f"{record[name]['fwd_bwd_tflops']:6.1f} TFLOP/s", flush=True)
                record["fwd_ratio"] = record["scan"]["fwd_ms"] / record["sequential"]["fwd_ms"]
                record["fwd_bwd_ratio"] = record["scan"]["fwd_bwd_ms"] / record["sequential"]["fwd_bwd_ms"]
                records.append(record)
                del q, k, v, log_decay, leaves, upstream
                torch.cuda.empty_cache()
    print(walk_table(records), flush=True)
    return records


def walk_table(records) -> str:
    """The bench records as a table: ms of each walk and the ratio scan / sequential (< 1: the scan is faster)."""
    lines = ["   D       T memory  |  fwd seq ms  fwd scan ms  scan/seq |  f+b seq ms  f+b scan ms  scan/seq",
             "-" * 98]
    for r in records:
        seq, scan = r["sequential"], r["scan"]
        lines.append(f"{r['D']:4d} {r['T']:7d} {r['memory']:6s} | {seq['fwd_ms']:11.3f} {scan['fwd_ms']:12.3f} "
                     f"{r['fwd_ratio']:9.2f} | {seq['fwd_bwd_ms']:11.3f} {scan['fwd_bwd_ms']:12.3f} "
                     f"{r['fwd_bwd_ratio']:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter, check only)")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--bench-only", action="store_true")
    parser.add_argument("--json", default=None, help="write {'check': ..., 'bench': ...} to this file")
    args = parser.parse_args(argv)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (interpreter)"}
    start = time.time()
    if not args.bench_only:
        report["check"] = check(args.device)
    if not args.check_only and args.device != "cpu":
        report["bench"] = bench(args.device)
    print(f"total {time.time() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = all(v for k, v in report.get("check", {}).items() if k.endswith("/ok"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
