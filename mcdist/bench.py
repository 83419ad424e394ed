"""CPU benchmark of the Memory Caching layer (prints a table and writes JSON; not a test).

    python -m mcdist.bench [--quick] [--out benchmarks/results/cpu.json] [--sizes 4096,16384,65536]
                           [--threads 2] [--max-seconds 60]
    python -m mcdist.bench --table benchmarks/results/cpu.json      (reprint a saved report)

Three measurements in float32 with B = 1, timed forward + backward unless said otherwise:

1. ``chunked_vs_reference``: one MemoryCachingLayer (linear memory, grm, d_model 128, H 2, C 256, chunk 64) at
   T = 2048 run by the chunked path (median of several runs after a warm-up) and by the token-loop reference
   (``impl="reference"``, timed once). Target: chunked ≥ 50× faster.
2. ``layer_vs_sdpa``: the MC layer (linear memory, H 2, head dim 64, C 256, chunk 64) for the aggregations none,
   residual, grm and ssc (top_k 4), against the attention mixer of the same width (``attention``: the whole
   layer, as ``model.mixer = "attention"`` builds it) and ``scaled_dot_product_attention(is_causal=True)`` on q, k, v
   [1, H, T, 64] that require grad. The MC time is the whole layer (projections, memory pass, read, output
   gate and projection); the SDPA time is the attention core alone. From the third size on, the time of one
   run is predicted from the two sizes before (power law, exponent clamped to [1, 2]); a forward + backward
   predicted above ``--max-seconds`` falls back to one forward-only run under ``torch.no_grad()`` if that is
   predicted within twice the limit (the only data point left at that size), else it is skipped; the JSON
   records the prediction and why.
3. ``cached_states``: for every configuration the number of values in one layer's cached states (per
   sequence), checked against N·H·d² (N = ceil(T / C)) for linear memory; one deep-memory (dla) row at the
   smallest size for comparison (N·H·2·e·d², the two weight matrices).

Wall-clock and process CPU times are both recorded (the CPU time is less sensitive to other processes on the
machine); so is the load average before and after, since a busy machine inflates wall-clock times.
``--quick`` shrinks every size so the whole run takes about 20 s (the smoke test uses it). Results and their
reading: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mcdist.attention import AttentionLayer
from mcdist.config import ModelConfig, write_text_atomic
from mcdist.layer import MemoryCachingLayer

VARIANTS = ("none", "residual", "grm", "ssc")
DEFAULT_SIZES = (4096, 16384, 65536)
SPEEDUP_TARGET = 50.0


# -- settings -------------------------------------------------------------------------------------------------


def full_settings() -> dict:
    return dict(
        loop=dict(seq_len=2048, d_model=128, n_heads=2, segment_len=256, chunk_len=64, chunked_repeats=5,
                  chunked_warmup=1, reference_repeats=1),
        layer=dict(d_model=128, n_heads=2, segment_len=256, chunk_len=64, top_k=4, batch=1),
        deep=dict(expansion=2, minibatch_len=8),
        sizes=list(DEFAULT_SIZES),
    )


def quick_settings() -> dict:
    return dict(
        loop=dict(seq_len=64, d_model=32, n_heads=2, segment_len=32, chunk_len=16, chunked_repeats=2,
                  chunked_warmup=1, reference_repeats=1),
        layer=dict(d_model=32, n_heads=2, segment_len=32, chunk_len=16, top_k=4, batch=1),
        deep=dict(expansion=2, minibatch_len=8),
        sizes=[64, 128],
    )


def repeats_for(seq_len: int, quick: bool) -> tuple[int, int]:
    """(timed runs, warm-up runs) at one sequence length: fewer at the long ones."""
    if quick:
        return 2, 0
    if seq_len <= 4096:
        return 5, 1
    if seq_len <= 16384:
        return 3, 1
    return 1, 0


# -- environment ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def source_digests() -> dict:
    """SHA-256 (first 12 hex digits) of the modules the benchmark exercises: which code was measured."""
    import hashlib

    import mcdist

    root = os.path.dirname(os.path.abspath(mcdist.__file__))
    digests = {}
    for name in ("layer.py", "reference.py", "ops/dispatch.py", "ops/linear_memory/chunked.py",
                 "ops/deep_memory/chunked.py", "ops/cached_read/chunked.py", "ops/select_top_k/chunked.py",
                 "bench.py"):
        try:
            with open(os.path.join(root, name), "rb") as handle:
                digests[name] = hashlib.sha256(handle.read()).hexdigest()[:12]
        except OSError:
            digests[name] = None
    return digests


def environment() -> dict:
    return dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                cpu_model=cpu_model(), logical_cpus=os.cpu_count(), threads=torch.get_num_threads(),
                interop_threads=torch.get_num_interop_threads(), load_average_start=load_average(),
                source_sha256=source_digests())


# -- timing ---------------------------------------------------------------------------------------------------


def time_runs(step: Callable[[], float], repeats: int, warmup: int) -> dict:
    """Run ``step`` (which returns the seconds its forward took) ``warmup`` + ``repeats`` times.

    Returns:
        dict with per-run wall-clock totals ``times_s``, forward times ``forward_s``, process CPU times
        ``cpu_s`` and their medians.
    """
    for _ in range(warmup):
        step()
    totals, forwards, cpus = [], [], []
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        forward = step()
        totals.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
        forwards.append(forward)
    return dict(repeats=repeats, warmup=warmup, times_s=totals, forward_s=forwards, cpu_s=cpus,
                median_s=statistics.median(totals), forward_median_s=statistics.median(forwards),
                median_cpu_s=statistics.median(cpus))


def layer_step(layer: MemoryCachingLayer, x: torch.Tensor, impl: str, backward: bool = True) -> Callable[[], float]:
    """One forward (+ backward against a fixed random upstream gradient) of the layer; returns forward seconds."""
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)

    def step() -> float:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        start = time.perf_counter()
        if not backward:
            with torch.no_grad():
                layer(x, impl=impl)
            return time.perf_counter() - start
        y = layer(x, impl=impl)
        forward = time.perf_counter() - start
        y.backward(upstream)
        return forward

    return step


def sdpa_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool = True) -> Callable[[], float]:
    """One causal scaled_dot_product_attention forward (+ backward); returns forward seconds."""
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=q.dtype)

    def step() -> float:
        for tensor in (q, k, v):
            tensor.grad = None
        start = time.perf_counter()
        if not backward:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return time.perf_counter() - start
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        forward = time.perf_counter() - start
        out.backward(upstream)
        return forward

    return step


def predict_seconds(history: list, seq_len: int) -> Optional[float]:
    """Time of one run at ``seq_len`` from earlier (seq_len, seconds) points: a power law through the last two,
    exponent clamped to [1, 2]. None with fewer than two points (then the size is measured, not predicted: one
    small size is dominated by fixed overheads and says little about the exponent)."""
    if len(history) < 2:
        return None
    (ta, sa), (t0, s0) = history[-2], history[-1]
    exponent = math.log(max(s0, 1e-9) / max(sa, 1e-9)) / math.log(t0 / ta) if t0 != ta else 2.0
    exponent = min(2.0, max(1.0, exponent))
    return s0 * (seq_len / t0) ** exponent


# -- the measurements -----------------------------------------------------------------------------------------


def make_layer(settings: dict, aggregation: str, memory: str = "linear", seed: int = 0, **extra) -> MemoryCachingLayer:
    torch.manual_seed(seed)
    config = ModelConfig(d_model=settings["d_model"], n_heads=settings["n_heads"], memory=memory,
                         aggregation=aggregation, segment_len=settings["segment_len"],
                         chunk_len=settings["chunk_len"], top_k=settings.get("top_k", 4), **extra)
    return MemoryCachingLayer(config)


def make_attention_layer(settings: dict, seed: int = 0) -> AttentionLayer:
    """The attention baseline mixer (``model.mixer = "attention"``) of the same width and heads."""
    torch.manual_seed(seed)
    return AttentionLayer(ModelConfig(d_model=settings["d_model"], n_heads=settings["n_heads"], mixer="attention"))


def chunked_vs_reference(settings: dict, log: Callable[[str], None]) -> dict:
    """Chunked path vs token loop of one grm layer with linear memory, forward + backward."""
    s = settings
    layer = make_layer(s, "grm")
    x = torch.randn(1, s["seq_len"], s["d_model"], generator=torch.Generator().manual_seed(0)).requires_grad_()
    log(f"chunked vs token loop at T = {s['seq_len']}: chunked path ...")
    chunked = time_runs(layer_step(layer, x, "chunked"), s["chunked_repeats"], s["chunked_warmup"])
    log(f"  chunked median {chunked['median_s']:.3f} s; token loop (slow) ...")
    reference = time_runs(layer_step(layer, x, "reference"), s["reference_repeats"], 0)
    log(f"  token loop {reference['median_s']:.1f} s")
    speedup = reference["median_s"] / chunked["median_s"]
    speedup_cpu = reference["median_cpu_s"] / chunked["median_cpu_s"]
    return dict(config=dict(memory="linear", aggregation="grm", batch=1, **s), chunked=chunked,
                reference=reference, speedup=speedup, speedup_cpu=speedup_cpu, target=SPEEDUP_TARGET,
                meets_target=speedup >= SPEEDUP_TARGET)


def layer_vs_sdpa(settings: dict, sizes: list, quick: bool, max_seconds: float, log: Callable[[str], None]) -> list:
    """MC layer variants and causal SDPA at every size; one row per (name, T)."""
    s = settings
    H, width, B = s["n_heads"], s["d_model"], s["batch"]
    D = width // H
    rows = []
    names = ("sdpa", "attention") + VARIANTS
    history = {name: {"full": [], "forward": []} for name in names}
    for T in sizes:
        repeats, warmup = repeats_for(T, quick)
        for name in names:
            row = dict(name=name, seq_len=T, batch=B, n_heads=H, head_dim=D)
            if name not in ("sdpa", "attention"):
                row.update(segment_len=s["segment_len"], chunk_len=s["chunk_len"], memory="linear")
                if name == "ssc":
                    row["top_k"] = s["top_k"]
            predicted_full = predict_seconds(history[name]["full"], T)
            predicted_forward = predict_seconds(history[name]["forward"], T)
            row.update(predicted_s=predicted_full, predicted_forward_s=predicted_forward)
            if predicted_full is not None and predicted_full > max_seconds:
                if predicted_forward is not None and predicted_forward <= 2 * max_seconds:
                    mode = "forward"
                    row["reason"] = (f"forward + backward predicted {predicted_full:.0f} s > {max_seconds:.0f} s "
                                     "limit; forward only, under torch.no_grad()")
                else:
                    row.update(mode="skipped", reason=(
                        f"forward + backward predicted {predicted_full:.0f} s > {max_seconds:.0f} s and forward "
                        f"{predicted_forward or float('nan'):.0f} s > {2 * max_seconds:.0f} s"))
                    log(f"  T = {T:>6} {name:<9} skipped: {row['reason']}")
                    rows.append(row)
                    continue
            else:
                mode = "forward+backward"
            row["mode"] = mode
            backward = mode == "forward+backward"
            run_repeats, run_warmup = (repeats, warmup) if backward else (1, 0)
            generator = torch.Generator().manual_seed(T)
            if name == "sdpa":
                q, k, v = (torch.randn(B, H, T, D, generator=generator).requires_grad_() for _ in range(3))
                step = sdpa_step(q, k, v, backward)
            else:  # the attention mixer (the whole layer: projections, RoPE, SDPA, output) or an MC layer
                layer = make_attention_layer(s) if name == "attention" else make_layer(s, name)
                x = torch.randn(B, T, width, generator=generator).requires_grad_()
                step = layer_step(layer, x, "chunked", backward)
            log(f"  T = {T:>6} {name:<9} {mode}, {run_repeats} run(s) after {run_warmup} warm-up ...")
            result = time_runs(step, run_repeats, run_warmup)
            row.update(result)
            if backward:
                history[name]["full"].append((T, result["median_s"]))
            history[name]["forward"].append((T, result["forward_median_s"]))
            del step
            if not quick:
                gc.collect()
            log(f"    median {result['median_s']:.3f} s (forward {result['forward_median_s']:.3f} s)")
            rows.append(row)
    return add_ratios(rows)


def add_ratios(rows: list) -> list:
    """Set each MC row's ratios to the SDPA row at the same T (in place; returns ``rows``).

    ``ratio_to_sdpa`` / ``cpu_ratio_to_sdpa``: wall-clock / CPU medians over SDPA's, only when both ran in the
    same mode (both forward + backward, or both forward only). ``forward_ratio_to_sdpa``: forward medians.
    """
    sdpa = {row["seq_len"]: row for row in rows if row["name"] == "sdpa" and "median_s" in row}
    mixer = {row["seq_len"]: row for row in rows if row["name"] == "attention" and "median_s" in row}
    for row in rows:
        base = sdpa.get(row["seq_len"])
        if row["name"] == "sdpa" or base is None or "median_s" not in row:
            continue
        row["forward_ratio_to_sdpa"] = row["forward_median_s"] / base["forward_median_s"]
        if base["mode"] == row["mode"]:
            row["ratio_to_sdpa"] = row["median_s"] / base["median_s"]
            row["cpu_ratio_to_sdpa"] = row["median_cpu_s"] / base["median_cpu_s"]
        layer = mixer.get(row["seq_len"])  # the whole attention layer: the like-for-like baseline of an MC layer
        if row["name"] != "attention" and layer is not None and layer["mode"] == row["mode"]:
            row["ratio_to_attention_layer"] = row["median_s"] / layer["median_s"]
    return rows


def cached_state_counts(settings: dict, deep: dict, sizes: list) -> list:
    """Values in one layer's cached states per sequence, from a real memory pass, against the formula."""
    s = settings
    H, width, C = s["n_heads"], s["d_model"], s["segment_len"]
    D = width // H
    rows = []
    for T in sizes:
        x = torch.randn(1, T, width, generator=torch.Generator().manual_seed(T))
        for name in VARIANTS:
            layer = make_layer(s, name)
            with torch.no_grad():
                memory = layer.memory_pass(layer.project(x), impl="chunked")
            states = memory.cached_states  # [1, N, H, D, D]
            n_segments = -(-T // C)
            values = states.numel() // x.shape[0]
            expected = n_segments * H * D * D
            rows.append(dict(name=name, memory="linear", seq_len=T, segment_len=C, n_segments=n_segments, n_heads=H,
                             head_dim=D, values=values, expected=expected, formula="N*H*d^2",
                             matches=values == expected, dtype=str(states.dtype).replace("torch.", ""),
                             bytes=states.numel() * states.element_size() // x.shape[0],
                             read_by_aggregation=name != "none"))
    T = min(sizes)
    x = torch.randn(1, T, width, generator=torch.Generator().manual_seed(T))
    layer = make_layer(s, "grm", memory="dla", expansion=deep["expansion"], minibatch_len=deep["minibatch_len"])
    with torch.no_grad():
        w1, w2 = layer.memory_pass(layer.project(x), impl="chunked").cached_states  # [1, N, H, E, D], [1, N, H, D, E]
    n_segments = -(-T // C)
    values = (w1.numel() + w2.numel()) // x.shape[0]
    expected = n_segments * H * 2 * deep["expansion"] * D * D
    rows.append(dict(name="grm", memory="dla", seq_len=T, segment_len=C, n_segments=n_segments, n_heads=H,
                     head_dim=D, expansion=deep["expansion"], values=values, expected=expected,
                     formula="N*H*2*e*d^2", matches=values == expected, dtype=str(w1.dtype).replace("torch.", ""),
                     bytes=(w1.numel() * w1.element_size() + w2.numel() * w2.element_size()) // x.shape[0],
                     read_by_aggregation=True))
    return rows


# -- report ---------------------------------------------------------------------------------------------------


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_tables(report: dict) -> str:
    lines = []
    loop = report["chunked_vs_reference"]
    c = loop["config"]
    lines.append(f"Chunked path vs token loop (linear memory, grm, T {c['seq_len']}, d_model {c['d_model']}, "
                 f"H {c['n_heads']}, C {c['segment_len']}, chunk {c['chunk_len']}), forward + backward:")
    lines.append(f"  chunked    median {loop['chunked']['median_s']:.3f} s of {loop['chunked']['repeats']} runs "
                 f"(cpu {loop['chunked']['median_cpu_s']:.3f} s)")
    lines.append(f"  token loop {loop['reference']['median_s']:.3f} s, {loop['reference']['repeats']} run "
                 f"(cpu {loop['reference']['median_cpu_s']:.3f} s)")
    lines.append(f"  speed-up   {loop['speedup']:.1f}x wall, {loop['speedup_cpu']:.1f}x cpu "
                 f"(target >= {loop['target']:.0f}x: {'met' if loop['meets_target'] else 'NOT met'})")
    lines.append("")
    lines.append("MC layer (linear memory) vs causal SDPA, B 1, medians:")
    lines.append("(/SDPA: time over SDPA's in the same mode; cpu/SDPA: the same with process CPU time; fwd/SDPA: "
                 "forward times; /attn layer: over the whole attention mixer's, `attention`: projections, RoPE, SDPA, "
                 "output)")
    header = (f"{'T':>6}  {'variant':<9} {'mode':<17} {'runs':>4}  {'fwd s':>8}  {'fwd+bwd s':>9}  {'cpu s':>8}  "
              f"{'/SDPA':>6}  {'cpu/SDPA':>8}  {'fwd/SDPA':>8}  {'/attn layer':>11}")
    lines.append(header)
    lines.append("-" * len(header))
    for row in report["layer_vs_sdpa"]:
        if row["mode"] == "skipped":
            lines.append(f"{row['seq_len']:>6}  {row['name']:<9} {'skipped':<17} {'':>4}  {row['reason']}")
            continue
        full = row["median_s"] if row["mode"] == "forward+backward" else None
        cpu = row["median_cpu_s"]
        lines.append(f"{row['seq_len']:>6}  {row['name']:<9} {row['mode']:<17} {row['repeats']:>4}  "
                     f"{row['forward_median_s']:>8.3f}  {_seconds(full):>9}  {cpu:>8.3f}  "
                     f"{_ratio(row.get('ratio_to_sdpa')):>6}  {_ratio(row.get('cpu_ratio_to_sdpa')):>8}  "
                     f"{_ratio(row.get('forward_ratio_to_sdpa')):>8}  "
                     f"{_ratio(row.get('ratio_to_attention_layer')):>11}")
    lines.append("")
    lines.append("Cached states per layer and sequence (values; float32):")
    for row in report["cached_states"]:
        lines.append(f"  {row['memory']:<6} {row['name']:<9} T {row['seq_len']:>6}  N {row['n_segments']:>4}  "
                     f"{row['values']:>12,}  = {row['formula']} {row['expected']:>12,}: "
                     f"{'ok' if row['matches'] else 'MISMATCH'}  ({row['bytes'] / 2**20:.1f} MiB)")
    return "\n".join(lines)


def _parse_sizes(text: str) -> list:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: expected comma-separated integers") from error
    if not sizes or any(size <= 0 for size in sizes):
        raise argparse.ArgumentTypeError(f"--sizes {text!r}: expected positive integers")
    return sorted(sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mcdist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds); the smoke test uses it")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu.json"),
                        help="JSON file to write (default benchmarks/results/cpu.json)")
    parser.add_argument("--sizes", type=_parse_sizes, default=None,
                        help="comma-separated sequence lengths for the layer vs SDPA runs (default 4096,16384,65536;"
                             " --quick: 64,128)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--table", metavar="JSON", default=None,
                        help="print the tables of an earlier report and exit (measures nothing)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="run forward only (if predicted within twice this) or skip a measurement whose one "
                             "forward + backward is predicted to take longer (default 60; --quick: 10)")
    return parser


