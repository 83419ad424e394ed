"""Two trainers on one out_dir: the second is refused with one line naming the first (pid, host) and writes
nothing; the first finishes the same run it would have alone. Started at the same moment: exactly one trains."""

import json
import socket
import subprocess
import sys

import pytest

import fault_injection as fi
from mcdist.config import ConfigError
from mcdist.train.trainer import run_training

# a trainer that, after step 1, waits for a file to appear (so the test knows it is mid-run); exit 2 when refused
HOLDING = r"""
import json, os, sys, time, torch
torch.set_num_threads(1)
from mcdist.config import ConfigError, RunConfig
from mcdist.train.trainer import TrainCallbacks, run_training

overrides, holding, release = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

class Hold(TrainCallbacks):
    def on_metrics(self, metrics):
        if metrics["kind"] == "train" and metrics["step"] == 1 and holding != "-":
            open(holding, "w").close()
            while not os.path.exists(release):
                time.sleep(0.05)

try:
    run_training(RunConfig().with_overrides(overrides), callbacks=Hold())
except ConfigError as error:
    print(error, flush=True)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_training(fi.tiny(out))
    return {"losses": fi.losses(out), "weights": fi.weights(result["final_model"])}


def trainer(tmp_path, out, holding="-", release="-"):
    script = tmp_path / "holding.py"
    script.write_text(HOLDING)
    return subprocess.Popen([sys.executable, str(script), json.dumps([*fi.TINY, f"train.out_dir={out}"]),
                             str(holding), str(release)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_second_trainer_on_a_running_out_dir_is_refused(reference, tmp_path):
    out, holding, release = tmp_path / "run", tmp_path / "holding", tmp_path / "release"
    first = trainer(tmp_path, out, holding, release)
    survived = changed = False
    try:
        fi.wait_for(holding, first)
        before = fi.listing(out)
        with pytest.raises(ConfigError) as error:
            run_training(fi.tiny(out))
        refused = f"pid {first.pid} on host {socket.gethostname()!r}" in str(error.value)
        untouched = fi.listing(out) == before
        release.touch()
        output, _ = first.communicate(timeout=240)
        assert first.returncode == 0, output.decode()[-3000:]
        changed = not untouched or fi.losses(out) != reference["losses"] or not fi.same_weights(
            fi.weights(out / "checkpoint"), reference["weights"])
        survived = refused and not changed
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
            first.wait(30)
        fi.record("a second trainer on a running out_dir", survived=survived, lost_or_changed=changed)
    assert refused, str(error.value)
    assert not changed


def race(reference, tmp_path, trial: int) -> None:
    out = tmp_path / f"race-{trial}"
    both = [trainer(tmp_path, out), trainer(tmp_path, out)]
    outputs = [process.communicate(timeout=240)[0].decode() for process in both]
    codes = sorted(process.returncode for process in both)
    # the later one is refused, or (when the first had already finished) resumes its finished run: never both train
    refused = codes == [0, 2] and any("is in use by another training run" in text for text in outputs)
    sequential = codes == [0, 0]
    changed = fi.losses(out) != reference["losses"] or not fi.same_weights(fi.weights(out / "checkpoint"),
                                                                          reference["weights"])
    fi.record("two trainers started at once", survived=(refused or sequential) and not changed,
              lost_or_changed=changed)
    assert refused or sequential, (codes, outputs)
    assert not changed


def test_two_trainers_started_at_once_train_one_run(reference, tmp_path):
    race(reference, tmp_path, 0)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_races(reference, tmp_path):
    for trial in range(1, 1 + fi.trials(10)):
        race(reference, tmp_path, trial)
