"""`mcdist eval --data FILE`: the loss by position over whole long documents of a token file, each run alone from
its first token, against an independent loop over positions; the same numbers on two sequence-parallel processes;
bad requests refused with the value named."""

import json
import math

import pytest
import torch

from checks import assert_rel_close
from tiny_models import save_tiny_model
from mcdist import cli
from mcdist.config import ConfigError, ModelConfig, RunConfig
from mcdist.data.tokens import TokenWriter
from mcdist.evaluation import (check_documents, evaluate_documents_checkpoint, evaluate_documents_local,
                               position_edges)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
EOS = 63
TRAIN_LEN = 32  # the saved run's train.seq_len
LENGTHS = [70, 20, 130, 65, 64, 200, 66, 100]  # tokens per document, its EOS included


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, model) of a tiny float64 model, with the run_config.json of a run at L = 32 beside."""
    run = tmp_path_factory.mktemp("run")
    saved_model = save_tiny_model(run / "checkpoint", vocab_size=VOCAB)
    run_config().save(str(run / "run_config.json"))
    return saved_model


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """(token file, the documents as tensors): documents that repeat a short pattern of their own, with noise."""
    generator = torch.Generator().manual_seed(3)
    docs = []
    for length in LENGTHS:
        pattern = torch.randint(0, EOS, (int(torch.randint(3, 12, (1,), generator=generator)),), generator=generator)
        body = pattern.repeat(length)[:length - 1].clone()
        noise = torch.rand(body.shape, generator=generator) < 0.2
        body[noise] = torch.randint(0, EOS, (int(noise.sum()),), generator=generator)
        docs.append(torch.cat([body, torch.tensor([EOS])]))
    path = str(tmp_path_factory.mktemp("docs") / "docs.bin")
    with TokenWriter(path, vocab_size=VOCAB, eos_id=EOS) as writer:
        for doc in docs:
            writer.write(doc[:-1])
            writer.end_document()
    return path, docs


def run_config(**train) -> RunConfig:
    overrides = [f"train.seq_len={TRAIN_LEN}", f"model.vocab_size={VOCAB}", "model.segment_len=4",
                 "model.chunk_len=2", "model.minibatch_len=2"]
    return RunConfig().with_overrides(overrides + [f"train.{key}={json.dumps(value)}" for key, value in train.items()])


def by_positions(model, docs, seq_len, edges, documents=None):
    """The reference: every document of at least seq_len + 1 tokens (the first ``documents``), alone through the
    token-loop model, the log-softmax of each position's logits, summed per bucket in float64."""
    chosen = [doc for doc in docs if len(doc) >= seq_len + 1][:documents]
    sums = [[0.0, 0, 0] for _ in range(len(edges) - 1)]  # loss, correct, labelled
    with torch.no_grad():
        for doc in chosen:
            logits = model(doc[None, :seq_len], impl="reference").logits[0].double()  # [L, V]
            for t in range(seq_len):
                label = int(doc[t + 1])
                log_probs = logits[t] - torch.logsumexp(logits[t], dim=0)
                bucket = next(i for i in range(len(edges) - 1) if edges[i] <= t < edges[i + 1])
                sums[bucket][0] += -float(log_probs[label])
                sums[bucket][1] += int(int(logits[t].argmax()) == label)
                sums[bucket][2] += 1
    return len(chosen), sums


def assert_matches(result, count, sums, edges):
    assert result["documents"] == count and result["documents_in_file"] == len(LENGTHS)
    assert [(b["start"], b["end"]) for b in result["by_position"]] == list(zip(edges[:-1], edges[1:]))
    assert [b["labelled"] for b in result["by_position"]] == [row[2] for row in sums]
    assert [b["eval_accuracy"] for b in result["by_position"]] == pytest.approx([row[1] / row[2] for row in sums],
                                                                              rel=1e-12)
    assert_rel_close([b["eval_loss"] for b in result["by_position"]], [row[0] / row[2] for row in sums], 1e-10,
                     "bucket losses")
    assert_rel_close([b["perplexity"] for b in result["by_position"]],
                     [math.exp(row[0] / row[2]) for row in sums], 1e-10, "bucket perplexities")
    total = sum(row[2] for row in sums)
    assert result["labelled"] == total
    assert_rel_close(result["eval_loss"], sum(row[0] for row in sums) / total, 1e-10, "mean loss")


