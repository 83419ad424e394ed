"""Long-context evaluation (mcdist.evaluation, `mcdist eval`): loss and accuracy by length, by position bucket and
by passkey depth, against a direct computation from full forwards; the same numbers on local sp / dp processes
and Ray workers; bad requests refused with the value named."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checks import import_optional
from tiny_models import save_tiny_model
from mcdist import cli
from mcdist.checkpoint import CheckpointError
from mcdist.config import ConfigError, ModelConfig, RunConfig
from mcdist.data.mqar import IGNORE_INDEX, make_mqar_batch
from mcdist.data.passkey import make_passkey_batch
from mcdist.data.tokens import write_tokens
from mcdist.evaluation import (check_evaluation, evaluate_checkpoint, evaluate_local, evaluate_with_ray,
                               position_edges)
from mcdist.train.data import EVAL_SEED_OFFSET

pytestmark = pytest.mark.usefixtures("one_thread")

SEGMENT_LEN = 4
BATCH = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, model) of a tiny float64 model: vocabulary 64, C = 4, grm over gated memory."""
    return save_tiny_model(tmp_path_factory.mktemp("evaluation") / "checkpoint", vocab_size=64,
                           segment_len=SEGMENT_LEN)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """A token file whose next token is mostly predictable from far back (period 37), so position matters."""
    generator = torch.Generator().manual_seed(3)
    pattern = torch.randint(0, 64, (37,), generator=generator)
    tokens = pattern.repeat(40)[:1400].clone()
    noise = torch.rand(tokens.shape, generator=generator) < 0.3
    tokens[noise] = torch.randint(0, 64, (int(noise.sum()),), generator=generator)
    path = str(tmp_path_factory.mktemp("tokens") / "val.bin")
    write_tokens(path, tokens, vocab_size=64)
    return path, tokens


def run_config(task: str, **train) -> RunConfig:
    overrides = [f"train.task={task}", f"train.batch_size={BATCH}", "train.eval_batches=2", "train.seed=5",
                 "train.seq_len=64", "model.vocab_size=64", f"model.segment_len={SEGMENT_LEN}", "model.chunk_len=2",
                 "model.minibatch_len=2"]
    return RunConfig().with_overrides(overrides + [f"train.{key}={json.dumps(value)}" for key, value in train.items()])


def direct(model, batches, edges):
    """The reference: per-token cross-entropy and arg-max of full forwards, bucketed by explicit position ranges."""
    totals = [[0.0, 0, 0] for _ in range(len(edges) - 1)]
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids, impl="chunked").logits  # [B, T, V]
            for b in range(ids.shape[0]):
                for t in range(ids.shape[1]):
                    if labels[b, t] == IGNORE_INDEX:
                        continue
                    bucket = next(i for i in range(len(edges) - 1) if edges[i] <= t < edges[i + 1])
                    totals[bucket][0] += float(F.cross_entropy(logits[b, t], labels[b, t]))
                    totals[bucket][1] += int(logits[b, t].argmax() == labels[b, t])
                    totals[bucket][2] += 1
    return totals


def assert_matches(result, totals, edges):
    count = sum(row[2] for row in totals)
    assert result["labelled"] == count
    assert result["eval_loss"] == pytest.approx(sum(row[0] for row in totals) / count, rel=1e-10)
    assert result["eval_accuracy"] == pytest.approx(sum(row[1] for row in totals) / count, rel=1e-12)
    assert [(b["start"], b["end"]) for b in result["by_position"]] == list(zip(edges[:-1], edges[1:]))
    for bucket, (loss, correct, labelled) in zip(result["by_position"], totals, strict=True):
        assert bucket["labelled"] == labelled
        assert bucket["eval_loss"] == pytest.approx(loss / max(labelled, 1), rel=1e-10)
        assert bucket["eval_accuracy"] == pytest.approx(correct / max(labelled, 1), rel=1e-12)


def test_position_edges_double_in_width():
    assert position_edges(1024, 1) == [0, 1024]
    assert position_edges(1024, 4) == [0, 128, 256, 512, 1024]
    assert position_edges(1000, 3) == [0, 250, 500, 1000]
    assert position_edges(8, 4) == [0, 1, 2, 4, 8]
    with pytest.raises(ValueError, match="buckets = 5 is too many for seq_len = 8; expected at most 4"):
        position_edges(8, 5)
    with pytest.raises(ValueError, match="buckets = 0 is invalid"):
        position_edges(8, 0)


