"""Helpers of the fault-injection suite: the tiny run, the reference curve, a child trainer that SIGKILLs itself
at a chosen point, and the table of faults injected / survived / runs with lost or changed data.

Trials: ``MCDIST_FAULT_TRIALS`` (the soak, ``make test-faults``) or the fast default of each test; the points
are drawn from ``random.Random(MCDIST_FAULT_SEED + trial)``, so a failing trial reruns alone with its seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch

from mcdist.checkpoint import load_model
from mcdist.config import RunConfig
from mcdist.train import state as ckpt
from mcdist.train.trainer import TrainCallbacks

TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.segment_len=8",
        "model.chunk_len=4", "model.minibatch_len=4", "train.seq_len=32", "train.batch_size=2",
        "train.num_kv_pairs=3", "train.steps=5", "train.warmup_steps=1", "train.lr=1e-2", "train.log_every=1",
        "train.eval_every=100", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
        "train.checkpoint_every=1", "train.keep_last=2", "train.max_shard_size=4KB"]
STEPS = 5

TABLE: dict[str, dict] = {}  # fault kind -> {"injected", "survived", "lost_or_changed"}


def tiny(out_dir, *overrides) -> RunConfig:
    return RunConfig().with_overrides([*TINY, f"train.out_dir={out_dir}", *overrides])


def trials(default: int) -> int:
    return int(os.environ.get("MCDIST_FAULT_TRIALS", default))


def rng(trial: int) -> random.Random:
    return random.Random(int(os.environ.get("MCDIST_FAULT_SEED", "0")) * 1_000_003 + trial)


def record(kind: str, *, survived: bool, lost_or_changed: bool = False) -> None:
    row = TABLE.setdefault(kind, {"injected": 0, "survived": 0, "lost_or_changed": 0})
    row["injected"] += 1
    row["survived"] += int(survived)
    row["lost_or_changed"] += int(lost_or_changed)


def format_table(rows: dict) -> list[str]:
    lines = [f"{'fault':<44} {'injected':>8} {'survived':>8} {'lost/changed':>12}",
             f"{'-' * 44} {'-' * 8} {'-' * 8} {'-' * 12}"]
    for kind in sorted(rows):
        row = rows[kind]
        lines.append(f"{kind:<44} {row['injected']:>8} {row['survived']:>8} {row['lost_or_changed']:>12}")
    total = {key: sum(row[key] for row in rows.values()) for key in ("injected", "survived", "lost_or_changed")}
    lines.append(f"{'all':<44} {total['injected']:>8} {total['survived']:>8} {total['lost_or_changed']:>12}")
    return lines


def losses(out_dir) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [(e["step"], e["loss"]) for e in map(json.loads, handle) if e["kind"] == "train"]


def weights(path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


def listing(out_dir) -> dict[str, bytes]:
    """Every file under ``out_dir`` with its bytes: what a refused run must leave as it was."""
    found = {}
    for folder, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, out_dir)] = handle.read()
    return found


class KillRankAtStep(TrainCallbacks):
    """Rank ``rank`` SIGKILLs its own process once ``step`` is reported, the first time only (a marker file)."""

    all_ranks = True

    def __init__(self, rank: int, step: int, marker: str):
        self.rank, self.step, self.marker = rank, step, marker

    def on_metrics(self, metrics: dict) -> None:
        import torch.distributed as dist

        if metrics["kind"] == "train" and metrics["step"] == self.step and dist.get_rank() == self.rank \
                and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


# A trainer that kills itself (SIGKILL: no clean-up, no finally) at one point of one step:
#   forward   the n-th module forward of step s
#   backward  the gradient of the n-th module output of step s
#   optimizer inside the optimizer step of step s (its pre hook for an even seed, else its post hook)
#   save      before the n-th file-system operation (write, fsync, rename, replace, unlink, link, rmtree) of the
#             save of step s; at an fsync the file is first cut to a random length (a torn write)
# It appends each checkpoint it completed to ``<marker>.saved`` (so the test knows what must survive) and
# creates ``marker`` just before dying.
CHILD = r"""
import json, os, random, shutil, signal, sys
import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
torch.set_num_threads(1)
from mcdist.config import RunConfig
from mcdist.train import state
from mcdist.train.trainer import TrainCallbacks, run_training

