"""The GPU check and benchmark, one script for one lent GPU (issue: Triton kernels).

    python benchmarks/gpu.py --out DIR            # on a CUDA machine: checks, then benchmarks
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke --device cpu --out /tmp/x   # the script's logic, tiny

Sections, in this order (each guarded: a failure is printed and recorded, the rest still runs; results are
written to DIR/gpu.json after every section; --budget-s stops starting new ones):
1. `checks`: correctness of each kernel in bf16 and fp32 against float64 PyTorch references (the kernels' own
   check(): both linear-memory walks, every cached-read tile set); `ssc_gather`: the same for the ssc gather
   read (mcdist.kernels.ssc_read) against cached_read_chunked;
2. `layer`: the MC layer with impl='triton' against impl='chunked' (outputs and gradients); `packed`: packed
   documents (cu_seqlens) on the kernels in fp32 and bf16 against each document alone (chunked, fp32), and the
   fwd+bwd time of 32K tokens as 1 and as 64 documents;
3. `core`: the MC core (memory pass + read) forward+backward for none / grm / ssc (k = 8) beside
   scaled_dot_product_attention (flash backend) at the same B, H, T, d: milliseconds, TFLOP/s and the ratio;
   ssc twice, with the 'blocks' and the 'gather' read (ops.cached_read's ssc_read argument), plus the ssc read alone
   (forward+backward, both kernels, same selection) and the top-k selection alone; `mixers`: the whole attention
   mixer (mcdist.attention) beside the whole MC layer (none / grm / ssc) at 8K and 32K tokens, fwd+bwd;
4. `kernels`: the kernels' own benchmarks (linear memory: sequential walk vs scan; cached read: previous vs
   current tile choices), side by side in the same run;
5. `train`: the trainer itself on the GPU (one process): bf16 + Triton beside the chunked path, a resumed run
   beside a straight one, and the tokens/s and peak memory of a d_model 1024 model at 32K tokens;
6. `infer`: decoding (mcdist.infer) against the full forward in float32, and prefill / decode-per-token /
   full-forward times at a 32K prompt in bf16;
7. `fla`: the linear-memory kernel beside flash-linear-attention, when fla imports.
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
from mcdist.ops import merge_partials, online_scores, segment_contexts, select_top_k  # noqa: E402
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


# -- 1b. the ssc gather read against the PyTorch path ------------------------------------------------------------


def ssc_gather_check(device, smoke) -> dict:
    """ssc_read_triton (and, beside it, cached_read_triton with the same selection) against float64
    cached_read_chunked: out, lse and the four gradients, float32 and bfloat16 inputs, random upstream gradients
    on out and lse. Bounds: 2e-2 for bf16 (and for float32 with FP32_DOT_PRECISION = "bf16"/"tf32"), 1e-4 for
    float32 with "tf32x3"/"ieee"."""
    from gpu_cached_read import random_selection

    from mcdist.kernels import cached_read
    from mcdist.ops import cached_read_chunked
    from mcdist.kernels.ssc_read import ssc_read_triton

    if device == "cuda" and not smoke:
        B, T, H, din, dout, dc, C, q_off, s_off, K = 2, 1000, 4, 64, 128, 64, 64, 64, 1, 4
    else:  # the interpreter is slow: tiny shape
        B, T, H, din, dout, dc, C, q_off, s_off, K = 1, 37, 2, 16, 32, 8, 8, 8, 1, 3
    n = (q_off + T) // C - s_off
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(B, T, H, din, generator=gen), torch.randn(B, T, H, dc, generator=gen),
            torch.randn(B, n, H, dout, din, generator=gen) / math.sqrt(din), torch.randn(B, n, H, dc, generator=gen)]
    selected = random_selection(B, T, H, n + s_off, K, segment_len=C, device="cpu", query_offset=q_off,
                                generator=gen).to(device)
    g_out = torch.randn(B, T, H, dout, generator=gen, dtype=torch.float64).to(device)
    g_lse = torch.randn(B, T, H, generator=gen, dtype=torch.float64).to(device)
    kw = dict(segment_len=C, gate_scale=1 / math.sqrt(dc), query_offset=q_off, segment_offset=s_off,
              selected=selected)
    precise = cached_read.FP32_DOT_PRECISION in ("tf32x3", "ieee")
    bounds = {"fp32": 1e-4 if precise else 2e-2, "bf16": 2e-2}
    errors = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        inputs = [x.to(device=device, dtype=dtype) for x in base]
        # the reference reads the same rounded inputs
        ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
        ref_out, ref_lse = cached_read_chunked(*ref_leaves, **kw)
        ref_grads = torch.autograd.grad((ref_out, ref_lse), ref_leaves, (g_out, g_lse))
        for name, fn in (("gather", ssc_read_triton), ("blocks", cached_read.cached_read_triton)):
            leaves = [x.clone().requires_grad_() for x in inputs]
            out, lse = fn(*leaves, **kw)
            grads = torch.autograd.grad((out, lse), leaves, (g_out.float(), g_lse.float()))
            errs = {"out": relative_error(out, ref_out),
                    "lse": relative_error(torch.where(torch.isfinite(ref_lse), lse, 0.0),
                                          torch.where(torch.isfinite(ref_lse), ref_lse, 0.0)),
                    "lse_inf_match": bool(torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))),
                    "nan": bool(any(torch.isnan(x).any() for x in (out, lse, *grads)))}
            for gname, g, rg in zip(("dz", "du", "dstates", "dcontexts"), grads, ref_grads):
                errs[gname] = relative_error(g, rg)
            errors.setdefault(label, {})[name] = errs
            print(f"ssc check {label} {name}: " + "  ".join(
                f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in errs.items()), flush=True)
    ok = all(errs["lse_inf_match"] and not errs["nan"]
             and all(v < bounds[label] for v in errs.values() if isinstance(v, float))
             for label, by_kernel in errors.items() for errs in by_kernel.values())
    print(f"ssc check {'passed' if ok else 'FAILED'} (bounds {bounds})", flush=True)
    if not ok:
        raise AssertionError(f"ssc gather check failed: {errors}")
    return {"ok": ok, "errors": errors, "bounds": bounds, "fp32_dot_precision": cached_read.FP32_DOT_PRECISION}


# -- 2. the layer end to end -----------------------------------------------------------------------------------


def layer_check(device, smoke) -> list:
    rows = []
    T = 96 if smoke else 1000  # not a multiple of the chunk: exercises the padding
    cases = [("gated", "grm", 0), ("linear", "ssc", 0), ("gated", "soup", 0), ("linear", "residual", 0),
             ("gated", "grm", 4)]  # the last with the short convolution of q, k, v
    for memory, aggregation, conv_size in cases:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            config = ModelConfig(d_model=128 if not smoke else 32, n_heads=2, memory=memory, aggregation=aggregation,
                                 segment_len=64 if not smoke else 32, chunk_len=16, top_k=3, conv_size=conv_size)
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
            row = dict(memory=memory, aggregation=aggregation, conv_size=conv_size,
                       dtype=str(dtype).replace("torch.", ""))
            for name in ("chunked", "triton"):
                got = results[name]
                row[name] = dict(out=relative_error(got[0], ref[0]), grad_x=relative_error(got[1], ref[1]),
                                 grad_params=max(relative_error(a, b) for a, b in zip(got[2], ref[2])))
            print("layer", row, flush=True)
            rows.append(row)
    return rows


# -- 2a. packed documents on the kernels ---------------------------------------------------------------------------


def _packed_lengths(tokens: int, docs: int, segment_len: int) -> list:
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(docs, generator=generator) + 0.1
    raw = (weights / weights.sum() * (tokens - docs)).floor().long() + 1
    raw[-1] += tokens - int(raw.sum())
    return raw.tolist()


def packed_check(device, smoke) -> dict:
    """Packed documents (cu_seqlens, docs/packing.md) with impl='triton' in float32 and under bf16 autocast: the
    logits and every gradient against each document run alone with the chunked path in float32; then the fwd+bwd
    time of one long sequence as 1 document and as 64 (the issue's cost of boundaries in the kernels)."""
    from mcdist.model import MCLanguageModel

    rows = []
    lengths = [5, 33, 1, 70, 12, 64, 9] if smoke else [1, 17, 300, 64, 2000, 5, 129, 1024, 3]
    cases = [("gated", "grm", 4), ("linear", "ssc", 0)]
    for memory, aggregation, conv_size in cases:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=256, d_model=32 if smoke else 256, n_layers=2, n_heads=2 if smoke else 4,
                             memory=memory, aggregation=aggregation, segment_len=16 if smoke else 64, chunk_len=16,
                             top_k=2, conv_size=conv_size)
        model = MCLanguageModel(config).to(device)
        T = sum(lengths)
        ids = torch.randint(0, 256, (1, T), device=device)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        model.zero_grad()
        reference_logits = []
        first = 0
        for length in lengths:  # each document alone, chunked, float32: no cu_seqlens
            logits = model(ids[:, first:first + length], impl="chunked").logits
            (logits.float() ** 2).mean().backward()
            reference_logits.append(logits.detach().float())
            first += length
        reference = torch.cat(reference_logits, dim=1)
        reference_grads = [p.grad.clone() for p in model.parameters()]
        for dtype in (torch.float32, torch.bfloat16):
            model.zero_grad()
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(ids, cu_seqlens=cu, impl="triton").logits
            loss = sum((logits[:, a:b].float() ** 2).mean() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()))
            loss.backward()
            row = dict(memory=memory, aggregation=aggregation, conv_size=conv_size,
                       dtype=str(dtype).replace("torch.", ""), logits=relative_error(logits.float(), reference),
                       grad_params=max(relative_error(p.grad, g) for p, g in zip(model.parameters(), reference_grads)))
            print("packed", row, flush=True)
            rows.append(row)
    timing = []
    T = 128 if smoke else 32768
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=32 if smoke else 512, n_layers=1, n_heads=2 if smoke else 8,
                         memory="gated", aggregation="grm", segment_len=16 if smoke else 256, chunk_len=16 if smoke
                         else 64)
    model = MCLanguageModel(config).to(device)
    ids = torch.randint(0, 256, (1, T), device=device)
    for docs in (1, 64):
        cu = None if docs == 1 else torch.tensor([0] + torch.tensor(_packed_lengths(T, docs, config.segment_len))
                                                 .cumsum(0).tolist(), dtype=torch.int32)

        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model.loss_sum(ids, ids, cu_seqlens=cu, impl="triton")
            loss.backward()

        timing.append({"documents": docs, "tokens": T, "ms": timed(step, device)})
    timing[1]["ratio_to_one"] = timing[1]["ms"] / timing[0]["ms"]
    print("packed timing", timing, flush=True)
    return {"checks": rows, "timing": timing}


