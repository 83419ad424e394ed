"""Ray overhead: the same small job through Ray Train and through ``launch_local`` (spawned gloo processes).

    python benchmarks/ray_overhead.py [--config examples/main_job.json] [--steps 60] [--repeats 1]
                                      [--out benchmarks/results/ray_overhead.json]

Three ways to run one job (the config's model, dp × sp and task, ``--steps`` steps, a checkpoint halfway and at
the end, fresh output folders in a temporary directory):

* ``spawned``: ``launch_local`` (``mcdist train`` without ``--ray``): dp·sp processes, spawned and joined;
* ``ray (cold)``: ``train_with_ray`` with no Ray running: it starts a local Ray, runs, and stops it;
* ``ray (warm)``: ``train_with_ray`` inside ``ray_session``: the Ray start is paid once, outside the timing
  (a second job on a running cluster; the start itself is reported as ``ray_start_s``).

Wall-clock seconds cover everything the caller waits for; ``train tokens/s`` is the trainer's own figure (the
training steps only), ``end-to-end tokens/s`` = tokens / wall seconds. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from mcdist.config import RunConfig


def _job(config: RunConfig, steps: int, out_dir: str) -> RunConfig:
    half = max(steps // 2, 1)
    return config.with_overrides([f"train.steps={steps}", f"train.checkpoint_every={half}",
                                  f"train.eval_every={steps}", f"train.log_every={max(steps // 6, 1)}",
                                  f"train.warmup_steps={min(config.train.warmup_steps, half)}",
                                  "train.resume=never", "train.progress=false", f"train.out_dir={out_dir}",
                                  f"ray.workers={config.parallel.world_size}"])


def _row(mode: str, config: RunConfig, wall: float, result: dict, **extra) -> dict:
    tokens = config.train.steps * config.train.grad_accum * config.train.batch_size * config.train.seq_len
    return {"mode": mode, "wall_s": wall, "train_s": result.get("elapsed_s"),
            "train_tokens_per_s": result.get("tokens_per_s"), "end_to_end_tokens_per_s": tokens / wall,
            "eval_loss": result.get("eval_loss"), **extra}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="examples/main_job.json")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/ray_overhead.json")
    args = parser.parse_args(argv)

    from mcdist.train.ray_job import ray_session, train_with_ray
    from mcdist.train.trainer import launch_local

    base = RunConfig.load(args.config)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcdist-ray-overhead-") as folder:
        for repeat in range(args.repeats):
            config = _job(base, args.steps, os.path.join(folder, f"spawned-{repeat}"))
            start = time.perf_counter()
            result = launch_local(config)
            rows.append(_row("spawned", config, time.perf_counter() - start, result))

            config = _job(base, args.steps, os.path.join(folder, f"ray-cold-{repeat}"))
            start = time.perf_counter()
            result = train_with_ray(config, log=None)
            rows.append(_row("ray (cold)", config, time.perf_counter() - start, result))

            config = _job(base, args.steps, os.path.join(folder, f"ray-warm-{repeat}"))
            start = time.perf_counter()
            with ray_session(config, log=None):
                ray_start = time.perf_counter() - start
                start = time.perf_counter()
                result = train_with_ray(config, log=None)
                rows.append(_row("ray (warm)", config, time.perf_counter() - start, result,
                                 ray_start_s=ray_start))
            for row in rows[-3:]:
                print(json.dumps(row), flush=True)

    job = _job(base, args.steps, "-")
    print(f"\n{args.config}: {job.model.memory}/{job.model.aggregation}, dp {job.parallel.dp} × sp {job.parallel.sp}, "
          f"{args.steps} steps of {job.train.batch_size}×{job.train.seq_len} tokens, "
          f"checkpoints every {job.train.checkpoint_every} steps")
    print(f"{'mode':<12} {'wall s':>8} {'train s':>8} {'train tok/s':>12} {'end-to-end tok/s':>17}")
    for row in rows:
        print(f"{row['mode']:<12} {row['wall_s']:>8.1f} {row['train_s']:>8.1f} {row['train_tokens_per_s']:>12,.0f} "
              f"{row['end_to_end_tokens_per_s']:>17,.0f}")
    report = {"config": args.config, "steps": args.steps, "cpu_count": os.cpu_count(),
              "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "machine": platform.platform(), "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
