"""Recall by model, length and number of key-value pairs, each model at its best learning rate (prints a table,
writes JSON and a PNG; not a test).

    python benchmarks/recall.py [--config examples/main_job.json] [--set section.key=value ...]
                                [--set-for model:section.key=value ...]
                                [--models attention,none,residual,grm,soup,ssc,titans:none,titans:grm]
                                [--task mqar|passkey] [--seq-lens 128,256] [--pairs 6,16] [--cells 64:8,128:16]
                                [--seeds 0,1,2] [--lrs 1e-3,3e-3,1e-2] [--sweep each|first] [--tie 0.01]
                                [--sweep-seeds 1] [--params COUNT|MODEL] [--keep-stale] [--report]
                                [--merge a.json,b.json]
                                [--out benchmarks/results/recall.json]
                                [--plot benchmarks/results/recall.png] [--toy]

Every run is one training run of the real trainer (:func:`mcdist.train.trainer.run_training`) in this process
(sp = dp = 1, one thread), from the config with the model's overrides (those of ``mcdist compare``:
:func:`mcdist.train.compare.model_overrides`; ``titans:grm`` also sets the memory, a plain aggregation keeps the
config's) and ``train.seq_len``, ``train.num_kv_pairs``, ``train.seed``, ``train.lr`` of the run; its score is
the trainer's last evaluation (query accuracy on held-out batches). A task cell is one (length, pairs): the
product of ``--seq-lens`` and ``--pairs``, or the ``--cells`` listed (``L:n``; passkey: ``--seq-lens`` only).

The learning-rate sweep: in each cell (``--sweep first``: in the first cell only) each model first trains on the
first seed (``--sweep-seeds N``: on each of the first N) at every rate of ``--lrs``; the lowest rate whose accuracy
(the mean over those seeds) is within ``--tie`` (0.01) of the sweep's best is its rate there (``first``: in every
cell), and the other seeds train at it. Every sweep runs before any
further seed, so a study stopped early has every model at every rate on the sweep's seeds. A run whose loss
diverges (the
trainer's FloatingPointError) is kept as ``diverged`` and ranks last; a seed that diverges at the chosen rate is
left out of the mean and listed; when every rate of a sweep diverges the study stops with exit status 1. The
JSON is rewritten after every run, and a rerun with the same arguments skips the runs it already holds
(resumable); a run under a different config is trained again, and so is one made by other code (each run records
``code``, a hash of the ``mcdist`` package's sources; the old run is kept in the JSON's ``stale`` list;
``--keep-stale`` reuses it instead). ``--set-for MODEL:section.key=value`` changes one
model's runs only (e.g. ``titans:grm:model.inner_lr=0.03``; recorded in the JSON as ``set_for``). ``--params grm``
(or a count) gives every model the MLP width (``model.mlp_ratio``) whose parameter count is nearest grm's (the
models compared at the same size; recorded in the JSON as ``params`` and in ``set_for``). A stored run replaced
because its config changed is kept in ``stale`` too. ``--merge a.json,b.json`` adds other studies' runs (two
processes' halves of one grid) to ``--out`` and reports it; a run held differently by two files is refused. The plot
(each model at its rate, the mean over seeds and the lowest and highest seed as a band) has one panel of
accuracy against length for each pair count held at two or more lengths, and one against the pairs for each
length held at two or more pair counts: a cross grid such as ``--cells 64:12,128:12,256:12,128:6,128:24`` gives
panel A (length, at 12 pairs) and panel B (pairs, at length 128), a product grid of ``--seq-lens`` × ``--pairs``
one of each per value; a grid with neither (cells on a diagonal) is one panel, by cell. ``--toy`` is a tiny model and
two steps (seconds; for tests). docs/results.md has the study's commands and tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch

from mcdist.config import ConfigError, RunConfig, write_text_atomic
from mcdist.model import MCLanguageModel
from mcdist.train.checks import check_run
from mcdist.train.compare import model_overrides, parse_model_names
from mcdist.train.trainer import run_training

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples", "main_job.json")
TOY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.segment_len=8",
       "model.chunk_len=4", "model.minibatch_len=4", "train.batch_size=2", "train.steps=2", "train.warmup_steps=1",
       "train.eval_every=2", "train.eval_batches=1", "train.log_every=1"]
TASKS = ("mqar", "passkey")


def _int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < minimum for value in values) or len(set(values)) != len(values):
        raise ConfigError(f"{option} = {text!r} is invalid; expected a comma-separated list of distinct integers "
                          f">= {minimum}")
    return values


def _lr_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v <= 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--lrs = {text!r} is invalid; expected a comma-separated list of distinct positive numbers "
                          "such as 1e-3,3e-3,1e-2")
    return values


def _cell_list(text: str) -> list[tuple[int, int]]:
    cells = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        length, _, pairs = part.partition(":")
        try:
            cell = (int(length), int(pairs))
        except ValueError:
            cell = (0, 0)
        if min(cell) < 1 or cell in cells:
            cells = []
            break
        cells.append(cell)
    if not cells:
        raise ConfigError(f"--cells = {text!r} is invalid; expected distinct length:pairs items such as 64:8,128:16")
    return cells


def group_key(model: str, seq_len: int, pairs) -> str:
    """The name of one model in one task cell, e.g. ``grm/L128/n6`` (passkey: ``grm/L128/passkey``)."""
    return f"{model}/L{seq_len}/" + ("passkey" if pairs is None else f"n{pairs}")


def cell_key(model: str, seq_len: int, pairs, seed: int, lr: float) -> str:
    """The name of one run in the JSON, e.g. ``grm/L128/n6/s0/lr0.003``."""
    return f"{group_key(model, seq_len, pairs)}/s{seed}/lr{lr:g}"


# what every run sets itself (the model's name, the cell, the seed and the rate): --set-for may not change them
RUN_KEYS = ("model.mixer", "model.memory", "model.aggregation", "train.task", "train.seq_len", "train.num_kv_pairs",
            "train.seed", "train.lr", "parallel.sp", "parallel.dp", "train.out_dir")


def parse_set_for(items, models) -> dict:
    """``--set-for MODEL:section.key=value`` items as {model: [overrides]}, each model one of ``models``; the split
    is at the last colon before the '=' (``titans:grm:model.inner_lr=0.03``). A key the study sets per run
    (:data:`RUN_KEYS`) is refused."""
    overrides_for: dict = {}
    for item in items:
        head, equals, value = item.partition("=")
        name, colon, key = head.rpartition(":")
        name, key = name.strip(), key.strip()
        if not colon or not name or not key or not equals:
            raise ConfigError(f"--set-for {item!r} is invalid; expected MODEL:section.key=value, e.g. "
                              "titans:grm:model.inner_lr=0.03")
        if name not in models:
            raise ConfigError(f"--set-for {item!r} names model {name!r}, which is not in --models {list(models)}")
        if key in RUN_KEYS:
            raise ConfigError(f"--set-for {item!r} sets {key}, which every run sets itself (the model, the cell, the "
                              "seed, the rate of --lrs); expected another key")
        overrides_for.setdefault(name, []).append(f"{key}={value.strip()}")
    return overrides_for


def cell_run(base: RunConfig, model: str, seq_len: int, pairs, seed: int, lr: float, out_dir: str,
             extra=()) -> RunConfig:
    """One run: ``base`` with the model's overrides, then ``extra`` (its --set-for), and the cell's task size,
    seed and learning rate."""
    task = ["train.task=passkey"] if pairs is None else ["train.task=mqar", f"train.num_kv_pairs={pairs}"]
    return base.with_overrides(model_overrides(model) + list(extra) + task + [
        f"train.seq_len={seq_len}", f"train.seed={seed}", f"train.lr={lr!r}", "parallel.sp=1", "parallel.dp=1",
        "train.progress=false", "train.checkpoint_every=0", "train.resume=never", f"train.out_dir={out_dir}"])


def count_params(run: RunConfig) -> int:
    """The number of parameters of ``run``'s model (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        model = MCLanguageModel(run.model)
    return sum(parameter.numel() for parameter in model.parameters())