# -- 2b. the trainer on this GPU ----------------------------------------------------------------------------------


def _train_config(out_dir, device, steps, extra=()):
    from mcdist.config import RunConfig

    small = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.memory=gated",
             "model.aggregation=grm", "model.segment_len=64", "model.chunk_len=16", "train.task=mqar",
             "train.seq_len=512", "train.num_kv_pairs=16", "train.batch_size=16", "train.lr=3e-3",
             "train.warmup_steps=10", f"train.steps={steps}", f"train.eval_every={steps}", "train.eval_batches=4",
             "train.log_every=1", "train.progress=false", "train.resume=auto", f"train.device={device}",
             f"train.dtype={'bfloat16' if device == 'cuda' else 'float32'}", f"train.out_dir={out_dir}"]
    return RunConfig().with_overrides([*small, *extra])


def _train_losses(out_dir) -> list:
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [entry["loss"] for entry in map(json.loads, handle) if entry["kind"] == "train"]


def train_check(device, smoke) -> dict:
    """The trainer itself on this device, one process (no Ray): bf16 autocast with the Triton kernels beside the
    chunked PyTorch path on the same data, a run stopped half-way and resumed from its checkpoint beside the
    straight run, and the throughput and peak memory of a larger model at a long sequence."""
    import tempfile

    from mcdist.train.trainer import StopAtStep, run_training

    steps = 6 if smoke else 60
    result = {"steps": steps}
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for name, extra in (("triton", ["train.impl=auto"]), ("chunked", ["train.impl=chunked"])):
            out = os.path.join(folder, name)
            start = time.time()
            final = run_training(_train_config(out, device, steps, extra))
            runs[name] = _train_losses(out)
            result[name] = dict(loss_first=runs[name][0], loss_last=runs[name][-1], eval_loss=final["eval_loss"],
                                eval_accuracy=final["eval_accuracy"], tokens_per_s=final["tokens_per_s"],
                                wall_s=time.time() - start)
        # bf16 rounding differs between the two paths, so the curves drift apart slowly; report how far
        result["max_loss_gap_triton_vs_chunked"] = max(abs(a - b) for a, b in zip(runs["triton"], runs["chunked"]))
        out = os.path.join(folder, "resumed")
        config = _train_config(out, device, steps, ["train.impl=auto", f"train.checkpoint_every={steps // 2}"])
        run_training(config, callbacks=StopAtStep(steps // 2))
        run_training(config)
        resumed = _train_losses(out)
        result["resume_max_loss_gap"] = max(abs(a - b) for a, b in zip(resumed, runs["triton"]))
        result["loss_fell"] = runs["triton"][-1] < runs["triton"][0]
        if not smoke:  # throughput at a long sequence: d = 64 heads, C = 256, activation checkpointing; then the
            # same with the logits made 4096 tokens at a time (train.loss_chunk): the peak memory both ways
            big = ["model.vocab_size=8192", "model.d_model=1024", "model.n_heads=16", "model.segment_len=256",
                   "model.chunk_len=64",
                   "train.seq_len=32768", "train.batch_size=1", "train.num_kv_pairs=64", "train.warmup_steps=1",
                   "train.activation_checkpointing=true", "train.eval_batches=1"]
            for name, extra in (("large", []), ("large_loss_chunk", ["train.loss_chunk=4096"])):
                torch.cuda.reset_peak_memory_stats()
                final = run_training(_train_config(os.path.join(folder, name), device, 4, big + extra))
                result[name] = dict(seq_len=32768, d_model=1024, heads=16, tokens_per_s=final["tokens_per_s"],
                                    peak_memory_gib=final["peak_memory_bytes"] / 2 ** 30,
                                    loss=final["loss"], num_params=final["num_params"])
    print("train", result, flush=True)
    return result


# -- 2c. inference on this GPU --------------------------------------------------------------------------------------


def infer_check(device, smoke) -> dict:
    """mcdist.infer.Session on this device: decode (Triton read) against the full forward in float32, then the
    prefill time, the decode time per token and one full forward's time (the next token without a cache) in bf16
    autocast for a d_model 1024 model at a long prompt."""
    from mcdist.infer import Session
    from mcdist.model import MCLanguageModel

    def synchronize():
        if device == "cuda":
            torch.cuda.synchronize()

    result = {}
    torch.manual_seed(0)
    small = ModelConfig(vocab_size=64, d_model=64 if smoke else 256, n_heads=4, memory="gated", aggregation="grm",
                        segment_len=16 if smoke else 64, chunk_len=16)
    model = MCLanguageModel(small).to(device)
    ids = torch.randint(0, 64, (2, 48 if smoke else 300), device=device)
    prompt = ids.shape[1] * 2 // 3
    with torch.no_grad():
        full = model(ids).logits
    session = Session(model)
    steps = [session.prefill(ids[:, :prompt])] + [session.decode(ids[:, t]) for t in range(prompt, ids.shape[1] - 1)]
    result["fp32_decode_vs_forward"] = relative_error(torch.stack(steps, 1), full[:, prompt - 1:-1])
    rows = []
    for aggregation in ("grm", "none"):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=8192, d_model=128 if smoke else 1024, n_heads=2 if smoke else 16,
                             aggregation=aggregation, segment_len=16 if smoke else 256, chunk_len=16 if smoke else 64)
        model = MCLanguageModel(config).to(device)
        length, tokens = (64, 4) if smoke else (32768, 32)
        ids = torch.randint(0, 8192, (1, length + tokens), device=device)
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            session = Session(model)
            synchronize()
            start = time.perf_counter()
            session.prefill(ids[:, :length])
            synchronize()
            prefill_s = time.perf_counter() - start
            per_token = []
            for t in range(length, length + tokens):
                start = time.perf_counter()
                session.decode(ids[:, t])
                synchronize()
                per_token.append(time.perf_counter() - start)
            start = time.perf_counter()
            model(ids[:, :length + 1])
            synchronize()
            forward_s = time.perf_counter() - start
        decode_ms = sorted(per_token)[len(per_token) // 2] * 1e3
        rows.append(dict(aggregation=aggregation, prompt=length, d_model=config.d_model, heads=config.n_heads,
                         segment_len=config.segment_len, prefill_s=prefill_s, decode_ms=decode_ms,
                         forward_next_token_s=forward_s, forward_over_decode=forward_s * 1e3 / decode_ms))
    result["speed"] = rows
    print("infer", result, flush=True)
    return result


# -- 3b. whole mixers: the MC layer beside the attention mixer ------------------------------------------------------


def mixers_bench(device, smoke) -> list:
    """Forward + backward of one whole mixer layer at equal T (bf16 autocast on CUDA): the attention mixer
    (mcdist.attention.AttentionLayer: qkv, RoPE, SDPA, out) beside the MC layer (impl='triton') for none / grm /
    ssc; the CPU's `mcdist bench` attention-layer column, on the GPU. Milliseconds and the ratio to attention."""
    from mcdist.attention import AttentionLayer

    rows = []
    d_model, heads = (32, 2) if smoke else (1024, 16)
    for T in ((64,) if smoke else (8192, 32768)):
        if time.time() > DEADLINE:
            print(f"time budget spent: skipping mixers at T = {T}", flush=True)
            break
        x = torch.randn(1, T, d_model, device=device)
        upstream = torch.randn(1, T, d_model, device=device)
        times = {}
        for name in ("attention", "none", "grm", "ssc"):
            torch.manual_seed(0)
            config = ModelConfig(d_model=d_model, n_heads=heads, memory="gated", aggregation="grm" if name ==
                                 "attention" else name, segment_len=16 if smoke else 256, chunk_len=16 if smoke
                                 else 64, top_k=2 if smoke else 8, conv_size=4)
            layer = (AttentionLayer(config) if name == "attention" else MemoryCachingLayer(config)).to(device)
            options = {} if name == "attention" else {"impl": "triton"}

            def step():
                xi = x.detach().requires_grad_()
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    y = layer(xi, **options)
                (y.float() * upstream).sum().backward()

            times[name] = timed(step, device)
        for name, ms in times.items():
            row = dict(T=T, d_model=d_model, heads=heads, mixer=name, ms=ms, vs_attention=ms / times["attention"])
            print("mixers", row, flush=True)
            rows.append(row)
    return rows


# -- 4. MC core vs SDPA ------------------------------------------------------------------------------------------


def mc_core(q, k, v, u, aggregation, segment_len, top_k, state_dtype, ssc_read="blocks"):
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
                           gate_scale=scale, selected=selected, impl="triton", ssc_read=ssc_read)
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
        for aggregation, ssc_read in (("none", "blocks"), ("grm", "blocks"), ("ssc", "blocks"), ("ssc", "gather")):
            def run():
                leaves = [x.detach().requires_grad_() for x in (q, k, v, u)]
                y = mc_core(*leaves, aggregation, segment_len, 8, dtype, ssc_read)
                y.float().backward(upstream)

            kind = f"mc-{aggregation}" + ("-gather" if ssc_read == "gather" else "")
            try:
                ms = timed(run, device)
            except Exception as error:
                ms = float("nan")
                print("mc failed", kind, T, d, repr(error), flush=True)
            flops = core_flops(T, H, d, segment_len, aggregation, 8)
            rows.append(dict(kind=kind, T=T, d=d, H=H, segment_len=segment_len, ms=ms,
                             tflops=flops / ms / 1e9, speedup_vs_sdpa=sdpa_ms / ms))
            print(rows[-1], flush=True)
        rows.extend(ssc_read_bench(q, k, v, u, upstream, segment_len, dtype, sdpa_ms, device))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def ssc_read_bench(q, k, v, u, upstream, segment_len, dtype, sdpa_ms, device, top_k=8) -> list:
    """The ssc read alone, forward+backward, with each kernel on the same states and selection; and the top-k
    selection alone (forward only; it is not differentiated), with the PyTorch sort and with the fused kernel
    (ops.select_top_k's select argument) on the same inputs. Rows: read-ssc-blocks, read-ssc-gather, ssc-select-sort,
    ssc-select-fused.

    The two selections are also compared: on integer-valued u and contexts of the same shapes (exact scores in any
    summation order, many ties) they must be equal; on the benchmark's inputs the row reports how many tokens
    differ and the largest float64 score gap between the two choices at a differing position (two float32
    matmuls that sum in different orders may order near-equal scores differently)."""
    T, H, d = q.shape[1], q.shape[2], q.shape[3]
    shape = dict(T=T, d=d, H=H, segment_len=segment_len)
    try:
        scale = 1.0 / math.sqrt(d)
        with torch.no_grad():
            memory = ops.linear_memory(q, k, v, None, segment_len=segment_len, chunk_len=64,
                                       state_init="independent", impl="triton")
            states = memory.cached_states.to(dtype)
            closed, _ = segment_contexts(k, segment_len, "mean")
            selected = select_top_k(u, closed, segment_len=segment_len, top_k=top_k, gate_scale=scale)
        del memory
    except Exception as error:
        print("ssc read setup failed", T, d, repr(error), flush=True)
        return [dict(kind=kind, ms=float("nan"), error=repr(error), **shape)
                for kind in ("read-ssc-blocks", "read-ssc-gather", "ssc-select-sort", "ssc-select-fused")]
    rows = []
    g_lse = torch.randn(upstream.shape[:3], device=device)
    flops = 3 * 2 * H * d * d * T * min(top_k, T // segment_len)  # M z, Mᵀ dout, dout zᵀ per selected pair
    for ssc_read in ("blocks", "gather"):
        def run():
            leaves = [x.detach().requires_grad_() for x in (q, u, states, closed)]
            out, lse = ops.cached_read(*leaves, segment_len=segment_len, gate_scale=scale, selected=selected,
                                       impl="triton", ssc_read=ssc_read)
            torch.autograd.backward((out, lse), (upstream, g_lse))

        row = dict(kind=f"read-ssc-{ssc_read}", **shape)
        try:
            row["ms"] = timed(run, device)
        except Exception as error:
            row.update(ms=float("nan"), error=repr(error))
            print("ssc read failed", ssc_read, T, d, repr(error), flush=True)
        row.update(tflops=flops / row["ms"] / 1e9, speedup_vs_sdpa=sdpa_ms / row["ms"])
        rows.append(row)
        print(rows[-1], flush=True)
    del states, selected

    def select(choice, u_in, contexts):
        with torch.no_grad():
            return select_top_k(u_in, contexts, segment_len=segment_len, top_k=top_k, gate_scale=scale,
                                impl="triton", select=choice)

    chosen = {}
    for choice in ("sort", "fused"):
        row = dict(kind=f"ssc-select-{choice}", **shape)
        try:
            chosen[choice] = select(choice, u, closed)
            row["ms"] = timed(lambda: select(choice, u, closed), device)
        except Exception as error:
            row.update(ms=float("nan"), error=repr(error))
            print("ssc select failed", choice, T, d, repr(error), flush=True)
        row.update(tflops=float("nan"), speedup_vs_sdpa=sdpa_ms / row["ms"])
        rows.append(row)
    if len(chosen) == 2:
        row = rows[-1]
        try:
            gen = torch.Generator().manual_seed(1)
            u_int = torch.randint(-2, 3, u.shape, generator=gen).to(device=device, dtype=u.dtype)
            closed_int = torch.randint(-2, 3, closed.shape, generator=gen).to(device=device, dtype=closed.dtype)
            row["tied_inputs_equal"] = bool(torch.equal(select("sort", u_int, closed_int),
                                                        select("fused", u_int, closed_int)))
            differ = (chosen["sort"] != chosen["fused"]).any(-1)  # [B, T, H]
            row["tokens_differing"] = int(differ.sum())
            row["tokens"] = differ.numel()
            gap = largest = 0.0
            if row["tokens_differing"]:
                b, t, h = differ.nonzero()[:65536].unbind(1)  # a bounded sample: [n, K, D] float64 below
                scores = {}
                for choice in ("sort", "fused"):
                    index = chosen[choice][b, t, h]  # [n, K]
                    picked = closed[b[:, None], index.clamp_min(0), h[:, None]].double()  # [n, K, D]
                    value = scale * (picked * u[b, t, h].double()[:, None]).sum(-1)
                    scores[choice] = torch.where(index >= 0, value, float("-inf"))
                same_empty = torch.equal(scores["sort"] == float("-inf"), scores["fused"] == float("-inf"))
                finite = scores["sort"] > float("-inf")
                gap = float((scores["sort"] - scores["fused"])[finite].abs().max()) if same_empty else float("inf")
                largest = float(scores["sort"][finite].abs().max()) if finite.any() else 0.0
            row["max_score_gap"] = gap  # inf: the two disagree on how many segments a token sees (a bug)
            row["max_abs_score_there"] = largest
            row["speedup_vs_sort"] = rows[-2]["ms"] / row["ms"]
            if not row["tied_inputs_equal"]:
                row["error"] = "fused and sort selections differ on integer-valued (exact) scores"
        except Exception as error:
            row.update(error=repr(error))
            print("ssc select comparison failed", T, d, repr(error), flush=True)
    for row in rows[-2:]:
        print(row, flush=True)
    return rows


def fla_compare(device) -> list:
    """Our chunked linear-memory kernel beside flash-linear-attention's chunk_simple_gla (the same recurrence,
    B = 1, H = 16, bf16), when fla can be imported (carried as a wheel; see docs/benchmarks.md). fla 0.6 refuses
    the gated backward on Hopper with Triton < 3.7.1 (its issue #640), so gated is timed forward only and the
    plain (ungated) recurrence forward + backward."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as error:  # not on the lent machine unless carried there
        print(f"fla: not importable ({error}); nothing to compare", flush=True)
        return {"skipped": f"fla not importable: {error}"}

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
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: checks,ssc_gather,layer,packed,train,infer,core,mixers,fla,"
                        "kernels")
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
    section("ssc_gather", lambda: ssc_gather_check(args.device, args.smoke))
    section("layer", lambda: layer_check(args.device, args.smoke))
    section("packed", lambda: packed_check(args.device, args.smoke))
    section("core", lambda: core_bench(args.device, args.smoke))
    section("mixers", lambda: mixers_bench(args.device, args.smoke))
    if not args.smoke:  # the kernels' own benchmarks: both linear-memory walks, previous vs current read tiles
        section("kernels", lambda: {"linear_memory": gpu_linear_memory.bench(args.device),
                                    "cached_read": gpu_cached_read.bench(args.device)})
    section("train", lambda: train_check(args.device, args.smoke))
    section("infer", lambda: infer_check(args.device, args.smoke))
    if not args.smoke:
        section("fla", lambda: fla_compare(args.device))
    print("\n%-16s %7s %4s %5s %9s %8s %8s" % ("kind", "T", "d", "C", "ms", "TFLOP/s", "vs SDPA"))
    for row in report["sections"].get("core", []):
        print("%-16s %7d %4d %5d %9.3f %8.1f %8s" % (row["kind"], row["T"], row["d"], row["segment_len"], row["ms"],
                                                   row.get("tflops", float("nan")), "%.2fx" % row["speedup_vs_sdpa"]
                                                   if "speedup_vs_sdpa" in row else "-"))
    if report["errors"]:
        print("FAILED sections:", sorted(report["errors"]))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
