"""Errors a new user meets come back as one line and exit status 2 (docs/reliability.md), and the ranks of a
local run end with their driver."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from checks import import_optional
from mcdist import cli
from mcdist.config import ConfigError
from mcdist.device import resolve_device
from mcdist.train.trainer import TrainCallbacks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.vocab_size=40", "--set", "model.d_model=16", "--set", "model.n_layers=1",
        "--set", "model.n_heads=2", "--set", "model.segment_len=16", "--set", "model.chunk_len=8",
        "--set", "model.minibatch_len=8", "--set", "train.seq_len=64", "--set", "train.batch_size=2",
        "--set", "train.num_kv_pairs=4", "--set", "train.warmup_steps=1", "--set", "train.eval_batches=1"]
NO_CUDA = not torch.cuda.is_available()


def _one_line(text: str, *words: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _cli(*argv: str, timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcdist.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


# -- CUDA asked for where there is none ------------------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal of a machine without CUDA; this one has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_refuses_cuda_that_is_not_there(device):
    with pytest.raises(ConfigError, match=f"device = '{device}' but "):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(NO_CUDA, reason="needs a GPU")
def test_resolve_device_refuses_a_gpu_index_past_the_last():
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"sees {count} GPU"):
        resolve_device(f"cuda:{count}")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal of a machine without CUDA; this one has a GPU")
@pytest.mark.parametrize("argv", [
    ["train", "--device", "cuda"],
    ["train", "--device", "cuda", "--sp", "2"],
    ["train", "--set", "train.device=cuda", "--sp", "2"],  # not through --device: refused by the launcher
    ["eval", "--checkpoint", "/nonexistent/ckpt", "--device", "cuda"],
    ["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt-ids", "1,2", "--max-new-tokens", "2",
     "--device", "cuda"],
], ids=["train", "train-sp2", "train-sp2-config", "eval", "generate"])
def test_cuda_on_a_machine_without_it_is_one_line_exit_2(argv, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, *TINY, "--set", f"train.out_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    assert cli.main(argv) == 2
    _one_line(capsys.readouterr().err, f"mcdist {argv[0]}: error:", "cuda", "expected")
    assert time.monotonic() - start < 30
    assert not (tmp_path / "run").exists()  # refused before anything was written


# -- prompts ---------------------------------------------------------------------------------------------------


def test_a_prompt_file_that_is_not_utf8_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"hello\n\xff\xfeworld\n")
    code = cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt-file", str(path), "--tokenizer", "byte",
                     "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 2
    _one_line(capsys.readouterr().err, str(path), "not UTF-8", "line 2")


# -- a user error inside a spawned rank ------------------------------------------------------------------------


class RaiseOnRank(TrainCallbacks):
    """Raise ``ValueError(message)`` on ``rank`` at the first metrics record (a user error found inside a rank)."""

    all_ranks = True

    def __init__(self, rank: int, message: str):
        self.rank, self.message = rank, message

    def on_metrics(self, metrics: dict) -> None:
        if dist.get_rank() == self.rank:
            raise ValueError(self.message)


def test_a_value_error_in_a_spawned_rank_is_the_same_one_line_exit_2(tmp_path):
    """A real driver process (its stderr, and its ranks', all captured): one line with the rank's message."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from mcdist import cli
        from mcdist.train import trainer
        from test_errors import RaiseOnRank
        cli.launch_local = lambda config, nprocs: trainer.launch_local(
            config, nprocs, callbacks=RaiseOnRank(1, "train.task_file = 'x.bin' holds token 99; expected < 40"))
        sys.exit(cli.main(sys.argv[1:]))
    """)
    done = subprocess.run([sys.executable, "-c", script, "train", *TINY, "--set", "train.steps=3", "--set",
                           "train.log_every=1", "--set", f"train.out_dir={out}", "--sp", "2", "--quiet",
                           "--device", "cpu"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    _one_line(done.stderr, "mcdist train: error: train.task_file = 'x.bin' holds token 99; expected < 40")


# -- the ranks of a local run die with their driver ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_rank(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"spawn_main" in handle.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
def test_the_ranks_of_a_local_run_die_with_their_driver(tmp_path):
    """The driver starts as a shell's background job does (``mcdist train ... &``: SIGINT ignored, inherited by
    its ranks), so torch's own death signal for spawned processes, SIGINT, does not end them."""
    out = tmp_path / "run"
    driver = subprocess.Popen([sys.executable, "-m", "mcdist.cli", "train", *TINY, "--set", "train.steps=100000",
                               "--set", "train.log_every=1", "--set", "train.eval_every=100000", "--set",
                               f"train.out_dir={out}", "--sp", "2", "--quiet", "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    ranks = []
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file():  # the ranks are training
            assert driver.poll() is None, driver.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.2)
        ranks = [pid for pid in _children(driver.pid) if _is_rank(pid)]
        assert len(ranks) == 2, ranks
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "the ranks outlived their driver"
        lines = (out / "metrics.jsonl").read_text().count("\n")
        time.sleep(2)
        assert (out / "metrics.jsonl").read_text().count("\n") == lines  # nobody trains on
        assert not (out / "checkpoint").exists()  # and no final model
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()


# -- a damaged latest checkpoint is not passed over for a callback's (Ray's) checkpoint --------------------------


class ResumeFrom(TrainCallbacks):
    def __init__(self, path: str):
        self.path = path

    def resume_from(self):
        return self.path


def test_a_damaged_latest_checkpoint_is_refused_when_a_callback_names_an_older_one(tmp_path):
    from mcdist.checkpoint import CheckpointError
    from mcdist.config import RunConfig
    from mcdist.train import state as ckpt
    from mcdist.train.trainer import resolve_resume, run_training

    config = RunConfig().with_overrides([item for item in TINY if item != "--set"] + [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.checkpoint_every=1", "train.keep_last=2",
        "train.progress=false", "train.device=cpu", "train.eval_every=100"])
    run_training(config)
    older, latest = [path for _, path in ckpt.step_dirs(ckpt.checkpoints_dir(config.train.out_dir))]
    assert resolve_resume(config, ResumeFrom(older)) == older  # an intact latest: the callback's choice stands
    damaged = os.path.join(latest, ckpt.STATE_NAME)
    with open(damaged, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(CheckpointError, match=damaged):
        resolve_resume(config, ResumeFrom(older))
    named = config.replace(train=config.train.replace(resume=older))  # a resume point named: the latest not read
    assert resolve_resume(named, TrainCallbacks()) == older


# -- Ray's harmless notices are dropped, and only they ---------------------------------------------------------


def test_only_rays_harmless_notices_are_filtered():
    import logging
    import re

    import_optional("ray", "ray")
    from mcdist.runners import ray as ray_runner

    pattern = re.compile(ray_runner.SKIPPED_WORKER_LINES)
    preemption = ("[2026-12-02 03:03:28,971 E 11971 11997] core_worker.cc:2465: Actor with class name: "
                  "'PreemptionWatcher' and ID: 'a8952cf389ad30e8c1ddf82a01000000' has constructor arguments in the "
                  "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
                  "lost, the actor restart will fail.")
    assert pattern.search(preemption)
    for real in ("[2026-12-02 03:03:28,971 E 11971 11997] core_worker.cc:912: Actor 'PreemptionWatcher' died",
                 "ValueError: train.seq_len = 10 is invalid", "E core_worker.cc:100: The worker died unexpectedly"):
        assert not pattern.search(real), real

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(ray_runner.TOKEN_AUTH_LOGGER)
    handler = Keep()
    logger.addHandler(handler)
    try:
        ray_runner._quiet_token_auth_notice()
        ray_runner._quiet_token_auth_notice()  # installed once
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        logger.warning("Token authentication is enabled but no token was found")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Token authentication is enabled but no token was found"]
    assert sum(isinstance(item, ray_runner._DropTokenAuthNotice) for item in logger.filters) == 1
