"""MQAR recall by model, length and number of key-value pairs (prints a table, writes JSON and a PNG; not a test).

    python benchmarks/recall.py [--config examples/main_job.json] [--set section.key=value ...]
                                [--models attention,none,residual,grm,soup,ssc] [--seq-lens 128,256]
                                [--pairs 6,16] [--seeds 0,1,2] [--out benchmarks/results/recall.json]
                                [--plot benchmarks/results/recall.png] [--toy]

Every cell (model × seq_len × pairs × seed) is one training run of the real trainer
(:func:`mcdist.train.trainer.run_training`) in this process (sp = dp = 1, one thread), from the config with the
model's overrides (those of ``mcdist compare``: :func:`mcdist.train.compare.model_overrides`) and
``train.seq_len``, ``train.num_kv_pairs``, ``train.seed`` of the cell; the score is the trainer's last evaluation
(query accuracy on held-out batches). The JSON is rewritten after every cell, and a rerun with the same
arguments skips the cells it already holds (resumable); a cell run under a different config is run again.
The plot has one panel per pair count: accuracy against length per model, the mean over seeds with the
lowest and highest seed as a band. ``--toy`` is a tiny model and two steps (seconds; for tests).
docs/results.md has the runs behind make run's recipe (the default grid itself takes hours on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time

import torch

from mcdist.config import ConfigError, RunConfig, write_text_atomic
from mcdist.train.compare import model_overrides, parse_model_names
from mcdist.train.trainer import run_training

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "main_job.json")
TOY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.segment_len=8",
       "model.chunk_len=4", "train.batch_size=2", "train.steps=2", "train.warmup_steps=1", "train.eval_every=2",
       "train.eval_batches=1", "train.log_every=1"]


def _int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < minimum for value in values) or len(set(values)) != len(values):
        raise ConfigError(f"{option} = {text!r} is invalid; expected a comma-separated list of distinct integers "
                          f">= {minimum}")
    return values


def cell_key(model: str, seq_len: int, pairs: int, seed: int) -> str:
    """The name of one cell in the JSON, e.g. ``grm/L128/n6/s0``."""
    return f"{model}/L{seq_len}/n{pairs}/s{seed}"


def cell_run(base: RunConfig, model: str, seq_len: int, pairs: int, seed: int, out_dir: str) -> RunConfig:
    """The run of one cell: ``base`` with the model's overrides and the cell's task size and seed."""
    return base.with_overrides(model_overrides(model) + [
        f"train.seq_len={seq_len}", f"train.num_kv_pairs={pairs}", f"train.seed={seed}", "parallel.sp=1",
        "parallel.dp=1", "train.progress=false", "train.checkpoint_every=0", "train.resume=never",
        f"train.out_dir={out_dir}"])


def fingerprint(run: RunConfig) -> str:
    """A hash of what a cell's result depends on (the model and training sections, out_dir left out)."""
    data = run.to_dict()
    data["train"] = {key: value for key, value in data["train"].items() if key != "out_dir"}
    text = json.dumps({"model": data["model"], "train": data["train"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_cells(base: RunConfig, models, seq_lens, pairs_list, seeds, out_path: str, log=print) -> dict:
    """Train every cell not already in ``out_path`` (same fingerprint), rewriting the JSON after each."""
    results = {"cells": {}}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as handle:
            results = json.load(handle)
    cells = results.setdefault("cells", {})
    with tempfile.TemporaryDirectory(prefix="mcdist-recall-") as scratch:
        for pairs in pairs_list:
            for seq_len in seq_lens:
                for model in models:
                    for seed in seeds:
                        key = cell_key(model, seq_len, pairs, seed)
                        run = cell_run(base, model, seq_len, pairs, seed, os.path.join(scratch, key.replace("/", "-")))
                        stamp = fingerprint(run)
                        if cells.get(key, {}).get("fingerprint") == stamp:
                            continue
                        started = time.perf_counter()
                        trained = run_training(run)
                        cells[key] = {"model": model, "seq_len": seq_len, "num_kv_pairs": pairs, "seed": seed,
                                      "eval_accuracy": trained["eval_accuracy"], "eval_loss": trained["eval_loss"],
                                      "train_loss": trained["loss"], "seconds": time.perf_counter() - started,
                                      "num_params": trained.get("num_params"), "fingerprint": stamp}
                        write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
                        if log:
                            log(f"{key:<22} accuracy {trained['eval_accuracy']:.3f}  "
                                f"({cells[key]['seconds']:.0f} s)")
    write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def summary(cells: dict, models, seq_lens, pairs_list, seeds) -> dict:
    """{pairs: {model: {seq_len: [accuracy per seed]}}} of the requested cells."""
    return {pairs: {model: {seq_len: [cells[cell_key(model, seq_len, pairs, seed)]["eval_accuracy"]
                                      for seed in seeds] for seq_len in seq_lens} for model in models}
            for pairs in pairs_list}


def plot(table: dict, seq_lens, path: str) -> None:
    """One panel per pair count: mean accuracy over seeds against seq_len, min-max band, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.6), squeeze=False)
    for axis, (pairs, by_model) in zip(axes[0], table.items()):
        for model, by_length in by_model.items():
            runs = [by_length[length] for length in seq_lens]
            mean = [sum(values) / len(values) for values in runs]
            line, = axis.plot(seq_lens, mean, marker="o", label=model)
            axis.fill_between(seq_lens, [min(v) for v in runs], [max(v) for v in runs], color=line.get_color(),
                              alpha=0.15)
        axis.set_xscale("log", base=2)
        axis.set_xticks(seq_lens, [str(length) for length in seq_lens])
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("sequence length")
        axis.set_ylabel("MQAR query accuracy")
        axis.set_title(f"{pairs} key-value pairs")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the RunConfig of every cell (default: "
                                                                 "examples/main_job.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--models", default="attention,none,residual,grm,soup,ssc")
    parser.add_argument("--seq-lens", default="128,256")
    parser.add_argument("--pairs", default="6,16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="benchmarks/results/recall.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--toy", action="store_true", help="a tiny model, two steps (seconds)")
    args = parser.parse_args(argv)
    try:
        models = parse_model_names(args.models)
        seq_lens = _int_list(args.seq_lens, "--seq-lens")
        pairs_list = _int_list(args.pairs, "--pairs")
        seeds = _int_list(args.seeds, "--seeds", minimum=0)
        base = RunConfig.load(args.config).with_overrides((TOY if args.toy else []) + args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"recall: error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    results = run_cells(base, models, seq_lens, pairs_list, seeds, args.out)
    table = summary(results["cells"], models, seq_lens, pairs_list, seeds)
    plot(table, seq_lens, args.plot or os.path.splitext(args.out)[0] + ".png")
    for pairs, by_model in table.items():
        print(f"{pairs} pairs: mean accuracy over seeds {seeds}")
        for model, by_length in by_model.items():
            print(f"  {model:<10} " + "  ".join(f"L {length}: {sum(v) / len(v):.3f}" for length, v in by_length.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
