"""The trainer through Ray Train: a two-worker sp = 2 run on a local Ray, recovery from a killed worker, and the
errors that must come before Ray starts (worker count, unreachable cluster). Skipped as a whole only when ray is
not installed (the `ray` extra); an installed ray that fails to import fails here."""

import argparse
import json
import os
import signal
import socket
import sys
import time

import pytest
import torch

from checks import assert_rel_close, import_optional

ray = import_optional("ray", "ray")
import_optional("ray.train", "ray")
pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker runs every Ray test, one at a time

from mcdist import cli  # noqa: E402
from mcdist.checkpoint import load_model  # noqa: E402
from mcdist.config import ConfigError, RunConfig  # noqa: E402
from mcdist.evaluation import evaluate_checkpoint  # noqa: E402
from mcdist.train import state as ckpt  # noqa: E402
from mcdist.runners.ray import RayConnectionError, check_reachable, host_port  # noqa: E402
from mcdist.train.ray_job import run_name, train_with_ray  # noqa: E402
from mcdist.train.trainer import TrainCallbacks  # noqa: E402

# Ray pickles the callbacks below into its workers, which cannot import this test module: send them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.memory=gated",
        "model.segment_len=8", "model.chunk_len=4", "train.seq_len=32", "train.batch_size=4",
        "train.num_kv_pairs=3", "train.steps=12", "train.warmup_steps=2", "train.lr=1e-2", "train.log_every=1",
        "train.eval_every=6", "train.eval_batches=1", "train.checkpoint_every=4", "train.keep_last=2",
        "train.device=cpu", "train.seed=3", "parallel.sp=2", "ray.workers=2", "ray.max_failures=1"]
KILL_AT_STEP = 6  # after the checkpoint of step 4, before that of step 8


def tiny(out_dir, *overrides) -> RunConfig:
    return RunConfig().with_overrides([*TINY, f"train.out_dir={out_dir}", *overrides])