overrides, point, at_step, at_call, seed, marker = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
chance = random.Random(seed)
now = {"step": 0, "calls": 0, "saving": False}

def die(what):
    with open(marker, "w") as handle:
        handle.write(what)
    os.kill(os.getpid(), signal.SIGKILL)

def count(what):
    if now["step"] + 1 == at_step or (point == "save" and now["saving"] == at_step):
        now["calls"] += 1
        if now["calls"] == at_call:
            die(what)

class Saved(TrainCallbacks):
    def on_checkpoint(self, step, path, metrics):
        with open(marker + ".saved", "a") as handle:
            handle.write(f"{step}\n")
            handle.flush()
            os.fsync(handle.fileno())

def after_step(optimizer, args, kwargs):
    if point == "optimizer" and now["step"] + 1 == at_step and seed % 2 == 1:
        die("optimizer post-hook")
    now["step"] += 1

if point == "forward":
    register_module_forward_hook(lambda module, args, out: count(f"forward {type(module).__name__}"))
elif point == "backward":
    def forward_hook(module, args, out):
        if torch.is_tensor(out) and out.requires_grad and now["step"] + 1 == at_step:
            out.register_hook(lambda grad: count(f"backward {type(module).__name__}"))
    register_module_forward_hook(forward_hook)
elif point == "optimizer":
    register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: count("optimizer pre-hook") if seed % 2 == 0 else None)
register_optimizer_step_post_hook(after_step)

if point == "save":
    original_save = state.save_training_checkpoint
    def save(root, step, **kwargs):
        now["saving"] = step
        try:
            return original_save(root, step, **kwargs)
        finally:
            now["saving"] = False
    state.save_training_checkpoint = save

    def counted(module, name, torn=False):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            if now["saving"] == at_step:
                now["calls"] += 1
                if now["calls"] == at_call:
                    if torn and isinstance(args[0], int):
                        size = os.fstat(args[0]).st_size
                        os.ftruncate(args[0], chance.randrange(size + 1))
                    die(f"save: {name}")
            return original(*args, **kwargs)
        setattr(module, name, wrapped)
    for name in ("rename", "replace", "unlink", "link", "write"):
        counted(os, name)
    counted(os, "fsync", torn=True)
    counted(shutil, "rmtree")

run_training(RunConfig().with_overrides(overrides), callbacks=Saved())
print("finished without being killed", flush=True)
"""


def kill_child(tmp_path, out_dir, point: str, at_step: int, at_call: int, seed: int, timeout_s: float = 240):
    """Run the CHILD trainer on ``out_dir`` until it kills itself; return ``(killed, what, saved_steps)``."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    marker = tmp_path / f"killed-{point}-{at_step}-{at_call}"
    overrides = [*TINY, f"train.out_dir={out_dir}"]
    child = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), point, str(at_step), str(at_call),
                              str(seed), str(marker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = child.communicate(timeout=timeout_s)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    killed = child.returncode == -signal.SIGKILL
    if not killed and b"finished without being killed" not in output:
        raise AssertionError(f"the child trainer failed (status {child.returncode}):\n{output.decode()[-3000:]}")
    what = marker.read_text() if marker.exists() else ""
    saved_file = f"{marker}.saved"
    saved = [int(line) for line in open(saved_file)] if os.path.exists(saved_file) else []
    return killed, what, saved


def wait_for(path, process, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(f"the child ended (status {process.returncode}) before {path} appeared:\n"
                                 + (process.stdout.read().decode()[-3000:] if process.stdout else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.05)


def checkpoint_steps(out_dir) -> list[int]:
    return [step for step, _ in ckpt.step_dirs(ckpt.checkpoints_dir(out_dir))]


class ResumeFromPerRank(TrainCallbacks):
    """Rank r resumes from ``paths[r]`` (as if a rank read a damaged copy of the checkpoint)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def resume_from(self):
        import torch.distributed as dist

        return self.paths[dist.get_rank()]