def _ratio_for(hidden: int, width: int) -> float:
    """An ``mlp_ratio`` whose MLP width ``int(ratio * width)`` (:class:`mcdist.model.Block`) is exactly ``hidden``."""
    ratio = hidden / width
    return ratio if int(ratio * width) == hidden else (hidden + 0.5) / width


def match_params(base: RunConfig, models, target: str, cell, overrides_for) -> tuple[dict, dict]:
    """``--params``: the MLP width (``model.mlp_ratio``) of each model that brings its parameter count nearest
    ``target``, a count (``"100000"``) or one of ``models`` (its count under the config and its --set-for: that
    model keeps its width). ``cell``: (seq_len, pairs) of a run to count (the counts do not depend on it). The
    count is linear in the width (3 · d_model weights a unit per layer, SwiGLU), so the width is solved from two
    counts and checked by a third. Returns ({model: ["model.mlp_ratio=…"]} for the models it resizes, and the
    record {"target", "reference", "counts" {model: its count}, "mlp_hidden" {model: its width}}). A model whose
    --set-for sets ``model.mlp_ratio`` itself, or a target no width ≥ 1 reaches, is a ConfigError."""
    def counted(model, extra=()):
        run = cell_run(base, model, cell[0], cell[1], 0, base.train.lr, "unused",
                       list(overrides_for.get(model, ())) + list(extra))
        return run, count_params(run)

    for model in models:
        if any(item.split("=", 1)[0].strip() == "model.mlp_ratio" for item in overrides_for.get(model, ())):
            raise ConfigError(f"--params {target} sets every model's model.mlp_ratio, and --set-for sets {model}'s "
                              "too; expected one of them")
    if target.strip().isdigit():
        reference, goal = None, int(target)
        if goal < 1:
            raise ConfigError(f"--params = {target!r} is invalid; expected a positive parameter count or a model of "
                              f"--models {list(models)}")
    elif target.strip() in models:
        reference = target.strip()
        goal = counted(reference)[1]
    else:
        raise ConfigError(f"--params = {target!r} is invalid; expected a parameter count (e.g. 100000) or a model of "
                          f"--models {list(models)}")
    widths, record = {}, {"target": goal, "reference": reference, "counts": {}, "mlp_hidden": {}}
    for model in models:
        run, count = counted(model)
        hidden = int(run.model.mlp_ratio * run.model.d_model)
        if model != reference:
            width = run.model.d_model
            step = counted(model, [f"model.mlp_ratio={_ratio_for(hidden + 1, width)!r}"])[1] - count
            best = hidden + round((goal - count) / step)
            if best < 1:
                raise ConfigError(f"--params {target}: {model} has {count - (hidden - 1) * step:,} parameters at an "
                                  f"MLP width of 1, over the target {goal:,}; expected a larger target")
            override = f"model.mlp_ratio={_ratio_for(best, width)!r}"
            run, count = counted(model, [override])
            hidden = int(run.model.mlp_ratio * width)
            assert hidden == best and abs(count - goal) <= step, (model, hidden, best, count, goal)
            widths[model] = [override]
        record["counts"][model], record["mlp_hidden"][model] = count, hidden
    return widths, record


