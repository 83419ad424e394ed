"""User errors under Ray Train come back as the one line they are locally, and are not retried: a damaged latest
checkpoint in out_dir (not passed over for Ray's own copy), a ValueError that one rank alone raises, and
``device = cuda`` on a Ray without GPUs (refused at once instead of waiting for GPUs). One local Ray for all."""

import os
import sys
import time

import pytest

from checks import import_optional

ray = import_optional("ray", "ray")  # skipped only when ray is not installed; a broken install fails
import_optional("ray.train", "ray")
pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker runs every Ray test, one at a time

import fault_injection as fi  # noqa: E402
import test_errors  # noqa: E402  (tests/ is on sys.path, as for checks)
from test_errors import RaiseOnRank  # noqa: E402
from mcdist import cli  # noqa: E402
from mcdist.checkpoint import CheckpointError  # noqa: E402
from mcdist.config import ConfigError  # noqa: E402
from mcdist.train import state as ckpt  # noqa: E402
from mcdist.train.ray_job import train_with_ray  # noqa: E402

RAY = ["parallel.sp=2", "train.checkpoint_every=2", "ray.workers=2", "ray.max_failures=2"]


ray.cloudpickle.register_pickle_by_value(fi)  # Ray's workers cannot import the test helpers by name
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(test_errors)  # RaiseOnRank travels to the workers by value


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=128 * 1024 * 1024,
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.timeout(600)
def test_a_damaged_latest_checkpoint_and_cuda_without_gpus_are_refused_under_ray(local_ray, tmp_path, capsys):
    out = tmp_path / "run"
    train_with_ray(fi.tiny(out, *RAY, "train.steps=2"), log=None)  # Ray now holds its copy of step 2
    latest = ckpt.latest_checkpoint(ckpt.checkpoints_dir(out))
    damaged = os.path.join(latest, ckpt.STATE_NAME)
    with open(damaged, "r+b") as handle:
        handle.truncate(os.path.getsize(damaged) // 2)
    before = fi.listing(out / "checkpoints")
    refused = False
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointError) as error:
            train_with_ray(fi.tiny(out, *RAY, "train.steps=4"), log=None)
        refused = damaged in str(error.value) and fi.listing(out / "checkpoints") == before
    finally:
        fi.record("damaged latest checkpoint (Ray: older copy)", survived=refused)
    assert damaged in str(error.value), error.value
    assert fi.listing(out / "checkpoints") == before  # refused before anything was written
    assert time.monotonic() - start < 120

    # device = cuda on a Ray without GPUs: refused at once, naming why (Ray would ask for GPUs every minute)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="the Ray cluster has 0 GPU"):
        train_with_ray(fi.tiny(tmp_path / "gpu", *RAY, "train.device=cuda"), log=None)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "gpu").exists()

    # the workers' lines reached this output (captured), the controller's harmless PreemptionWatcher error did not
    captured = capsys.readouterr()
    assert "worker rank 0/2" in captured.out + captured.err
    assert "PreemptionWatcher" not in captured.out + captured.err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_user_error_under_ray_is_one_line_from_the_cli_and_from_one_rank(local_ray, tmp_path, capsys):
    # through the command line: one line, exit 2
    out = tmp_path / "run"
    train_with_ray(fi.tiny(out, *RAY, "train.steps=2"), log=None)
    with open(os.path.join(ckpt.latest_checkpoint(ckpt.checkpoints_dir(out)), ckpt.COMPLETE_NAME), "a") as handle:
        handle.write("x")
    capsys.readouterr()
    argv = ["train", "--ray", "--quiet"] + [part for item in fi.TINY + RAY for part in ("--set", item)]
    assert cli.main([*argv, "--set", f"train.out_dir={out}", "--set", "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mcdist train: error: " in err
    assert ckpt.COMPLETE_NAME in err.strip().splitlines()[-1]

    # a ValueError on rank 1 alone: rank 0 waits in a collective; the user error comes back, not Ray's failure
    message = "train.task_file = 'x.bin' holds token 99; expected < 32"
    with pytest.raises(ValueError) as error:
        train_with_ray(fi.tiny(tmp_path / "raises", *RAY, "train.steps=4"), callbacks=RaiseOnRank(1, message),
                       log=None)
    assert str(error.value) == message and type(error.value) is ValueError