def main(argv: Optional[list] = None) -> int:
    """Run the benchmark, print the tables and write the JSON report. Returns the exit status (0)."""
    args = build_parser().parse_args(argv)
    if args.table is not None:
        with open(args.table, encoding="utf-8") as handle:
            report = json.load(handle)
        add_ratios(report["layer_vs_sdpa"])
        print(format_tables(report))
        return 0
    if args.threads <= 0:
        raise SystemExit(f"--threads = {args.threads}; expected a positive integer")
    torch.set_num_threads(args.threads)
    settings = quick_settings() if args.quick else full_settings()
    sizes = args.sizes or settings["sizes"]
    max_seconds = args.max_seconds if args.max_seconds is not None else (10.0 if args.quick else 60.0)
    for T in sizes:
        if T % settings["layer"]["segment_len"] != 0:
            print(f"note: T = {T} is not a multiple of C = {settings['layer']['segment_len']}; the last segment is "
                  "partial", file=sys.stderr)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = dict(environment=environment(), quick=args.quick, command=["python", "-m", "mcdist.bench"] + list(
        argv if argv is not None else sys.argv[1:]), settings=dict(settings, sizes=sizes, max_seconds=max_seconds),
        dtype="float32")
    sections = {}
    mark = time.perf_counter()
    report["chunked_vs_reference"] = chunked_vs_reference(settings["loop"], log)
    sections["chunked_vs_reference"], mark = time.perf_counter() - mark, time.perf_counter()
    report["layer_vs_sdpa"] = layer_vs_sdpa(settings["layer"], sizes, args.quick, max_seconds, log)
    sections["layer_vs_sdpa"], mark = time.perf_counter() - mark, time.perf_counter()
    report["cached_states"] = cached_state_counts(settings["layer"], settings["deep"], sizes)
    sections["cached_states"] = time.perf_counter() - mark
    report["section_wall_s"] = sections
    report["environment"]["load_average_end"] = load_average()
    report["total_wall_s"] = time.perf_counter() - started

    write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    print(format_tables(report))
    print(f"\nwrote {args.out} ({report['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
