"""launch/submit.sh as written, against a local Ray head started as a new user starts one (docs/launch.md).

The head is `ray start --head --block` from this checkout's venv, run without the venv on PATH and with an auth
token in its (temporary) home, so Ray turns token authentication on: the three ways the script used to fail
(no job CLI without ray[default], no token sent, the system `python` running the job) are all in play. Ports,
Ray's temporary folder and the home folder are the test's own, so other Ray instances here are not touched;
the head is stopped through its `ray start --block` process (SIGTERM), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from checks import import_optional
from mcdist.parallel.spawn import free_ports

import_optional("ray", "ray")
pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker runs every Ray test, one at a time
import yaml  # noqa: E402  (Ray's own dependencies, there wherever Ray is)
import jsonschema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
HEAD_START_S = 120
JOB_S = 300
PORT_ATTEMPTS = 3


def _new_user_env(home: Path) -> dict:
    """This machine's environment as a new user has it: the venv not on PATH, no Ray settings of ours."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(part for part in os.environ.get("PATH", "").split(os.pathsep) if part != venv_bin)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("RAY_") and key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "HOME": str(home), "PATH": path}


def _processes_of(temp_dir: str) -> list[int]:
    """Ids of the processes that name ``temp_dir`` in their command line or hold a file open in it: this test's
    Ray processes (workers, renamed ``ray::...``, keep their log files there open)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if temp_dir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
                continue
            for descriptor in (entry / "fd").iterdir():
                if os.readlink(descriptor).startswith(temp_dir + "/"):
                    found.append(int(entry.name))
                    break
        except OSError:  # gone, or not ours to read
            continue
    return found


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block` and to every process of this head (found by its own temporary folder, so
    only this test's), SIGKILL to what is left after 3 s. (`ray start --block` alone takes 30 s to stop.)"""
    for signal_number, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        for pid in [head.pid] * (head.poll() is None) + _processes_of(temp_dir):
            try:
                os.kill(pid, signal_number)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (head.poll() is None or _processes_of(temp_dir)):
            time.sleep(0.2)
        if head.poll() is not None and not _processes_of(temp_dir):
            return
    raise AssertionError(f"Ray processes of {temp_dir} still run after SIGKILL: {_processes_of(temp_dir)}")


def _wait_for_job_server(head: subprocess.Popen, address: str, log: Path) -> bool:
    """True once the head's job server answers; False when `ray start` exited over a port in use (to be tried
    again on other ports); any other exit, or no answer in HEAD_START_S, fails the test."""
    deadline = time.monotonic() + HEAD_START_S
    while True:
        if head.poll() is not None:
            text = log.read_text()
            assert "port" in text.lower() and ("in use" in text or "used by" in text), \
                f"ray start --head exited ({head.returncode}):\n" + text[-3000:]
            return False
        try:  # the job server answers (401 without the token: it is up and wants one)
            urllib.request.urlopen(f"{address}/api/version", timeout=5)
            return True
        except urllib.error.HTTPError as error:
            assert error.code == 401, f"{address}/api/version answered {error.code}"
            return True
        except (urllib.error.URLError, OSError):
            assert time.monotonic() < deadline, f"the Ray head's job server at {address} did not answer in " \
                                                 f"{HEAD_START_S} s:\n" + log.read_text()[-3000:]
            time.sleep(1)


@pytest.fixture
def local_head():
    """(job server address, environment of a new user) of a one-node Ray head with token authentication."""
    work = Path(tempfile.mkdtemp(prefix="mcdist-launch-", dir="/tmp"))  # short: Ray's socket paths are limited
    home, temp_dir = work / "home", str(work / "ray")
    home.mkdir()
    env = _new_user_env(home)
    # any earlier local Ray run (ray.init, `make run`) leaves a token in ~/.ray: `ray start --head` then requires it
    subprocess.run([str(RAY), "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    # every port Ray would otherwise fix (the job agent's 52365, Ray Client's 10001) is a free one: a second Ray
    # on the machine holding 52365 leaves the job server without an agent ("No available agent to submit job")
    log = open(work / "head.log", "w")
    head = None
    try:
        for attempt in range(PORT_ATTEMPTS):
            ports = [str(port) for port in free_ports(4)]
            log.seek(0)
            log.truncate()
            head = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", "--port", ports[0], "--dashboard-port", ports[1],
                 "--dashboard-agent-listen-port", ports[2], "--ray-client-server-port", ports[3],
                 "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp_dir,
                 "--disable-usage-stats", "--object-store-memory", "200000000"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
            address = f"http://127.0.0.1:{ports[1]}"
            if _wait_for_job_server(head, address, work / "head.log"):
                break
            # a port probed free was taken before Ray bound it (another process on the machine): new ports
            _stop(head, temp_dir)
            assert attempt + 1 < PORT_ATTEMPTS, f"ray start --head found a port taken {PORT_ATTEMPTS} times:\n" + \
                (work / "head.log").read_text()[-3000:]
        assert "Token authentication is enabled" in (work / "head.log").read_text(), \
            "the head started without token authentication; expected it on (a token in its home)"
        yield address, env
    finally:
        if head is not None:
            _stop(head, temp_dir)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def test_submit_sh_trains_on_a_local_head_as_written(local_head, tmp_path):
    address, env = local_head
    out_dir = tmp_path / "run"
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "submit.sh"), "--config", "examples/ray_tiny.json",
         "--set", f"train.out_dir={out_dir}", "--set", "train.steps=2", "--set", "train.eval_every=2",
         "--set", "train.checkpoint_every=2", "--set", "train.eval_batches=1"],
        env={**env, "RAY_ADDRESS": address}, cwd=tmp_path, capture_output=True, text=True, timeout=JOB_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "succeeded" in output, output[-6000:]
    assert f"{sys.executable} -m mcdist.cli train --ray" in output  # the head ran this venv's Python, not PATH's
    final = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"checkpoint"')]
    assert len(final) == 1, output[-6000:]
    assert final[0]["step"] == 2 and final[0]["final_model"] == str(out_dir / "checkpoint")
    assert (out_dir / "checkpoints" / "step-000002").is_dir()
    assert any((out_dir / "checkpoint").iterdir()), "the final model folder is empty"
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) >= 2


@pytest.mark.parametrize("name", ["cluster.yaml", "local_cluster.yaml"])
def test_cluster_files_follow_rays_schema(name):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "launch" / name).read_text())
    jsonschema.validate(config, schema)
    # every node starts Ray with token authentication and gets this machine's token (docs/launch.md)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in command for command in starts if "ray start" in command)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