def test_token_file_by_length_and_position_equals_direct_forwards(saved, token_file):
    folder, model = saved
    path, tokens = token_file
    config = run_config("tokens", data_path=path, val_data_path=path)
    results = evaluate_checkpoint(folder, config, device="cpu", seq_lens=[64, 128], buckets=3)
    assert [entry["seq_len"] for entry in results] == [64, 128]
    for entry in results:
        L = entry["seq_len"]
        windows = torch.stack([tokens[w * L:(w + 1) * L + 1] for w in range(2 * BATCH)]).long()  # first windows
        batches = [(windows[i:i + BATCH, :-1], windows[i:i + BATCH, 1:]) for i in (0, BATCH)]
        edges = position_edges(L, 3)
        assert_matches(entry, direct(model, batches, edges), edges)


def test_passkey_depths_place_the_passkey_and_score_its_digits(saved):
    folder, model = saved
    config = run_config("passkey", seq_len=48)
    results = evaluate_checkpoint(folder, config, device="cpu", depths=[0.0, 1.0], buckets=2)
    assert [entry["depth"] for entry in results] == [0.0, 1.0]
    for entry in results:
        generator = torch.Generator().manual_seed(5 + EVAL_SEED_OFFSET)
        batches = [make_passkey_batch(BATCH, 48, 64, generator, depth=entry["depth"]) for _ in range(2)]
        assert_matches(entry, direct(model, batches, [0, 24, 48]), [0, 24, 48])
        assert entry["by_position"][0]["labelled"] == 0  # the digits are asked at the end, whatever the depth
    assert results[0]["eval_loss"] != results[1]["eval_loss"]


def test_mqar_seed_picks_other_batches(saved):
    folder, model = saved
    config = run_config("mqar", num_kv_pairs=4)
    generator = torch.Generator().manual_seed(11)
    batches = [make_mqar_batch(BATCH, 64, 4, 64, generator) for _ in range(2)]
    [result] = evaluate_checkpoint(folder, config, device="cpu", seed=11, buckets=2)
    assert_matches(result, direct(model, batches, [0, 32, 64]), [0, 32, 64])


def test_sequence_and_data_parallel_processes_give_the_numbers_of_one_process(saved, token_file):
    folder, _ = saved
    path, _ = token_file
    config = run_config("tokens", data_path=path, val_data_path=path)
    options = dict(seq_lens=[64, 128], buckets=4)
    alone = evaluate_checkpoint(folder, config, device="cpu", **options)
    spread = evaluate_local(folder, config, sp=2, dp=2, timeout_s=240, **options)  # zigzag: positions interleave
    contiguous = evaluate_local(folder, config.with_overrides(["parallel.layout=contiguous"]), sp=2, timeout_s=240,
                                **options)
    for other in (spread, contiguous):
        assert len(other) == len(alone)
        for mine, theirs in zip(alone, other, strict=True):
            assert theirs["labelled"] == mine["labelled"]
            assert theirs["eval_loss"] == pytest.approx(mine["eval_loss"], rel=1e-9)
            assert theirs["eval_accuracy"] == mine["eval_accuracy"]
            for a, b in zip(mine["by_position"], theirs["by_position"], strict=True):
                assert (a["start"], a["end"], a["labelled"]) == (b["start"], b["end"], b["labelled"])
                assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-9)


def test_bad_requests_name_the_value(saved, token_file, tmp_path):
    folder, _ = saved
    mqar = run_config("mqar", num_kv_pairs=4).replace(
        model=ModelConfig(vocab_size=64, segment_len=SEGMENT_LEN, minibatch_len=2, chunk_len=2))
    with pytest.raises(ConfigError, match="depths apply to the passkey task; this run's task is 'mqar'"):
        check_evaluation(mqar, depths=[0.5])
    with pytest.raises(ConfigError, match=r"depth = 1.5 is invalid; expected a number in \[0, 1\]"):
        check_evaluation(run_config("passkey", seq_len=48), depths=[1.5])
    with pytest.raises(ConfigError, match="buckets = 9 is too many for seq_len = 64"):
        check_evaluation(mqar, buckets=9)
    with pytest.raises(ConfigError, match="seq_len = 0 is invalid"):
        check_evaluation(mqar, seq_lens=[0])
    with pytest.raises(ConfigError, match="seed applies to the synthetic tasks"):
        check_evaluation(run_config("tokens", data_path=token_file[0]), seed=3)
    with pytest.raises(ConfigError, match="train.seq_len = 72 does not fit parallel.sp = 2"):
        evaluate_local(folder, mqar, sp=2, seq_lens=[64, 72])
    with pytest.raises(CheckpointError, match="nothing-here"):
        evaluate_checkpoint(str(tmp_path / "nothing-here"), mqar)


