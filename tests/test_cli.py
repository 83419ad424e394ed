import json
import os
import subprocess
import sys

import pytest

from mcdist.cli import main

TINY = ["--set", "model.vocab_size=40", "--set", "model.d_model=16", "--set", "model.n_layers=1",
        "--set", "model.n_heads=2", "--set", "model.segment_len=16", "--set", "model.chunk_len=8",
        "--set", "model.minibatch_len=8", "--set", "train.seq_len=48", "--set", "train.batch_size=3",
        "--set", "train.num_kv_pairs=4", "--set", "train.steps=4", "--set", "train.warmup_steps=1",
        "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.log_every=2"]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--set", f"train.out_dir={out}", "--device", "cpu"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["step"] == 4 and 0.0 <= result["eval_accuracy"] <= 1.0
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "run_config.json").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in lines] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]

    # eval reads the task sizes from run_config.json beside the checkpoint and the seed of the run's evals
    assert main(["eval", "--checkpoint", str(out / "checkpoint"), "--device", "cpu"]) == 0
    evaluation = _last_json(capsys.readouterr().out)
    assert evaluation["seq_len"] == 48 and evaluation["num_kv_pairs"] == 4
    assert evaluation["eval_accuracy"] == pytest.approx(result["eval_accuracy"])
    assert evaluation["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)


def test_train_from_toml_file(tmp_path, capsys):
    from mcdist.config import RunConfig

    config = RunConfig().with_overrides([item for item in TINY if item != "--set"]
                                        + [f"train.out_dir={tmp_path / 'toml-run'}"])
    path = tmp_path / "run.toml"
    path.write_text(config.to_toml())
    assert main(["train", "--config", str(path), "--quiet", "--set", "train.steps=2"]) == 0
    assert _last_json(capsys.readouterr().out)["step"] == 2


@pytest.mark.parametrize("argv, words", [
    (["train", "--set", "model.d_model=-1"], ["model.d_model"]),
    (["train", "--set", "model.nope=1"], ["nope"]),
    (["train", "--set", "model.d_model"], ["section.key=value"]),
    (["train", "--config", "/nonexistent/run.json"], ["/nonexistent/run.json"]),
    (["train", "--set", "train.seq_len=10", "--set", "train.num_kv_pairs=8"], ["train.seq_len"]),
    (["eval", "--checkpoint", "/nonexistent/ckpt"], ["/nonexistent/ckpt"]),
])
def test_errors_exit_2_with_one_line(argv, words, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error
    for word in words:
        assert word in error


def test_bad_config_file_exits_2(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"memory": "lstm"}}')
    assert main(["train", "--config", str(path)]) == 2
    assert "model.memory" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["fly"]) == 2
    assert main(["--help"]) == 0


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mcdist.cli", "train", "--set", "model.d_model=0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "model.d_model" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("script, command", [("submit.sh", "train"), ("generate.sh", "generate"), ("eval.sh", "eval")])
def test_launch_scripts_submit_their_command_through_ray(tmp_path, script, command):
    fake_ray = tmp_path / "ray"  # prints the arguments it was given, one per line
    fake_ray.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake_ray.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", os.path.join(root, "launch", script), "--checkpoint", "/shared/ckpt", "--sp", "4"],
                          env={**os.environ, "RAY": str(fake_ray), "RAY_ADDRESS": "http://head:8265"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.splitlines()
    assert argv[:4] == ["job", "submit", "--address", "http://head:8265"]
    assert argv[argv.index("--") + 1:] == ["python", "-m", "mcdist.cli", command, "--ray", "--checkpoint",
                                           "/shared/ckpt", "--sp", "4"]