def test_bucket_losses_equal_a_loop_over_positions_of_each_document_alone(saved, documents):
    folder, model = saved
    path, docs = documents
    result = evaluate_documents_checkpoint(folder, run_config(), path, device="cpu", seq_len=64, buckets=3,
                                           documents=4)
    edges = position_edges(64, 3)
    assert edges == [0, 16, 32, 64]
    assert_matches(result, *by_positions(model, docs, 64, edges, documents=4), edges)
    assert result["seq_len"] == 64 and result["train_seq_len"] == TRAIN_LEN
    # default: 4 · train.seq_len = 128 positions of every document of 129 tokens or more, in 4 buckets
    default = evaluate_documents_checkpoint(folder, run_config(), path, device="cpu")
    edges = position_edges(128, 4)
    assert default["seq_len"] == 128 and edges == [0, 16, 32, 64, 128]
    assert_matches(default, *by_positions(model, docs, 128, edges), edges)


def test_two_sequence_parallel_processes_give_the_numbers_of_one_process(saved, documents):
    folder, _ = saved
    path, _ = documents
    options = dict(seq_len=64, buckets=4, documents=3)
    alone = evaluate_documents_checkpoint(folder, run_config(), path, device="cpu", **options)
    spread = evaluate_documents_local(folder, run_config(), path, sp=2, timeout_s=240, **options)  # zigzag
    assert [b["labelled"] for b in spread["by_position"]] == [b["labelled"] for b in alone["by_position"]]
    assert [b["eval_accuracy"] for b in spread["by_position"]] == [b["eval_accuracy"] for b in alone["by_position"]]
    assert_rel_close([b["eval_loss"] for b in spread["by_position"]], [b["eval_loss"] for b in alone["by_position"]],
                     1e-9, "sp = 2 bucket losses")
    assert spread["documents"] == alone["documents"] == 3


def test_bad_requests_name_the_value(saved, documents, tmp_path):
    folder, _ = saved
    path, _ = documents
    config = run_config().replace(model=ModelConfig(vocab_size=VOCAB, segment_len=4, chunk_len=2, minibatch_len=2))
    with pytest.raises(ConfigError, match=r"none of its 8 documents holds seq_len \+ 1 = 201 tokens \(the longest "
                                          r"holds 200\)"):
        check_documents(config, path, seq_len=200)
    with pytest.raises(ConfigError, match="buckets = 8 is too many for seq_len = 64"):
        check_documents(config, path, seq_len=64, buckets=8)
    with pytest.raises(ConfigError, match="documents = 0 is invalid"):
        check_documents(config, path, seq_len=64, documents=0)
    with pytest.raises(ConfigError, match="seq_len = 1 is invalid"):
        check_documents(config, path, seq_len=1)
    with pytest.raises(ConfigError, match="seq_len = 40 does not fit sp = 2"):
        check_documents(config.with_overrides(["parallel.sp=2"]), path, seq_len=40)
    with pytest.raises(ConfigError, match="vocabulary of 64; the model's vocab_size = 32"):
        check_documents(config.with_overrides(["model.vocab_size=32"]), path, seq_len=64)
    with pytest.raises(ConfigError, match="missing.bin"):
        check_documents(config, str(tmp_path / "missing.bin"), seq_len=64)


def test_cli_prints_the_table_and_one_json_line(saved, documents, tmp_path, capsys):
    folder, model = saved
    path, docs = documents
    out = tmp_path / "eval.jsonl"
    assert cli.main(["eval", "--checkpoint", folder, "--data", path, "--seq-len", "64", "--documents", "2",
                     "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    [line] = [json.loads(text) for text in captured.out.splitlines()]
    assert out.read_text() == captured.out
    assert line["task"] == "documents" and line["data"] == path and line["train_seq_len"] == TRAIN_LEN
    assert line["boundaries"] == "file"
    edges = position_edges(64, 4)  # the default buckets
    assert_matches(line, *by_positions(model, docs, 64, edges, documents=2), edges)
    table = captured.err.splitlines()
    assert "2 of 8 documents, first 64 positions each (trained at 32; * = beyond it)" in table[0]
    assert [row.split()[0] for row in table[1:]] == ["[", "[", "[", "*"]  # only [32, 64) lies beyond 32
    for argv, message in ((["--seq-lens", "64"], "--seq-lens does not apply to --data"),
                          (["--dp", "2"], "--dp does not apply to --data"),
                          (["--seq-len", "300"], "none of its 8 documents holds seq_len + 1 = 301 tokens"),
                          (["--sp", "2", "--seq-len", "40"], "seq_len = 40 does not fit sp = 2")):
        assert cli.main(["eval", "--checkpoint", folder, "--data", path, *argv]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", folder, "--seq-len", "64"]) == 2
    assert "--seq-len applies to --data FILE" in capsys.readouterr().err
