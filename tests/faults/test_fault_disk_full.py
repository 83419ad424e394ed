"""ENOSPC during a save (simulated: the write goes half way, then raises): the run stops with that error, the
previous checkpoint stays the latest and loads, no partial folder is left, and a resume continues the same run."""

import errno
import os

import pytest

import fault_injection as fi
from mcdist import checkpoint
from mcdist.train import state as ckpt
from mcdist.train.trainer import run_training

WRITES = ("weights", "training state", "run config", "manifest")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_training(fi.tiny(out))
    return {"losses": fi.losses(out), "weights": fi.weights(result["final_model"])}


def disk_full_at(reference, tmp_path, monkeypatch, write: str, at_step: int, trial: int) -> None:
    out = tmp_path / f"run-{trial}-{write.replace(' ', '-')}-{at_step}"
    saving = {"step": None}
    original_save = ckpt.save_training_checkpoint

    def save(root, step, **kwargs):
        saving["step"] = step
        try:
            return original_save(root, step, **kwargs)
        finally:
            saving["step"] = None

    def full(path):
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    original_tensors, original_bytes = checkpoint._write_tensors, ckpt._write_bytes

    def write_tensors(tensors, path, header):
        original_tensors(tensors, path, header)
        if write == "weights" and saving["step"] == at_step:
            full(path)

    def write_bytes(path, writer):
        original_bytes(path, writer)
        name = {ckpt.STATE_NAME: "training state", ckpt.RUN_CONFIG_NAME: "run config",
                ckpt.COMPLETE_NAME: "manifest"}.get(os.path.basename(path))
        if name == write and saving["step"] == at_step:
            full(path)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_training_checkpoint", save)
        patch.setattr(checkpoint, "_write_tensors", write_tensors)
        patch.setattr(ckpt, "_write_bytes", write_bytes)
        with pytest.raises(OSError) as error:
            run_training(fi.tiny(out))
    survived = lost_or_changed = False
    try:
        assert error.value.errno == errno.ENOSPC
        root = ckpt.checkpoints_dir(out)
        names = sorted(os.listdir(root)) if os.path.isdir(root) else []
        assert not [name for name in names if name.startswith(".")], names  # no partial folder left
        previous = at_step - 1
        latest = ckpt.latest_checkpoint(root)
        assert (latest is None) == (previous == 0)
        if latest is not None:
            assert ckpt.verify_checkpoint(latest)["step"] == previous
            fi.weights(latest)  # loads
        result = run_training(fi.tiny(out))
        lost_or_changed = (result["resumed_from"] or "").endswith(ckpt.step_dir_name(previous)) != (previous > 0) \
            or fi.losses(out) != reference["losses"] \
            or not fi.same_weights(fi.weights(result["final_model"]), reference["weights"])
        survived = not lost_or_changed
    finally:
        fi.record(f"ENOSPC writing the {write}", survived=survived, lost_or_changed=lost_or_changed)
    assert survived


@pytest.mark.parametrize("write", WRITES)
def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_loadable(reference, tmp_path, monkeypatch, write):
    disk_full_at(reference, tmp_path, monkeypatch, write, at_step=1 + WRITES.index(write) % fi.STEPS, trial=0)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_disk_full(reference, tmp_path, monkeypatch):
    for trial in range(2000, 2000 + fi.trials(20)):
        chance = fi.rng(trial)
        disk_full_at(reference, tmp_path, monkeypatch, chance.choice(WRITES), chance.randint(1, fi.STEPS), trial)
