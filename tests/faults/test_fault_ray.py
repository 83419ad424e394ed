"""The short version of the Ray killed-worker test (tests/train/test_ray.py has the long one, under ``slow``):
rank 1 of a two-worker sp = 2 Ray Train run SIGKILLs itself after step 3; Ray restarts the workers, they resume
from the checkpoint of step 2 (taking over the dead rank 0's lock) and end with the losses of the spawned
launcher's uninterrupted sp = 2 run."""


import pytest

from checks import import_optional

ray = import_optional("ray", "ray")  # skipped only when ray is not installed; a broken install fails
import_optional("ray.train", "ray")
pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker runs every Ray test, one at a time

import fault_injection as fi  # noqa: E402
from mcdist.train.ray_job import train_with_ray  # noqa: E402
from mcdist.train.trainer import launch_local  # noqa: E402

ray.cloudpickle.register_pickle_by_value(fi)  # Ray's workers cannot import the test helpers by name
RAY = ["parallel.sp=2", "train.steps=4", "train.checkpoint_every=2", "ray.workers=2", "ray.max_failures=1"]


@pytest.mark.timeout(600)
def test_a_killed_ray_worker_resumes_from_the_last_checkpoint_to_the_same_losses(tmp_path):
    launch_local(fi.tiny(tmp_path / "straight", *RAY[:3]))
    out, marker = tmp_path / "killed", tmp_path / "marker"
    ray.init(address="local", num_cpus=2, object_store_memory=128 * 1024 * 1024, logging_level="WARNING")
    survived = changed = False
    try:
        result = train_with_ray(fi.tiny(out, *RAY), callbacks=fi.KillRankAtStep(1, 3, str(marker)), log=None)
        assert marker.exists(), "rank 1 was never killed"
        assert result["step"] == 4 and result["resumed_from"] is not None
        changed = fi.losses(out) != fi.losses(tmp_path / "straight")
        survived = not changed
    finally:
        ray.shutdown()
        fi.record("SIGKILL of rank 1 of 2 (Ray Train)", survived=survived, lost_or_changed=changed)
    assert not changed, (fi.losses(out), fi.losses(tmp_path / "straight"))
