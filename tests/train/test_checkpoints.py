"""Training checkpoints: atomic saves, keep-last-K, corrupt or incompatible checkpoints refused, killed saves,
resume modes, export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mcdist.checkpoint import CheckpointError, load_model
from mcdist.cli import main
from mcdist.config import RunConfig
from mcdist.train import state as ckpt
from mcdist.train.trainer import TrainCallbacks, run_training

TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.segment_len=8",
        "model.chunk_len=4", "model.minibatch_len=4", "train.seq_len=32", "train.batch_size=2",
        "train.num_kv_pairs=3", "train.steps=2", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=100",
        "train.eval_batches=1", "train.progress=false", "train.device=cpu", "train.checkpoint_every=1"]


def tiny(out_dir, *overrides) -> RunConfig:
    return RunConfig().with_overrides([*TINY, f"train.out_dir={out_dir}", *overrides])


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [(e["step"], e["loss"]) for e in map(json.loads, handle) if e["kind"] == "train"]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished 2-step run with checkpoints step-1 and step-2 (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("two-steps") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(tiny(out))
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(source, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def test_keep_last_k_and_no_leftovers(tmp_path):
    run_training(tiny(tmp_path, "train.steps=5", "train.keep_last=2"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000004", "step-000005"]
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == str(tmp_path / "checkpoints" / "step-000005")
    manifest = ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-000005")
    assert manifest["step"] == 5
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "run_config.json", "training_state.pt"]


def _flip_byte(path, offset=-9):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, words", [
    (lambda d: _flip_byte(d / "model.safetensors"), ["model.safetensors is corrupt", "sha256"]),
    (lambda d: (d / "training_state.pt").write_bytes((d / "training_state.pt").read_bytes()[:100]),
     ["training_state.pt is corrupt", "bytes"]),
    (lambda d: (d / "COMPLETE").unlink(), ["is incomplete (no COMPLETE marker)"]),
    (lambda d: (d / "COMPLETE").write_text("{\"step\": 2"), ["corrupt manifest"]),
    (lambda d: (d / "run_config.json").unlink(), ["missing run_config.json"]),
])
def test_a_corrupt_latest_checkpoint_is_refused_naming_the_path(two_steps, tmp_path, damage, words):
    out = copy_run(two_steps, tmp_path)
    damage(out / "checkpoints" / "step-000002")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as error:
        run_training(tiny(out, "train.steps=4"))
    message = str(error.value)
    assert str(out / "checkpoints" / "step-000002") in message
    for word in words:
        assert word in message
    assert (out / "metrics.jsonl").read_text() == before  # nothing ran: not silently a fresh or older start


def test_an_unreadable_training_state_is_refused_even_with_a_matching_manifest(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path)
    folder = out / "checkpoints" / "step-000002"
    (folder / "training_state.pt").write_bytes(b"not a torch file")
    manifest = json.loads((folder / "COMPLETE").read_text())
    manifest["files"]["training_state.pt"] = {"bytes": 16, "sha256": ckpt._sha256(str(folder / "training_state.pt"))}
    (folder / "COMPLETE").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="training_state.pt: unreadable training state"):
        run_training(tiny(out, "train.steps=4"))


def test_a_failure_between_write_and_rename_leaves_the_previous_checkpoint(two_steps, tmp_path, monkeypatch):
    out = copy_run(two_steps, tmp_path)
    root = out / "checkpoints"

    def fail(tmp, final):
        assert os.path.isfile(os.path.join(tmp, "COMPLETE"))  # everything was written ...
        raise OSError("disk vanished")  # ... and then the rename failed

    monkeypatch.setattr(ckpt, "_publish", fail)
    with pytest.raises(OSError, match="disk vanished"):
        run_training(tiny(out, "train.steps=3"))
    assert sorted(os.listdir(root)) == ["step-000001", "step-000002"]  # no step-3, no temporary folder
    assert ckpt.latest_checkpoint(root) == str(root / "step-000002")
    monkeypatch.undo()
    result = run_training(tiny(out, "train.steps=3"))
    assert result["resumed_from"] == str(root / "step-000002") and result["step"] == 3


KILLED_SAVE = r"""
import os, sys, time, json, torch
torch.set_num_threads(1)
from mcdist.config import RunConfig
from mcdist.train import state
from mcdist.train.trainer import run_training

overrides, marker = json.loads(sys.argv[1]), sys.argv[2]
original = state._write_training_state

def write_then_hang(path, training_state):
    if training_state["step"] == 3:  # write half of step 3's state, then wait to be killed
        original(path, training_state)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        open(marker, "w").close()
        time.sleep(600)
    original(path, training_state)