def test_cli_writes_one_line_per_length_and_depth(saved, tmp_path, capsys):
    folder, _ = saved
    config_path = tmp_path / "run.json"
    run_config("passkey", seq_len=48).save(str(config_path))
    out = tmp_path / "eval.jsonl"
    assert cli.main(["eval", "--checkpoint", folder, "--config", str(config_path), "--device", "cpu",
                     "--seq-lens", "32,48", "--depths", "0,0.5", "--buckets", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [(e["seq_len"], e["depth"]) for e in lines] == [(32, 0.0), (32, 0.5), (48, 0.0), (48, 0.5)]
    assert all(e["task"] == "passkey" and len(e["by_position"]) == 2 for e in lines)
    assert out.read_text() == captured.out
    assert "seq_len        48  depth 0.50" in captured.err  # the table
    grid = captured.err.splitlines()[-3:]  # the length × depth grid closes it
    assert grid[0].split() == ["0.00", "0.50"]
    assert [float(cell) for cell in grid[2].split()[1:]] == [round(e["eval_accuracy"], 3) for e in lines[2:]]
    for argv, message in ((["--depths", "0,x"], "--depths '0,x' is invalid"),
                          (["--seq-lens", "32,50", "--sp", "2"], "train.seq_len = 50 does not fit parallel.sp = 2"),
                          (["--dp", "0"], "--dp = 0 is invalid"),
                          (["--address", "auto"], "--address and --workers-cpus need --ray"),
                          (["--set", "model.d_model=8"], "eval takes the model section from the checkpoint")):
        assert cli.main(["eval", "--checkpoint", folder, "--config", str(config_path), *argv]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ray_workers_give_the_numbers_of_one_process(saved):
    import_optional("ray.train.torch", "ray")
    folder, _ = saved
    config = run_config("passkey", seq_len=48)
    alone = evaluate_checkpoint(folder, config, device="cpu", depths=[0.25], buckets=2)
    spread = evaluate_with_ray(folder, config, sp=2, depths=[0.25], buckets=2, device="cpu", log=None)
    assert spread[0]["labelled"] == alone[0]["labelled"]
    assert spread[0]["eval_loss"] == pytest.approx(alone[0]["eval_loss"], rel=1e-9)
    for a, b in zip(alone[0]["by_position"], spread[0]["by_position"], strict=True):
        assert b["labelled"] == a["labelled"] and b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-9)


def torchrun(nprocs: int, *argv: str) -> subprocess.CompletedProcess:
    """`python -m mcdist.cli ARGV` on ``nprocs`` processes started by torchrun (standalone, gloo on this CPU)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nprocs), "-m", "mcdist.cli", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_under_torchrun_rank_0_prints_the_numbers_of_one_process(saved, tmp_path, capsys):
    folder, _ = saved
    config_path = tmp_path / "run.json"
    run_config("passkey", seq_len=48).save(str(config_path))
    argv = ["eval", "--checkpoint", folder, "--config", str(config_path), "--device", "cpu", "--depths", "0.5",
            "--buckets", "2"]
    assert cli.main(argv) == 0
    [alone] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    done = torchrun(2, *argv, "--out", str(tmp_path / "eval.jsonl"))  # sp = 2: the world size
    assert done.returncode == 0, done.stderr[-3000:]
    [spread] = [json.loads(line) for line in done.stdout.splitlines()]  # rank 0 only
    assert (tmp_path / "eval.jsonl").read_text() == done.stdout
    assert spread["labelled"] == alone["labelled"] and spread["eval_accuracy"] == alone["eval_accuracy"]
    assert spread["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-9)
    refused = torchrun(2, *argv, "--sp", "2", "--dp", "2")
    assert refused.returncode != 0 and "does not equal torchrun's world size 2" in refused.stderr
