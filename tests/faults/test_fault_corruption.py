"""Truncate, bit-flip or delete any file of the latest checkpoint (every shard, the index, the configs, the
training state, the manifest): the next run must refuse, naming the file, and leave the run folder as it was."""

import os

import pytest

import fault_injection as fi
from mcdist.checkpoint import CheckpointError
from mcdist.train import state as ckpt
from mcdist.train.trainer import run_training

DAMAGES = ("truncate", "bit-flip", "delete")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run whose checkpoints are sharded (several weight files and an index)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_training(fi.tiny(out, "train.steps=2"))
    latest = ckpt.latest_checkpoint(ckpt.checkpoints_dir(out))
    assert sum(name.startswith("model-") for name in os.listdir(latest)) >= 2
    return out


def damage(path, kind: str, chance) -> None:
    data = path.read_bytes()
    if kind == "delete":
        path.unlink()
    elif kind == "truncate":
        path.write_bytes(data[:chance.randrange(len(data))])
    else:
        flipped = bytearray(data)
        flipped[chance.randrange(len(data))] ^= 1 << chance.randrange(8)
        path.write_bytes(bytes(flipped))


def damage_and_resume(finished, tmp_path, name: str, kind: str, trial: int) -> None:
    out = fi.copy_run(finished, tmp_path / f"run-{trial}")
    latest = ckpt.latest_checkpoint(ckpt.checkpoints_dir(out))
    damage(tmp_path / f"run-{trial}" / os.path.relpath(latest, out) / name, kind, fi.rng(trial))
    before = fi.listing(out)
    refused = named = False
    try:
        with pytest.raises(CheckpointError) as error:
            run_training(fi.tiny(out, "train.steps=4"))
        refused = True
        named = name in str(error.value) and latest in str(error.value)
    finally:
        unchanged = fi.listing(out) == before
        fi.record(f"{kind} {'a shard' if name.startswith('model-') else name}", survived=refused and named,
                  lost_or_changed=not unchanged)
    assert named, f"the refusal does not name {name} in {latest}: {error.value}"
    assert unchanged, "a refused run changed the run folder"


def test_every_damaged_file_of_the_latest_checkpoint_is_refused_naming_it(finished, tmp_path):
    latest = ckpt.latest_checkpoint(ckpt.checkpoints_dir(finished))
    trial = 0
    for name in sorted(os.listdir(latest)):
        for kind in DAMAGES:
            damage_and_resume(finished, tmp_path, name, kind, trial)
            trial += 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_damage(finished, tmp_path):
    """``MCDIST_FAULT_TRIALS`` damages (default 60) of random files, kinds, offsets and lengths."""
    names = sorted(os.listdir(ckpt.latest_checkpoint(ckpt.checkpoints_dir(finished))))
    for trial in range(1000, 1000 + fi.trials(60)):
        chance = fi.rng(trial)
        damage_and_resume(finished, tmp_path, chance.choice(names), chance.choice(DAMAGES), trial)