def fingerprint(run: RunConfig) -> str:
    """A hash of what a run's result depends on (the model and training sections, out_dir left out)."""
    data = run.to_dict()
    data["train"] = {key: value for key, value in data["train"].items() if key != "out_dir"}
    text = json.dumps({"model": data["model"], "train": data["train"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_version(root=None) -> str:
    """A hash of the code a run's result depends on: every ``.py`` file (path and bytes) under ``root``, by default
    the imported ``mcdist`` package. A stored run made by other code is not reused (:func:`run_cells`)."""
    if root is None:
        import mcdist
        root = os.path.dirname(os.path.abspath(mcdist.__file__))
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as handle:
                    digest.update(handle.read() + b"\0")
    return digest.hexdigest()[:12]


TIE = 0.01  # sweep accuracies within this of the best tie; the lowest tied rate wins


def best_lr(cells: dict, model: str, seq_len: int, pairs, seeds, lrs, tie: float = TIE) -> float:
    """The sweep's rate: the lowest rate whose accuracy (the mean over ``seeds``, the sweep's seeds) is within ``tie`` of the sweep's highest (a higher rate that wins by less is not worth its risk:
    recurrent models fail on other seeds near their highest stable rate); a rate whose loss diverged on any of
    the seeds never wins. Raises RuntimeError when every rate diverged."""
    finished = {}
    for lr in lrs:
        runs = [cells[cell_key(model, seq_len, pairs, seed, lr)] for seed in seeds]
        if not any(run.get("diverged") for run in runs):
            finished[lr] = sum(run["eval_accuracy"] for run in runs) / len(runs)
    if not finished:
        raise RuntimeError(f"{group_key(model, seq_len, pairs)}: the loss diverged at every rate of {list(lrs)}; "
                           "expected lower rates in --lrs")
    top = max(finished.values())
    return min(lr for lr, accuracy in finished.items() if accuracy >= top - tie)


def run_cells(base: RunConfig, models, groups, seeds, lrs, out_path: str, log=print, sweep: str = "each",
              overrides_for=None, tie: float = TIE, keep_stale: bool = False, code=None, sweep_seeds: int = 1,
              params=None) -> dict:
    """Train every run not already in ``out_path`` (same fingerprint, made by this code: :func:`code_version`),
    rewriting the JSON after each: first each
    model's sweep over ``lrs`` on the first ``sweep_seeds`` seeds in every task cell of ``groups`` ((seq_len, pairs
    or None); with ``sweep = "first"`` in the first cell only, its best rate (on the mean of those seeds) then
    holding in every cell), then the other seeds (every seed, in the cells not swept) at each model's rate.
    ``overrides_for``: {model: [overrides]} of that model's runs (``--set-for``, and ``--params``' widths),
    recorded in the JSON as ``set_for``; ``params``: what ``--params`` matched (recorded as ``params``). A stored
    run under the same config but made by other code (or with no code version: before it was recorded) is
    trained again, the old one moved to the JSON's ``stale`` list, unless ``keep_stale`` (then it counts as it
    is); a stored run under another config is trained again and moved to ``stale`` too (nothing is dropped).
    ``code``: this code's version (default :func:`code_version`)."""
    overrides_for = overrides_for or {}
    code = code or code_version()
    results = {"cells": {}}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as handle:
            results = json.load(handle)
    cells = results.setdefault("cells", {})
    chosen = results.setdefault("best_lr", {})
    recorded = results.setdefault("set_for", {})
    if params is not None:
        results["params"] = params
    for model in models:
        if overrides_for.get(model):
            recorded[model] = list(overrides_for[model])
        else:
            recorded.pop(model, None)
    swept = groups if sweep == "each" else groups[:1]
    probe = seeds[:sweep_seeds]
    total = len(models) * (len(swept) * (len(lrs) - 1) * len(probe) + len(groups) * len(seeds))
    done = [0]

    def train(scratch, model, seq_len, pairs, seed, lr):
        done[0] += 1
        key = cell_key(model, seq_len, pairs, seed, lr)
        run = cell_run(base, model, seq_len, pairs, seed, lr, os.path.join(scratch, key.replace("/", "-")),
                       overrides_for.get(model, ()))
        stamp = fingerprint(run)
        stored = cells.get(key)
        if stored is not None and stored.get("fingerprint") == stamp:
            if keep_stale or stored.get("code") == code:
                return
            results.setdefault("stale", []).append(dict(stored, key=key))
            if log:
                made = stored.get("code", "not recorded")
                log(f"[{done[0]}/{total}] {key}: the stored run was made by other code ({made}, now {code}): "
                    "training it again (--keep-stale keeps it)")
        elif stored is not None:
            results.setdefault("stale", []).append(dict(stored, key=key, replaced="config"))
            if log:
                log(f"[{done[0]}/{total}] {key}: the stored run was made under another config: training it again "
                    "(the old one is kept in the JSON's stale list)")
        started = time.perf_counter()
        try:
            trained = run_training(run)
        except FloatingPointError as error:  # a rate too high for this model: a result of the sweep, kept
            trained = {"eval_accuracy": None, "eval_loss": None, "loss": None, "diverged": str(error)}
        cells[key] = {"model": model, "seq_len": seq_len, "num_kv_pairs": pairs, "seed": seed, "lr": lr,
                      "task": run.train.task, "eval_accuracy": trained["eval_accuracy"],
                      "eval_loss": trained["eval_loss"], "train_loss": trained["loss"],
                      "seconds": time.perf_counter() - started, "num_params": trained.get("num_params"),
                      "fingerprint": stamp, "code": code}
        if "diverged" in trained:
            cells[key]["diverged"] = trained["diverged"]
        write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
        if log:
            score = "diverged" if "diverged" in trained else f"accuracy {trained['eval_accuracy']:.3f}"
            log(f"[{done[0]}/{total}] {key:<30} {score}  ({cells[key]['seconds']:.0f} s)")

    with tempfile.TemporaryDirectory(prefix="mcdist-recall-") as scratch:
        for seq_len, pairs in swept:
            for model in models:
                for seed in probe:
                    for lr in lrs:
                        train(scratch, model, seq_len, pairs, seed, lr)
                chosen[group_key(model, seq_len, pairs)] = best_lr(cells, model, seq_len, pairs, probe, lrs, tie)
        for seq_len, pairs in groups[len(swept):]:
            for model in models:
                chosen[group_key(model, seq_len, pairs)] = chosen[group_key(model, *groups[0])]
        write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
        for index, (seq_len, pairs) in enumerate(groups):
            for model in models:
                for seed in seeds[len(probe):] if index < len(swept) else seeds:
                    train(scratch, model, seq_len, pairs, seed, chosen[group_key(model, seq_len, pairs)])
    write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def merge_studies(out_path: str, paths) -> dict:
    """``--merge``: the runs, rates, ``set_for``, ``params`` and ``stale`` runs of the study JSONs ``paths`` (e.g.
    two processes' halves of one grid) added to ``out_path`` (created when missing), which is rewritten once and
    returned. A run key, a group's rate, a model's ``set_for`` or the ``params`` target held by two files with
    different contents is a ConfigError (nothing is written): each run must come from one place."""
    results = {"cells": {}}
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as handle:
            results = json.load(handle)
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                other = json.load(handle)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--merge reads {path!r}: {error}") from None
        for section in ("cells", "best_lr", "set_for"):
            mine = results.setdefault(section, {})
            for key, value in other.get(section, {}).items():
                if key in mine and mine[key] != value:
                    shown = "" if section == "cells" else f" ({value!r} against {mine[key]!r})"
                    raise ConfigError(f"--merge: {path} and --out or the files before it hold {section} {key!r} "
                                      f"differently{shown}; expected it in one file only")
                mine[key] = value
        if "params" in other:
            if "params" in results and results["params"]["target"] != other["params"]["target"]:
                raise ConfigError(f"--merge: {path} matched {other['params']['target']:,} parameters and the files "
                                  f"before it {results['params']['target']:,}; expected one target")
            merged = results.setdefault("params", dict(other["params"], counts={}, mlp_hidden={}))
            for field in ("counts", "mlp_hidden"):
                merged[field].update(other["params"][field])
            if merged.get("reference") != other["params"].get("reference"):
                merged["reference"] = None  # the target is the count itself
        stale = results.setdefault("stale", [])
        stale.extend(run for run in other.get("stale", []) if run not in stale)  # merging again adds nothing
        if not stale:
            del results["stale"]
    write_text_atomic(out_path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def summary(results: dict, models, groups, seeds, fingerprints=None, code=None, keep_stale=False) -> dict:
    """{group key: {"lr", "seeds" and "accuracy" (per seed, at the model's rate), "mean", "spread" (max − min),
    "diverged" (seeds whose loss diverged at that rate: left out of the mean and spread), "missing" (seeds with no
    run at that rate, or, given ``fingerprints`` {run key: fingerprint}, none under that config), "stale" (given
    ``code``: seeds whose run there was made by other code: also "missing", or counted with ``keep_stale``),
    "num_params"}}. A group whose sweep has not run has ``lr`` None and every seed missing."""
    table = {}
    for seq_len, pairs in groups:
        for model in models:
            group = group_key(model, seq_len, pairs)
            lr = results.get("best_lr", {}).get(group)
            runs, missing, stale = {}, [], []
            for seed in seeds:
                key = None if lr is None else cell_key(model, seq_len, pairs, seed, lr)
                run = results["cells"].get(key)
                if run is None or (fingerprints is not None and run.get("fingerprint") != fingerprints.get(key)):
                    missing.append(seed)
                else:
                    if code is not None and run.get("code") != code:
                        stale.append(seed)
                        if not keep_stale:
                            missing.append(seed)
                            continue
                    runs[seed] = run
            done = [seed for seed, run in runs.items() if not run.get("diverged")]
            accuracy = [runs[seed]["eval_accuracy"] for seed in done]
            table[group] = {"model": model, "seq_len": seq_len, "num_kv_pairs": pairs, "lr": lr, "seeds": done,
                            "accuracy": accuracy, "mean": sum(accuracy) / len(accuracy) if accuracy else None,
                            "spread": max(accuracy) - min(accuracy) if accuracy else None,
                            "diverged": [seed for seed, run in runs.items() if run.get("diverged")],
                            "missing": missing, "stale": stale,
                            "num_params": next((run.get("num_params") for run in runs.values()
                                                if run.get("num_params")), None)}
    return table


def plot_panels(groups) -> list:
    """The panels of a grid of (length, pairs) cells: ``("length", n)`` for each pair count n held at two or more
    lengths (accuracy against length), then ``("pairs", L)`` for each length L held at two or more pair counts
    (against the pairs). A product grid has both kinds for every value, a cross grid (one fixed pair count, one
    fixed length) one of each; a grid with neither (one cell, or cells on a diagonal: length and pairs varied
    together) is one panel, ``("cells", None)``, its cells side by side."""
    lengths = sorted({seq_len for seq_len, _ in groups})
    pair_counts = sorted({pairs for _, pairs in groups}, key=lambda n: -1 if n is None else n)
    panels = [("length", pairs) for pairs in pair_counts if sum(1 for _, n in groups if n == pairs) >= 2]
    panels += [("pairs", seq_len) for seq_len in lengths
               if sum(1 for length, n in groups if length == seq_len and n is not None) >= 2]
    return panels or [("cells", None)]


def plot(table: dict, models, groups, path: str) -> dict:
    """Accuracy per model (the mean over seeds, the lowest and highest seed as a band) in the panels of
    :func:`plot_panels`: against length at a fixed pair count, against the pairs at a fixed length, or (a grid
    with neither) by cell. Returns what each panel drew: {title: {model: (xs, means)}} (xs: lengths, pair
    counts, or "L64/n12" cell names)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(groups)
    cell_names = [f"L{seq_len}/" + ("passkey" if pairs is None else f"n{pairs}") for seq_len, pairs in groups]
    drawn = {}
    figure, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for index, (axis, (along, fixed)) in enumerate(zip(axes[0], panels)):
        if along == "length":
            title = "accuracy vs length, " + ("passkey" if fixed is None else f"{fixed} key-value pairs")
        elif along == "pairs":
            title = f"accuracy vs pairs, length {fixed}"
        else:
            title = "accuracy by cell"
        if len(panels) > 1:
            title = f"{chr(ord('A') + index)}: {title}"
        drawn[title] = {}
        for model in models:
            rows = {(row["seq_len"], row["num_kv_pairs"]): row for row in table.values()
                    if row["model"] == model and row["accuracy"]}
            if along == "length":
                points = [(seq_len, rows[seq_len, pairs]) for seq_len, pairs in sorted(rows) if pairs == fixed]
            elif along == "pairs":
                points = sorted(((pairs, rows[seq_len, pairs]) for seq_len, pairs in rows
                                 if seq_len == fixed and pairs is not None), key=lambda point: point[0])
            else:
                points = [(position, rows[cell]) for position, cell in enumerate(groups) if cell in rows]
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [row["mean"] for _, row in points]
            line, = axis.plot(xs, means, marker="o", label=model)
            axis.fill_between(xs, [min(row["accuracy"]) for _, row in points],
                              [max(row["accuracy"]) for _, row in points], color=line.get_color(), alpha=0.15)
            drawn[title][model] = ([cell_names[x] for x in xs] if along == "cells" else xs, means)
        if along == "length":
            ticks = sorted({seq_len for seq_len, pairs in groups if pairs == fixed})
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(tick) for tick in ticks])
            axis.minorticks_off()
            axis.set_xlabel("sequence length")
        elif along == "pairs":
            ticks = sorted({pairs for seq_len, pairs in groups if seq_len == fixed and pairs is not None})
            axis.set_xticks(ticks, [str(tick) for tick in ticks])
            axis.set_xlabel("key-value pairs")
        else:
            axis.set_xticks(range(len(groups)), cell_names)
            axis.set_xlabel("cell (length / pairs)")
        axis.set_title(title, fontsize=10)
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("query accuracy (mean, min-max band)")
        axis.grid(alpha=0.3)
    if axes[0][-1].get_legend_handles_labels()[0]:  # nothing to name when no model has a run yet
        axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".recall-", suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(handle)
    try:  # crash-safe: a complete PNG or the previous one
        figure.savefig(temporary, dpi=110, format="png")
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        if os.path.exists(temporary):
            os.remove(temporary)
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the RunConfig of every run (default: "
                                                                 "examples/main_job.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--set-for", dest="set_for", action="append", default=[], metavar="MODEL:SECTION.KEY=VALUE",
                        help="an override for one model's runs only, e.g. titans:grm:model.inner_lr=0.03")
    parser.add_argument("--models", default="attention,none,residual,grm,soup,ssc")
    parser.add_argument("--task", default="mqar", help=f"one of {list(TASKS)}")
    parser.add_argument("--seq-lens", default="128,256")
    parser.add_argument("--pairs", default="6,16")
    parser.add_argument("--cells", default=None, help="length:pairs items instead of --seq-lens × --pairs (mqar)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=None, help="learning rates of the sweep (default: the config's train.lr)")
    parser.add_argument("--sweep", default="each", help="sweep the rates in each cell, or in the first only")
    parser.add_argument("--sweep-seeds", type=int, default=1,
                        help="score the sweep on the mean of this many of the first seeds (default 1)")
    parser.add_argument("--params", default=None, metavar="COUNT|MODEL",
                        help="give every model the MLP width (model.mlp_ratio) whose parameter count is nearest "
                             "COUNT, or that of MODEL (one of --models, which keeps its width)")
    parser.add_argument("--tie", type=float, default=TIE,
                        help=f"sweep accuracies within this of the best tie; the lowest tied rate wins (default {TIE})")
    parser.add_argument("--keep-stale", action="store_true",
                        help="reuse (and report) stored runs made by other code instead of training them again")
    parser.add_argument("--out", default="benchmarks/results/recall.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--toy", action="store_true", help="a tiny model, two steps (seconds)")
    parser.add_argument("--merge", default=None, metavar="A.json,B.json",
                        help="train nothing: add these study JSONs' runs to --out, then report as --report does")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the table, JSON summary and plot of the runs --out holds under this "
                             "config (each model at its rate there; seeds without such a run are listed as missing)")
    args = parser.parse_args(argv)
    try:
        models = parse_model_names(args.models)
        overrides_for = parse_set_for(args.set_for, models)
        if args.task not in TASKS:
            raise ConfigError(f"--task = {args.task!r} is invalid; expected one of {list(TASKS)}")
        seeds = _int_list(args.seeds, "--seeds", minimum=0)
        base = RunConfig.load(args.config).with_overrides((TOY if args.toy else []) + args.overrides)
        lrs = _lr_list(args.lrs) if args.lrs is not None else [base.train.lr]
        if not (math.isfinite(args.tie) and 0.0 <= args.tie < 1.0):
            raise ConfigError(f"--tie = {args.tie!r} is invalid; expected an accuracy difference in [0, 1)")
        if args.sweep not in ("each", "first"):
            raise ConfigError(f"--sweep = {args.sweep!r} is invalid; expected 'each' or 'first'")
        if not 1 <= args.sweep_seeds <= len(seeds):
            raise ConfigError(f"--sweep-seeds = {args.sweep_seeds} is invalid; expected 1 to the {len(seeds)} seeds "
                              f"of --seeds")
        if args.task == "passkey":
            if args.cells is not None:
                raise ConfigError("--cells = length:pairs is for mqar; passkey takes --seq-lens only")
            groups = [(seq_len, None) for seq_len in _int_list(args.seq_lens, "--seq-lens")]
        elif args.cells is not None:
            groups = _cell_list(args.cells)
        else:
            seq_lens, pairs_list = _int_list(args.seq_lens, "--seq-lens"), _int_list(args.pairs, "--pairs")
            groups = [(seq_len, pairs) for pairs in pairs_list for seq_len in seq_lens]
        params = None
        if args.params is not None:
            widths, params = match_params(base, models, args.params, groups[0], overrides_for)
            for model, override in widths.items():
                overrides_for[model] = list(overrides_for.get(model, ())) + override
        for seq_len, pairs in groups:  # every run must be able to start before the first one trains
            for model in models:
                check_run(cell_run(base, model, seq_len, pairs, seeds[0], lrs[0], "unused",
                                   overrides_for.get(model, ())))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"recall: error: {error}", file=sys.stderr)
        return 2
    if params is not None:
        source = f"{params['reference']}'s" if params["reference"] else "the target"
        print(f"params: {params['target']:,} ({source}); " + ", ".join(
            f"{model} {params['counts'][model]:,} (MLP {params['mlp_hidden'][model]})" for model in models))
    fingerprints = None
    code = code_version()  # once: the runs trained here and the table below are judged by the same version
    if args.merge is not None:
        try:
            merge_studies(args.out, [path.strip() for path in args.merge.split(",") if path.strip()])
        except ConfigError as error:
            print(f"recall: error: {error}", file=sys.stderr)
            return 2
    if args.report or args.merge is not None:  # what --out holds: only the runs made under this config count
        try:
            with open(args.out, encoding="utf-8") as handle:
                results = json.load(handle)
        except (OSError, ValueError) as error:
            print(f"recall: error: --report reads --out = {args.out!r}: {error}", file=sys.stderr)
            return 2
        fingerprints = {}
        for seq_len, pairs in groups:
            for model in models:
                lr = results.get("best_lr", {}).get(group_key(model, seq_len, pairs))
                for seed in seeds:
                    if lr is not None:
                        fingerprints[cell_key(model, seq_len, pairs, seed, lr)] = fingerprint(cell_run(
                            base, model, seq_len, pairs, seed, lr, "unused", overrides_for.get(model, ())))
    else:
        torch.set_num_threads(1)
        try:
            results = run_cells(base, models, groups, seeds, lrs, args.out, sweep=args.sweep,
                                overrides_for=overrides_for, tie=args.tie, keep_stale=args.keep_stale,
                                code=code, sweep_seeds=args.sweep_seeds, params=params)
        except RuntimeError as error:  # every rate of a sweep diverged: the runs so far are in args.out
            print(f"recall: error: {error}", file=sys.stderr)
            return 1
    table = summary(results, models, groups, seeds, fingerprints, code, args.keep_stale)
    results["summary"] = table
    write_text_atomic(args.out, json.dumps(results, indent=1, sort_keys=True) + "\n")
    plot(table, models, groups, args.plot or os.path.splitext(args.out)[0] + ".png")
    rates = "its rate in the JSON" if args.report or args.merge is not None else f"its rate from {lrs}"
    print(f"mean accuracy over seeds {seeds} ± half the spread (max − min), each model at {rates}")
    for row in table.values():
        cell = "passkey" if row["num_kv_pairs"] is None else f"{row['num_kv_pairs']} pairs"
        if row["lr"] is None:
            score = "not swept (no rate in the JSON)"
        elif row["mean"] is None:
            score = "diverged" if row["diverged"] else "no run"
        else:
            score = f"{row['mean']:.3f} ± {row['spread'] / 2:.3f}"
        extra = f", seeds {row['diverged']} diverged" if row["diverged"] else ""
        extra += f", seeds {row['missing']} missing" if row["missing"] else ""
        if row["stale"]:
            extra += f", seeds {row['stale']} made by other code" + (" (kept)" if args.keep_stale else "")
        rate = "no rate" if row["lr"] is None else f"lr {row['lr']:g}"
        print(f"  L {row['seq_len']:<5} {cell:<9} {row['model']:<12} {score}  ({rate}, seeds {row['seeds']}{extra})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
