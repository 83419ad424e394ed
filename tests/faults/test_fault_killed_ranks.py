"""Ranks of the spawned launcher (``launch_local``, sp = 2): a SIGKILLed rank, and a rank whose restore fails.
The killed run resumes from its last checkpoint to the same losses; a failed restore on any rank makes every
rank exit promptly with that rank's error (not the collective timeout)."""

import os
import time

import pytest
import torch

import fault_injection as fi
from mcdist.checkpoint import CheckpointError
from mcdist.train import state as ckpt
from mcdist.train.trainer import launch_local, run_training

SP2 = ["parallel.sp=2", "train.steps=4", "train.checkpoint_every=2"]


def test_a_killed_rank_resumes_from_the_last_checkpoint_to_the_same_losses(tmp_path):
    straight = launch_local(fi.tiny(tmp_path / "straight", *SP2))
    out, marker = tmp_path / "killed", tmp_path / "marker"
    survived = changed = False
    try:
        with pytest.raises(Exception):  # rank 1 dies at step 3, after the checkpoint of step 2
            launch_local(fi.tiny(out, *SP2), callbacks=fi.KillRankAtStep(1, 3, str(marker)), timeout_s=240)
        assert marker.exists(), "rank 1 was never killed"
        assert fi.checkpoint_steps(out)[-1] == 2
        result = launch_local(fi.tiny(out, *SP2), timeout_s=240)
        assert result["resumed_from"].endswith(ckpt.step_dir_name(2)) and result["step"] == 4
        changed = fi.losses(out) != fi.losses(tmp_path / "straight") or not fi.same_weights(
            fi.weights(result["final_model"]), fi.weights(straight["final_model"]))
        survived = not changed
    finally:
        fi.record("SIGKILL of rank 1 of 2 (spawned launcher)", survived=survived, lost_or_changed=changed)
    assert not changed


def test_a_failed_restore_on_one_rank_stops_every_rank_promptly_with_its_error(tmp_path):
    run_training(fi.tiny(tmp_path / "saved", "train.steps=2"))
    good = ckpt.latest_checkpoint(ckpt.checkpoints_dir(tmp_path / "saved"))
    bad = tmp_path / "bad" / "step-000002"
    fi.copy_run(good, bad)
    state = torch.load(bad / ckpt.STATE_NAME, weights_only=True)
    state["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)  # set_rng_state raises RuntimeError on it
    torch.save(state, bad / ckpt.STATE_NAME)
    manifest = ckpt.verify_checkpoint(good)
    manifest["files"][ckpt.STATE_NAME] = {"bytes": os.path.getsize(bad / ckpt.STATE_NAME),
                                          "sha256": ckpt._sha256(str(bad / ckpt.STATE_NAME))}
    ckpt.write_manifest(str(bad), {k: v for k, v in manifest.items() if k != "manifest_sha256"})
    start = time.monotonic()
    prompt = False
    try:
        with pytest.raises(CheckpointError) as error:  # parallel.timeout_s is 300 s: far longer than allowed here
            launch_local(fi.tiny(tmp_path / "run", "parallel.sp=2", "train.steps=3"),
                         callbacks=fi.ResumeFromPerRank([good, str(bad)]), timeout_s=240)
        seconds = time.monotonic() - start
        prompt = seconds < 60
    finally:
        fi.record("RNG state that does not restore, on rank 1", survived=prompt)
    assert f"{bad / ckpt.STATE_NAME}: its RNG states cannot be restored (RuntimeError" in str(error.value)
    assert prompt, f"the ranks took {seconds:.0f} s to stop"
