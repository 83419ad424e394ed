"""Tokens/s and peak memory per rank of the trainer under sequence parallelism on the CPU (prints a table and
writes JSON; not a test).

    python benchmarks/train_cpu.py [--cases 65536x2,65536x4,1048576x4] [--steps 2] [--model default|tiny]
                                   [--malloc-mmap-threshold 131072] [--out benchmarks/results/train_cpu.json]

Each case ``LxP`` runs ``mcdist.train.trainer.launch_local`` (the code path of ``mcdist train`` without
``--ray``: P spawned gloo processes, one thread per rank on this 2-core machine) on MQAR with ``seq_len = L``,
``batch_size = 1``, ``parallel.sp = P`` (zigzag), per-block activation checkpointing on, for ``--steps``
optimizer steps, then one evaluation batch and the final save (as every run ends). From ``metrics.jsonl``:
tokens/s of every step (the trainer's clock around the step: forward, backward, gradient all-reduce, AdamW) and
the peak RSS (``ru_maxrss``, the maximum over the ranks, which the trainer all-reduces). Every case runs in
fresh processes, so the peak is the case's own.

Models (``--model``): ``default`` is ``ModelConfig()`` (d_model 128, 2 layers, 2 heads of 64, linear memory,
grm, checkpoint) with ``segment_len`` 1024 and ``chunk_len`` 64 instead of 64 and 16: the read costs
O(L²/C · d²), and at C = 64 a 1M-token step would be 16× the work. ``tiny`` is the model of
``benchmarks/sp_cpu.py`` (d_model 64, 2 heads of 32), the only one whose 1M-token step finishes in a session on
2 cores. ``--malloc-mmap-threshold`` sets ``MALLOC_MMAP_THRESHOLD_`` for the ranks so glibc returns freed blocks
(see docs/benchmarks.md, Sequence parallelism: its allocator otherwise keeps the growing per-segment temporaries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODELS = {
    "default": ["model.segment_len=1024", "model.chunk_len=64"],
    "tiny": ["model.d_model=64", "model.n_heads=2", "model.segment_len=1024", "model.chunk_len=64"],
}


def run_case(seq_len: int, sp: int, steps: int, model: str, out_dir: str, timeout_s: float) -> dict:
    from mcdist.config import RunConfig
    from mcdist.train.trainer import launch_local

    overrides = MODELS[model] + [
        "train.task=mqar", f"train.seq_len={seq_len}", "train.batch_size=1", f"train.steps={steps}",
        "train.warmup_steps=0", "train.log_every=1", f"train.eval_every={steps}", "train.eval_batches=1",
        "train.activation_checkpointing=true", "train.progress=false", "train.device=cpu", "train.resume=never",
        "train.num_kv_pairs=8", f"train.out_dir={out_dir}", f"parallel.sp={sp}", "parallel.layout=zigzag",
        f"parallel.timeout_s={timeout_s}"]
    config = RunConfig().with_overrides(overrides)
    start = time.perf_counter()
    result = launch_local(config, timeout_s=timeout_s)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    train = [r for r in records if r["kind"] == "train"]
    rates = [r["tokens_per_s"] for r in train]
    return {
        "seq_len": seq_len, "sp": sp, "tokens_per_rank": seq_len // sp, "model": model, "steps": len(train),
        "tokens_per_s": rates, "tokens_per_s_median": statistics.median(rates),
        "step_s_median": seq_len / statistics.median(rates),
        "peak_rss_gib_max_over_ranks": max(r["peak_memory_bytes"] for r in train) / 2**30,
        "losses": [r["loss"] for r in train], "wall_s": wall, "num_params": result.get("num_params"),
        "comm_bytes_per_step": train[-1].get("comm_bytes_per_step"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="65536x2,65536x4,1048576x4",
                        help="comma-separated LxP (sequence length x sp ranks)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per case")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    cases = []
    for item in args.cases.split(","):
        try:
            length, ranks = (int(x) for x in item.lower().split("x"))
        except ValueError:
            parser.error(f"--cases: {item!r} is not LxP (e.g. 65536x2)")
        cases.append((length, ranks))
    if args.malloc_mmap_threshold:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # inherited by the spawned ranks

    import torch

    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                           "torch": torch.__version__, "load_average_before": os.getloadavg()},
               "model": args.model, "model_overrides": MODELS[args.model], "steps": args.steps,
               "malloc_mmap_threshold": args.malloc_mmap_threshold, "cases": []}
    print(f"{'L':>9} {'P':>2} {'tokens/rank':>11} {'tok/s (median)':>14} {'step s':>8} {'peak RSS/rank GiB':>17} "
          f"{'wall s':>8}")
    for length, ranks in cases:
        folder = tempfile.mkdtemp(prefix="mcdist-train-bench-")
        try:
            row = run_case(length, ranks, args.steps, args.model, os.path.join(folder, "run"), args.timeout)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row["load_average_after"] = os.getloadavg()
        results["cases"].append(row)
        print(f"{length:>9} {ranks:>2} {row['tokens_per_rank']:>11} {row['tokens_per_s_median']:>14,.0f} "
              f"{row['step_s_median']:>8.1f} {row['peak_rss_gib_max_over_ranks']:>17.2f} {row['wall_s']:>8.1f}",
              flush=True)
        if args.out:
            with open(args.out + ".tmp", "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=2)
            os.replace(args.out + ".tmp", args.out)
    return results


if __name__ == "__main__":
    main()
