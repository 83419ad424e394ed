"""Training checkpoints: atomic saves, keep-last-K, corrupt or incompatible checkpoints refused, killed saves,
resume modes, export."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mcdist.checkpoint import CheckpointError, load_model
from mcdist.cli import main
from mcdist.config import ConfigError, RunConfig
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
    ckpt.write_manifest(str(folder), manifest)  # a manifest that matches the damaged file (and itself)
    with pytest.raises(CheckpointError, match="training_state.pt: unreadable training state"):
        run_training(tiny(out, "train.steps=4"))


def test_a_failure_between_write_and_rename_leaves_the_previous_checkpoint(two_steps, tmp_path, monkeypatch):
    out = copy_run(two_steps, tmp_path)
    root = out / "checkpoints"

    def fail(tmp, final):
        assert os.path.isfile(os.path.join(tmp, "COMPLETE"))  # everything was written ...
        raise OSError("disk vanished")  # ... and then the rename failed

    monkeypatch.setattr(ckpt, "replace_folder", fail)
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
from mcdist.config import ConfigError, RunConfig
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
    # more steps (the schedule is recomputed) and other kernels (train.impl chooses how, not what)
    longer = run_training(tiny(out, "train.steps=3", "train.impl=chunked"))
    assert longer["step"] == 3 and [step for step, _ in losses(out)] == [1, 2, 3]


def test_export_writes_weights_and_config_only(two_steps, tmp_path, capsys):
    target = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(two_steps), "--output", str(target)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "model.safetensors"]
    exported, config = load_model(target)
    trained, _ = load_model(two_steps / "checkpoints" / "step-000002")
    assert config == tiny(tmp_path).model
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values(),
                                                             strict=True))

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
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values(),
                                                             strict=True))
    assert main(["export", "--checkpoint", str(out), "--output", str(target), "--max-shard-size", "1GB"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "model.safetensors"]  # one file again
    exported, _ = load_model(target)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values(),
                                                             strict=True))
    assert main(["export", "--checkpoint", str(out), "--output", str(tmp_path / "x"), "--max-shard-size", "0"]) == 2
    assert "--max-shard-size: size '0' is invalid" in capsys.readouterr().err


# -- runs that fail safe: one run per out_dir, run identity, crash-safe publishing, clear refusals -------------

HOLD_LOCK = r"""
import sys, time
from mcdist.train import state
state.acquire_run_lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_one_out_dir_is_refused_and_a_dead_run_s_lock_is_taken_over(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(ConfigError) as error:
            run_training(tiny(out))
        message = str(error.value)
        assert f"pid {holder.pid} on host {socket.gethostname()!r}" in message and str(out) in message
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # refused before writing
        assert main(["train", "--quiet", *[f"--set={item}" for item in TINY], f"--set=train.out_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        holder.kill()  # SIGKILL: the lock file stays, with its record of the dead process
        holder.wait(30)
    assert (out / "run.lock").exists()
    result = run_training(tiny(out))
    assert result["step"] == 2
    err = capsys.readouterr().err
    assert "took over the lock" in err and f"pid {holder.pid}" in err
    assert not (out / "run.lock").exists()  # released at the end
    with pytest.raises(ConfigError, match="in use by another training run of this process"):
        ckpt.acquire_run_lock(out)
        ckpt.acquire_run_lock(out)
    ckpt.release_run_lock(out)


def test_a_resume_into_an_out_dir_holding_another_run_s_checkpoints_is_refused_naming_both(two_steps, tmp_path):
    other = tmp_path / "other"
    run_training(tiny(other, "train.steps=1"))  # another run: its own run id
    step1 = two_steps / "checkpoints" / "step-000001"
    with pytest.raises(CheckpointError) as error:
        run_training(tiny(other, f"train.resume={step1}", "train.steps=3"))
    message = str(error.value)
    theirs, mine = ckpt.resumed_run_id(str(other / "checkpoints" / "step-000001")), ckpt.resumed_run_id(str(step1))
    assert "holds checkpoints of another run" in message and theirs in message and mine in message
    assert str(step1) in message and str(other / "checkpoints" / "step-000001") in message
    assert sorted(os.listdir(other / "checkpoints")) == ["step-000001"]  # nothing written, nothing pruned
    # the same run, but later checkpoints than the resume point: they would stay "latest"
    out = copy_run(two_steps, tmp_path)
    with pytest.raises(CheckpointError, match="holds .*step-000002.*, later than the checkpoint to resume from"):
        run_training(tiny(out, f"train.resume={out / 'checkpoints' / 'step-000001'}", "train.steps=3"))
    # a resume keeps the run id; every checkpoint of a run carries it
    resumed = run_training(tiny(out, "train.steps=3"))
    assert resumed["step"] == 3
    ids = {ckpt.verify_checkpoint(path)["run_id"] for _, path in ckpt.step_dirs(out / "checkpoints")}
    assert ids == {mine}


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["files"].update({"config.json": "not a map"}), ["corrupt manifest", "'config.json'"]),
    (lambda m: m["files"].update({"../outside": {"bytes": 1, "sha256": "0"}}), ["corrupt manifest", "../outside"]),
    (lambda m: m.update(step=7), ["corrupt manifest", "step 7 in a folder named for step 2"]),
])
def test_a_malformed_manifest_entry_is_one_clear_error(two_steps, tmp_path, damage, words):
    out = copy_run(two_steps, tmp_path)
    folder = out / "checkpoints" / "step-000002"
    manifest = json.loads((folder / "COMPLETE").read_text())
    damage(manifest)
    ckpt.write_manifest(str(folder), {k: v for k, v in manifest.items() if k != "manifest_sha256"})
    with pytest.raises(CheckpointError) as error:
        ckpt.latest_checkpoint(out / "checkpoints")
    assert str(folder / "COMPLETE") in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_a_manifest_edited_without_its_digest_is_refused(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path)
    marker = out / "checkpoints" / "step-000002" / "COMPLETE"
    marker.write_text(marker.read_text().replace('"run_id": "', '"run_id": "x'))
    with pytest.raises(CheckpointError, match="COMPLETE: corrupt manifest .its manifest_sha256 does not match"):
        run_training(tiny(out, "train.steps=3"))


