"""SIGKILL a trainer at random points (a module's forward, a gradient in the backward, the optimizer step, any
file-system operation inside a save, with a torn write at an fsync), resume, and require the loss curve and the
final weights of an uninterrupted run, resumed from the last checkpoint that completed (docs/reliability.md)."""

import collections
import os
import shutil

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

import fault_injection as fi
from mcdist.train import state as ckpt
from mcdist.train.trainer import run_training

POINTS = ("forward", "backward", "optimizer", "save")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, counting per step the module forwards, the output gradients and the file-system
    operations of each save (the ranges the kill points are drawn from)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    counts = {point: collections.Counter() for point in POINTS}
    now = {"step": 0, "saving": False}

    def forward_hook(module, args, output):
        counts["forward"][now["step"] + 1] += 1
        if torch.is_tensor(output) and output.requires_grad:
            step = now["step"] + 1
            output.register_hook(lambda grad: counts["backward"].update([step]))

    def after_step(optimizer, args, kwargs):
        counts["optimizer"][now["step"] + 1] += 1
        now["step"] += 1

    original_save = ckpt.save_training_checkpoint

    def save(root, step, **kwargs):
        now["saving"] = step
        try:
            return original_save(root, step, **kwargs)
        finally:
            now["saving"] = False

    handles = [register_module_forward_hook(forward_hook),
               register_optimizer_step_post_hook(after_step)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "save_training_checkpoint", save)
        for module, names in ((os, ("rename", "replace", "unlink", "link", "write", "fsync")), (shutil, ("rmtree",))):
            for name in names:
                original = getattr(module, name)

                def counted(*args, _original=original, **kwargs):
                    if now["saving"]:
                        counts["save"][now["saving"]] += 1
                    return _original(*args, **kwargs)

                patch.setattr(module, name, counted)
        try:
            result = run_training(fi.tiny(out))
        finally:
            for handle in handles:
                handle.remove()
            torch.set_num_threads(threads)
    assert result["step"] == fi.STEPS and all(counts[point][fi.STEPS] > 0 for point in POINTS), counts
    return {"out": out, "losses": fi.losses(out), "weights": fi.weights(result["final_model"]), "counts": counts}


def kill_and_resume(reference, tmp_path, point: str, trial: int) -> None:
    chance = fi.rng(trial)
    at_step = chance.randint(1, fi.STEPS)
    at_call = chance.randint(1, reference["counts"][point][at_step])
    out = tmp_path / f"run-{point}-{trial}"
    killed, what, saved = fi.kill_child(tmp_path, out, point, at_step, at_call, seed=trial)
    assert killed, f"the {point} fault at step {at_step}, call {at_call} was never reached"
    kind = f"SIGKILL in {what.split(':')[0].split(' ')[0]}" + (f" ({what.split(': ')[1]})" if ": " in what else "")
    survived = lost_or_changed = False
    try:
        result = run_training(fi.tiny(out))
        resumed_at = int(os.path.basename(result["resumed_from"])[5:]) if result["resumed_from"] else 0
        lost = resumed_at < max(saved, default=0)
        changed = fi.losses(out) != reference["losses"] or not fi.same_weights(
            fi.weights(result["final_model"]), reference["weights"])
        lost_or_changed = lost or changed
        survived = result["step"] == fi.STEPS and not lost_or_changed
    finally:
        fi.record(kind, survived=survived, lost_or_changed=lost_or_changed)
    assert not lost, f"{what} at step {at_step}: resumed from step {resumed_at}, but step {max(saved)} was saved"
    assert not changed, f"{what} at step {at_step}: the resumed run differs from the uninterrupted one"
    assert survived


@pytest.mark.parametrize("point", POINTS)
def test_a_trainer_killed_at_a_random_point_resumes_to_the_same_run(reference, tmp_path, point):
    kill_and_resume(reference, tmp_path, point, trial=POINTS.index(point))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_kills(reference, tmp_path):
    """``MCDIST_FAULT_TRIALS`` kills (default 24), the points drawn in turn from each kind."""
    for trial in range(fi.trials(24)):
        kill_and_resume(reference, tmp_path, POINTS[trial % len(POINTS)], trial=100 + trial)