state._write_training_state = write_then_hang
run_training(RunConfig().with_overrides(overrides))
"""


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "saving"
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    overrides = [*TINY, f"train.out_dir={out}", "train.steps=4"]
    child = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never reached the save of step 3"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    root = out / "checkpoints"
    names = sorted(os.listdir(root))
    assert len(names) == 3 and names[0].startswith(".tmp-step-000003") and names[1:] == ["step-000001", "step-000002"]
    assert ckpt.latest_checkpoint(root) == str(root / "step-000002")

    result = run_training(tiny(out, "train.steps=4"))  # resumes from step 2, cleans the killed save's folder
    assert result["resumed_from"] == str(root / "step-000002") and result["step"] == 4
    assert sorted(os.listdir(root)) == ["step-000002", "step-000003", "step-000004"]
    run_training(tiny(tmp_path / "straight", "train.steps=4"))
    assert losses(out) == losses(tmp_path / "straight")


def test_resume_modes(two_steps, tmp_path):
    fresh = run_training(tiny(tmp_path / "fresh", "train.steps=1"))  # auto without a checkpoint: a fresh start
    assert fresh["resumed_from"] is None and fresh["step"] == 1
    out = copy_run(two_steps, tmp_path)
    with pytest.raises(CheckpointError, match=r"resume = 'never' but .*checkpoints.* already holds checkpoints"):
        run_training(tiny(out, "train.resume=never"))
    with pytest.raises(CheckpointError, match="/nonexistent/ckpt"):
        run_training(tiny(tmp_path / "other", "train.resume=/nonexistent/ckpt"))
    # an explicit path, and a callback's path (Ray's), both win over the latest
    step1 = str(out / "checkpoints" / "step-000001")
    result = run_training(tiny(tmp_path / "explicit", f"train.resume={step1}", "train.steps=2"))
    assert result["resumed_from"] == step1 and losses(tmp_path / "explicit") == losses(two_steps)[1:]

    class FromCallback(TrainCallbacks):
        def resume_from(self):
            return str(out)  # a run's out_dir: its latest checkpoint

    result = run_training(tiny(tmp_path / "callback", "train.steps=3"), callbacks=FromCallback())
    assert result["resumed_from"] == str(out / "checkpoints" / "step-000002") and result["step"] == 3


@pytest.mark.parametrize("overrides, words", [
    (["model.d_model=24"], ["model.d_model = 16 there, 24 here"]),
    (["model.aggregation=none"], ["model.aggregation = 'grm' there, 'none' here"]),
    (["train.batch_size=4"], ["train.batch_size = 2 there, 4 here"]),
    (["train.seed=1"], ["train.seed = 0 there, 1 here"]),
])
def test_an_incompatible_checkpoint_is_refused(two_steps, tmp_path, overrides, words):
    out = copy_run(two_steps, tmp_path)
    with pytest.raises(CheckpointError) as error:
        run_training(tiny(out, "train.steps=4", *overrides))
    assert str(out / "checkpoints" / "step-000002") in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_longer_schedule_resumes_and_a_finished_run_is_not_retrained(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path)
    again = run_training(tiny(out))  # steps = 2 are done: evaluate, keep the checkpoints as they are
    assert again["step"] == 2 and again["resumed_from"].endswith("step-000002")
    assert losses(out) == losses(two_steps)
    # more steps (the schedule is recomputed) and other kernels (model.impl chooses how, not what)
    longer = run_training(tiny(out, "train.steps=3", "model.impl=chunked"))
    assert longer["step"] == 3 and [step for step, _ in losses(out)] == [1, 2, 3]


def test_export_writes_weights_and_config_only(two_steps, tmp_path, capsys):
    target = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(two_steps), "--output", str(target)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "model.safetensors"]
    exported, config = load_model(target)
    trained, _ = load_model(two_steps / "checkpoints" / "step-000002")
    assert config == tiny(tmp_path).model
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))

    assert main(["export", "--checkpoint", str(two_steps / "checkpoints" / "step-000001"), "--output",
                 str(target), "--dtype", "bfloat16"]) == 0  # replaces the earlier export
    half, _ = load_model(target)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}

    assert main(["export", "--checkpoint", str(two_steps), "--output", str(two_steps)]) == 2  # not a weights dir
    assert "is not a weights-only checkpoint" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_reads_the_run_config_inside_a_training_checkpoint(two_steps, capsys):
    assert main(["eval", "--checkpoint", str(two_steps / "checkpoints" / "step-000002"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 32


def test_sharded_training_checkpoints_resume_and_export(two_steps, tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(tiny(out, "train.steps=1", "train.max_shard_size=4KB"))
        step1 = out / "checkpoints" / "step-000001"
        names = sorted(os.listdir(step1))
        assert "model.safetensors.index.json" in names and "model.safetensors" not in names
        shards = [n for n in names if n.startswith("model-")]
        assert len(shards) >= 2
        manifest = ckpt.verify_checkpoint(step1)
        assert set(shards) <= set(manifest["files"])  # every shard is listed with its size and sha256
        run_training(tiny(out, "train.max_shard_size=4KB"))  # resumes from the sharded step 1
    finally:
        torch.set_num_threads(threads)
    assert losses(out) == losses(two_steps)  # same loss curve as the straight single-file run

    # a damaged shard makes the checkpoint fail its manifest, naming the shard
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "checkpoints" / "step-000002", damaged)
    shard = sorted(n for n in os.listdir(damaged) if n.startswith("model-"))[0]
    with open(damaged / shard, "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        handle.write(b"\xff\xff")
    with pytest.raises(CheckpointError, match=shard):
        ckpt.verify_checkpoint(damaged)

    target = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(out), "--output", str(target)]) == 0  # keeps the layout
    files = json.loads(capsys.readouterr().out)["files"]
    assert "model.safetensors.index.json" in files and "training_state.pt" not in files
    trained, _ = load_model(out / "checkpoints" / "step-000002")
    exported, _ = load_model(target)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))
    assert main(["export", "--checkpoint", str(out), "--output", str(target), "--max-shard-size", "1GB"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "model.safetensors"]  # one file again
    exported, _ = load_model(target)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))
    assert main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "x"), "--max-shard-size", "0"]) == 2
    assert "--max-shard-size: size '0' is invalid" in capsys.readouterr().err