def test_an_out_dir_that_is_a_file_and_an_export_under_a_file_are_one_line_exit_2(two_steps, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out_dir, words in ((a_file, "is a file"), (a_file / "run", "lies under the file")):
        with pytest.raises(ConfigError, match=words):
            run_training(tiny(out_dir))
        assert main(["train", "--quiet", *[f"--set={item}" for item in TINY], f"--set=train.out_dir={out_dir}"]) == 2
        err = capsys.readouterr().err
        assert words in err and str(out_dir) in err and len(err.strip().splitlines()) == 1
    for output, words in ((a_file, "is a file"), (a_file / "exported", "lies under a file")):
        assert main(["export", "--checkpoint", str(two_steps), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert words in err and str(output) in err and len(err.strip().splitlines()) == 1
    assert a_file.read_text() == "x"


def test_replacing_a_folder_swaps_it_atomically(tmp_path):
    old, new = tmp_path / "step-000002", tmp_path / ".tmp-new"
    old.mkdir(), new.mkdir()
    (old / "f").write_text("old")
    (new / "f").write_text("new")
    assert ckpt._exchange(str(new), str(old))  # this Linux file system has renameat2(RENAME_EXCHANGE)
    assert (old / "f").read_text() == "new" and (new / "f").read_text() == "old"
    (new / "f").write_text("newer")
    ckpt.replace_folder(str(new), str(old))
    assert (old / "f").read_text() == "newer" and sorted(os.listdir(tmp_path)) == ["step-000002"]


def _snapshots_of_each_rename(monkeypatch, module, folder, into):
    """Copy ``folder`` before every rename/replace/unlink ``module`` makes: the states a kill could leave."""
    snapshots = []

    def snapshot():
        target = into / f"{len(snapshots):02d}"
        shutil.copytree(folder, target, symlinks=True)
        snapshots.append(target)

    for name in ("rename", "replace", "unlink"):
        original = getattr(os, name)

        def wrapped(*args, _original=original, **kwargs):
            snapshot()
            return _original(*args, **kwargs)

        monkeypatch.setattr(module.os, name, wrapped)
    return snapshots, snapshot


def test_a_re_save_killed_between_any_two_renames_leaves_the_old_or_the_new_checkpoint(two_steps, tmp_path,
                                                                                       monkeypatch):
    """The fall-back path (no atomic exchange): at every point a kill could stop it, the run that comes next
    finds step 2 whole, old or new, and says so when it had to take it back."""
    out = copy_run(two_steps, tmp_path)
    root = out / "checkpoints"
    old_manifest = ckpt.verify_checkpoint(root / "step-000002")
    monkeypatch.setattr(ckpt, "_exchange", lambda first, second: False)
    model, _ = load_model(root / "step-000002")
    snapshots, snapshot = _snapshots_of_each_rename(monkeypatch, ckpt, root, tmp_path / "snapshots")
    ckpt.save_training_checkpoint(root, 2, model=model, run_config=tiny(out), keep_last=3,
                                  state={**ckpt.load_training_state(root / "step-000002"), "note": "re-saved"},
                                  run_id=old_manifest["run_id"])
    snapshot()
    monkeypatch.undo()
    new_manifest = ckpt.verify_checkpoint(root / "step-000002")
    assert new_manifest["files"]["training_state.pt"] != old_manifest["files"]["training_state.pt"]
    seen = set()
    for folder in snapshots:
        ckpt.remove_stale(folder)  # what the next run does first (under its lock)
        manifest = ckpt.verify_checkpoint(ckpt.latest_checkpoint(folder))
        assert manifest["step"] == 2 and manifest["files"] in (old_manifest["files"], new_manifest["files"])
        seen.add("new" if manifest["files"] == new_manifest["files"] else "old")
    assert seen == {"old", "new"} and len(snapshots) >= 4


def test_an_optimizer_state_that_does_not_fit_is_a_checkpoint_error_naming_the_file(two_steps):
    path = str(two_steps / "checkpoints" / "step-000002")
    state = ckpt.load_training_state(path)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"training_state.pt: its optimizer state does not fit"):
        ckpt.restore_training_state(path, state, torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match=r"training_state.pt: its RNG states cannot be restored"):
        ckpt.restore_training_state(path, {**state, "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
                                           "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}},
                                    torch.optim.AdamW(model.parameters()))


def test_a_run_saved_before_run_ids_resumes_and_resumes_again(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path)
    for _, path in ckpt.step_dirs(out / "checkpoints"):  # as an older mcdist wrote them: no run_id, no digest
        manifest = json.loads((pathlib.Path(path) / "COMPLETE").read_text())
        for key in ("run_id", "manifest_sha256"):
            manifest.pop(key)
        (pathlib.Path(path) / "COMPLETE").write_text(json.dumps(manifest))
    assert run_training(tiny(out, "train.steps=3"))["step"] == 3
    assert run_training(tiny(out, "train.steps=4"))["step"] == 4
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]


def test_cuda_rng_states_that_cannot_be_restored_are_not_dropped_silently():
    """A checkpoint written on CUDA devices, resumed where their count differs: the CPU states come back and a
    warning says the CUDA ones could not (random draws on CUDA would differ from an uninterrupted run)."""
    state = ckpt.rng_state()
    expected = torch.rand(3)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)
    with pytest.warns(RuntimeWarning, match="CUDA RNG states are not restored"):
        ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