def curve(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [(e["step"], e["loss"]) for e in map(json.loads, handle) if e["kind"] == "train"]


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


# -- fast: refused before Ray starts (these run first, before the module's Ray exists) -------------------------


def test_unreachable_address_fails_fast_naming_it(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    started = ray.is_initialized()
    start = time.perf_counter()
    with pytest.raises(RayConnectionError, match=address.replace(".", r"\.")):
        train_with_ray(tiny(tmp_path / "run", f"ray.address={address}"), log=None)
    assert time.perf_counter() - start < 20
    assert ray.is_initialized() == started and not os.path.exists(tmp_path / "run")


def test_cli_unreachable_address_exits_2(capsys, tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    status = cli.main(["train", "--ray", "--address", address, "--workers", "2", "--sp", "2", "--quiet",
                       "--set", "model.segment_len=8", "--set", "model.chunk_len=4", "--set", "train.seq_len=32",
                       "--set", "train.num_kv_pairs=3", "--set", f"train.out_dir={tmp_path / 'run'}"])
    assert status == 2
    assert address in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_worker_count_must_equal_dp_times_sp(tmp_path):
    started = ray.is_initialized()
    with pytest.raises(ConfigError, match=r"ray\.workers = 3 does not equal parallel\.dp · parallel\.sp"):
        train_with_ray(tiny(tmp_path / "run", "ray.workers=3"), log=None)
    assert ray.is_initialized() == started and not os.path.exists(tmp_path / "run")


def _flags(**values):
    defaults = dict(ray=True, workers=None, sp=None, address=None)
    return argparse.Namespace(**{**defaults, **values})


def test_cli_flags_map_onto_ray_and_parallel():
    base = RunConfig()
    config = cli._apply_ray_flags(_flags(workers=4, sp=2, address="10.0.0.1:6379"), base)
    assert (config.parallel.dp, config.parallel.sp, config.ray.workers) == (2, 2, 4)
    assert config.ray.address == "10.0.0.1:6379"
    config = cli._apply_ray_flags(_flags(sp=3), base)
    assert (config.parallel.dp, config.parallel.sp, config.ray.workers) == (1, 3, 3)
    assert cli._apply_ray_flags(_flags(), base) == base
    with pytest.raises(cli.UsageError, match="--workers = 3 is not a multiple of sp = 2"):
        cli._apply_ray_flags(_flags(workers=3, sp=2), base)
    with pytest.raises(cli.UsageError, match="need --ray"):
        cli._apply_ray_flags(_flags(ray=False, workers=2), base)


def test_run_name_is_fixed_only_when_resuming_automatically(tmp_path):
    assert run_name(tiny(tmp_path / "grm")) == "mcdist-grm"
    fresh = run_name(tiny(tmp_path / "grm", "train.resume=never"))
    assert fresh.startswith("mcdist-grm-") and fresh != "mcdist-grm"


def test_addresses_are_parsed_and_bad_ones_refused():
    assert host_port("10.1.2.3:6379") == ("10.1.2.3", 6379)
    assert host_port("ray://head.example:10001") == ("head.example", 10001)
    assert host_port("head-without-port") is None
    with pytest.raises(ConfigError, match="ray.address = 'nowhere' is invalid"):
        check_reachable("nowhere")


# -- `mcdist compare`: the same trainer and data stream locally and through Ray ---------------------------------

COMPARE = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.memory=gated",
           "model.segment_len=8", "model.chunk_len=4", "train.seq_len=32", "train.batch_size=4",
           "train.num_kv_pairs=3", "train.steps=3", "train.warmup_steps=1", "train.lr=1e-2", "train.log_every=1",
           "train.eval_every=3", "train.eval_batches=1", "train.device=cpu", "train.seed=7", "train.resume=never",
           "ray.workers=1", "ray.cpus_per_worker=1"]


def _compare(capsys, out_dir, *flags) -> dict:
    argv = ["compare", "--quiet", "--aggregations", "grm,none", *flags, "--set", f"train.out_dir={out_dir}"]
    for item in COMPARE:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    summaries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(summaries[-1])


@pytest.mark.timeout(600)
def test_compare_gives_the_same_losses_locally_and_through_ray(tmp_path, capsys):
    local = _compare(capsys, tmp_path / "local")
    through_ray = _compare(capsys, tmp_path / "ray", "--ray")  # a local Ray, started and stopped for it
    assert sorted(local) == sorted(through_ray) == ["grm", "none"]
    for name in local:
        ours, theirs = curve(tmp_path / "local" / name), curve(tmp_path / "ray" / name)
        assert [step for step, _ in ours] == [step for step, _ in theirs] == [1, 2, 3]
        assert_rel_close([loss for _, loss in theirs], [loss for _, loss in ours], 1e-6, f"{name} training losses")
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            assert_rel_close(through_ray[name][key], local[name][key], 1e-6, f"{name} {key}")
        assert sorted(local[name]["accuracy_at"]) == sorted(through_ray[name]["accuracy_at"]) == ["128", "64"]
        assert_rel_close(through_ray[name]["accuracy_at"], local[name]["accuracy_at"], 1e-6, f"{name} accuracy_at")
    assert abs(local["grm"]["train_loss"] - local["none"]["train_loss"]) > 1e-6  # two different models were trained


# -- slow: real Ray runs on one local Ray -------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the module (2 CPUs, a small object store), always shut down. The dashboard is
    left to Ray's default, a headless API server: Ray Train's placement-group cleaner polls it."""
    ray.init(address="local", num_cpus=2, object_store_memory=128 * 1024 * 1024, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def straight_run(local_ray, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ray") / "straight"
    start = time.perf_counter()
    result = train_with_ray(tiny(out_dir), log=None)
    return out_dir, result, time.perf_counter() - start


class KillOnce(TrainCallbacks):
    """Rank 1 kills its own process (SIGKILL, no clean-up) at ``step``, the first time only (a marker file);
    rank 0 appends every step it reports to ``steps_log``, so the test sees where each attempt started."""

    def __init__(self, step: int, marker: str, steps_log: str):
        self.step, self.marker, self.steps_log = step, marker, steps_log

    def on_metrics(self, metrics: dict) -> None:
        import torch.distributed as dist

        if metrics["kind"] != "train":
            return
        if dist.get_rank() == 0:
            with open(self.steps_log, "a") as handle:
                handle.write(f"{os.getpid()} {metrics['step']}\n")
        elif metrics["step"] == self.step and not os.path.exists(self.marker):
            with open(self.marker, "w") as handle:
                handle.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)



def _ray_keeps_checkpoint_names() -> bool:
    """Ray Train V2's report takes checkpoint_dir_name (its copy is named step-N); V1 names it checkpoint_00000k."""
    import inspect

    import ray.train

    return "checkpoint_dir_name" in inspect.signature(ray.train.report).parameters

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_sp2_run_finishes_and_its_checkpoint_loads(straight_run):
    out_dir, result, seconds = straight_run
    print(f"two-worker sp=2 Ray run: {seconds:.1f} s (training {result['elapsed_s']:.1f} s)")
    assert result["step"] == 12 and not result["stopped_early"] and result["resumed_from"] is None
    assert [step for step, _ in curve(out_dir)] == list(range(1, 13))
    # Ray's copy of the last checkpoint verifies and holds the trainer's state at step 12
    ray_copy = result["ray_checkpoint"]
    assert ray_copy.startswith(str(out_dir / "ray"))
    if _ray_keeps_checkpoint_names():
        assert os.path.basename(ray_copy) == "step-000012"
    ckpt.verify_checkpoint(ray_copy)
    assert ckpt.load_training_state(ray_copy)["step"] == 12
    # the final model reloads in one process and scores what the sp = 2 workers measured
    model, model_config = load_model(result["final_model"])
    assert model_config.aggregation == "grm" and isinstance(model, torch.nn.Module)
    [scored] = evaluate_checkpoint(result["final_model"], tiny(out_dir), device="cpu")
    assert scored["eval_accuracy"] == pytest.approx(result["eval_accuracy"], abs=1e-9)
    assert abs(scored["eval_loss"] - result["eval_loss"]) <= 1e-5 * abs(result["eval_loss"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_resumes_from_the_last_checkpoint(straight_run, tmp_path):
    straight_dir, _, _ = straight_run
    marker, steps_log = str(tmp_path / "killed"), str(tmp_path / "steps.log")
    out_dir = tmp_path / "killed_run"
    start = time.perf_counter()
    result = train_with_ray(tiny(out_dir), callbacks=KillOnce(KILL_AT_STEP, marker, steps_log), log=None)
    print(f"killed-and-recovered Ray run: {time.perf_counter() - start:.1f} s")
    assert os.path.exists(marker), "the worker was never killed"
    assert result["step"] == 12 and not result["stopped_early"]
    # restarted from Ray's copy of the step-4 checkpoint, not from scratch
    assert result["resumed_from"] is not None  # which step: the steps log below (the second attempt starts at 5)
    if _ray_keeps_checkpoint_names():
        assert os.path.basename(result["resumed_from"]) == "step-000004"
    assert result["resumed_from"].startswith(str(out_dir / "ray"))
    with open(steps_log) as handle:
        rows = [line.split() for line in handle]
    attempts = {}
    for pid, step in rows:
        attempts.setdefault(pid, []).append(int(step))
    first, second = attempts.values()  # rank 0's process before and after the restart
    # the first attempt got to step KILL_AT_STEP (its last report may be cut short by the kill); the second
    # started right after the step-4 checkpoint
    assert first in (list(range(1, KILL_AT_STEP)), list(range(1, KILL_AT_STEP + 1))), attempts
    assert second == list(range(5, 13)), attempts
    # and it continued the same loss curve as the run that was never interrupted
    resumed, straight = curve(out_dir), curve(straight_dir)
    assert [s for s, _ in resumed] == [s for s, _ in straight] == list(range(1, 13))
    for (step, loss), (_, reference) in zip(resumed, straight, strict=True):
        assert_rel_close(loss, reference, 1e-9, f"loss at step {step}")
