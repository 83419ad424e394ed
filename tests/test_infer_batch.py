"""`mcdist infer` (mcdist.infer_batch): the job's results against each prompt continued alone by
mcdist.infer.complete (seeded as docs/inference.md says), a job killed mid-way and rerun, a torn last line, bad
input lines, a foreign --out, two local replicas (of one rank and of sp = 2), and on a local Ray two replicas of sp = 2 and a lost replica."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from checks import import_optional
from tiny_models import save_tiny_model
from mcdist import cli
from mcdist.checkpoint import save_model
from mcdist.config import ModelConfig
from mcdist.infer import Request, complete
from mcdist.infer_batch import InferJobError, InferOptions, run_infer_job
from mcdist.model import MCLanguageModel

SEGMENT_LEN = 4
# with sp = 2 a prompt of >= 2·2·C = 16 tokens is long (decoded over the group); 19 and 35 shard with a tail
LENGTHS = (3, 19, 6, 1, 35, 9, 16, 2, 11, 5)
NEW_TOKENS = 7

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, model): a tiny float64 model with a byte-sized vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("infer_batch") / "checkpoint", vocab_size=256,
                           segment_len=SEGMENT_LEN, top_k=2)


def expected_seed(job_seed, identifier) -> int:
    """The documented seed of a prompt: the first 63 bits of sha256("<job seed>:<id as JSON>"), little-endian."""
    digest = hashlib.sha256(f"{job_seed}:{json.dumps(identifier)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def make_lines(count=len(LENGTHS), seed=3):
    """Prompt lines of mixed lengths and per-line options (sampling, top-p, a stop sequence, own lengths)."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for number in range(count):
        length = LENGTHS[number % len(LENGTHS)]
        line = {"id": f"q{number}" if number % 3 else number,
                "prompt_ids": torch.randint(0, 256, (length,), generator=generator).tolist()}
        if number % 4 == 1:
            line.update(temperature=1.0, top_k=40)
        if number % 4 == 2:
            line.update(temperature=0.8, top_p=0.9, max_new_tokens=5)
        lines.append(line)
    return lines


def write_lines(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return str(path)


def reference(model, lines, job_seed=0, max_new_tokens=NEW_TOKENS):
    """{id as JSON: (new_ids, finish_reason)}: each prompt continued alone by complete()."""
    expected = {}
    for line in lines:
        request = Request(line["prompt_ids"], line.get("max_new_tokens", max_new_tokens),
                          line.get("temperature", 0.0), line.get("top_k", 0), line.get("top_p", 1.0),
                          line.get("stop_ids", []), expected_seed(job_seed, line["id"]))
        done = complete(model, [request])[0]
        expected[json.dumps(line["id"])] = (done.new_ids, done.finish_reason)
    return expected


def results(path):
    """{id as JSON: (new_ids, finish_reason)} of an output file, asserting no id is there twice."""
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    keys = [json.dumps(record["id"]) for record in records]
    assert len(keys) == len(set(keys)), "an id was written twice"
    return {json.dumps(record["id"]): (record["new_ids"], record["finish_reason"]) for record in records}


@pytest.fixture(scope="module")
def job(saved, tmp_path_factory):
    """(prompts file, lines, expected results, the one-process job's output) of the shared prompt set."""
    folder = tmp_path_factory.mktemp("job")
    lines = make_lines()
    prompts = write_lines(folder / "prompts.jsonl", lines)
    out = str(folder / "one.jsonl")
    summary = run_infer_job(saved[0], prompts, out, options=InferOptions(max_new_tokens=NEW_TOKENS, batch_size=3),
                            log=lambda line: None)
    return prompts, lines, reference(saved[1], lines), out, summary


def test_one_process_job_equals_each_prompt_alone(job):
    prompts, lines, expected, out, summary = job
    assert results(out) == expected
    records = {json.dumps(record["id"]): record for record in map(json.loads, open(out))}
    for line in lines:
        record = records[json.dumps(line["id"])]
        assert record["prompt_tokens"] == len(line["prompt_ids"]) and record["seconds"] >= 0
        assert set(record) == {"id", "new_ids", "finish_reason", "prompt_tokens", "seconds"}
    assert summary["written"] == len(lines) and summary["errors"] == 0 and summary["sp_prompts"] == 0
    assert summary["new_tokens"] == sum(len(new) for new, _ in expected.values())
    assert len({tuple(new) for new, _ in expected.values()}) == len(lines)  # the prompts and seeds matter


def test_stop_sequences_and_the_byte_tokenizer(saved, tmp_path):
    """A stop sequence (the 3rd and 4th ids a prompt continues with) ends it with finish_reason "stop"; text
    prompts are encoded with --tokenizer byte and results carry the text."""
    plain = complete(saved[1], [Request(list(b"Memory"), NEW_TOKENS, seed=expected_seed(0, "t"))])[0].new_ids
    lines = [{"id": "t", "prompt": "Memory", "stop_ids": [plain[2:4]]}, {"id": "u", "prompt": "h\u00e9llo"}]
    out = tmp_path / "text.jsonl"
    status = cli.main(["infer", "--checkpoint", saved[0], "--prompts", write_lines(tmp_path / "p.jsonl", lines),
                       "--out", str(out), "--tokenizer", "byte", "--max-new-tokens", str(NEW_TOKENS)])
    assert status == 0
    records = {record["id"]: record for record in map(json.loads, open(out))}
    assert records["t"]["new_ids"] == plain[:4] and records["t"]["finish_reason"] == "stop"
    assert records["t"]["prompt_tokens"] == 6 and records["u"]["prompt_tokens"] == len("h\u00e9llo".encode())
    for record in records.values():
        assert record["text"] == bytes(record["new_ids"]).decode("utf-8", errors="replace")


BAD_LINES = [
    ("not json\n", "not valid JSON"),
    ('{"id": "a", "prompt_ids": [1], "colour": 1}\n', "unknown field 'colour'"),
    ('{"id": "b", "prompt_ids": "1 2"}\n', "prompt_ids = \"1 2\" is invalid"),
    ('{"id": "c", "prompt_ids": [1, 256]}\n', "prompt id 256 is outside the vocabulary"),
    ('{"id": "ok", "prompt_ids": [1]}\n', "duplicate id \"ok\" (first on line 1)"),
    ('{"id": "d", "prompt_ids": []}\n', "the prompt is empty"),
    ('{"id": "e", "prompt": "text"}\n', "a text prompt needs --tokenizer"),
    ('{"prompt_ids": [1]}\n', "no id"),
    ('{"id": 1.5, "prompt_ids": [1]}\n', "id = 1.5 is invalid"),
    ('{"id": "f", "prompt_ids": [1], "temperature": "hot"}\n', "temperature = 'hot' is invalid"),
    ('{"id": "g", "prompt_ids": [1], "top_p": 0}\n', "top_p = 0.0; expected a number in (0, 1]"),
    ('{"id": "h", "prompt_ids": [1], "stop_ids": [[]]}\n', "stop_ids entry [] is invalid"),
    ('[1, 2]\n', "expected a JSON object"),
]


def test_malformed_lines_are_reported_with_line_numbers_and_the_rest_done(saved, tmp_path, capsys):
    body = ['{"id": "ok", "prompt_ids": [1, 2, 3]}\n'] + [line for line, _ in BAD_LINES]
    body += ["\n", '{"id": "fine", "prompt_ids": [4, 5]}\n']
    prompts = tmp_path / "bad.jsonl"
    prompts.write_bytes("".join(body).encode() + b'{"id": "x", "prompt_ids": [1]} \xff\n')
    out = tmp_path / "out.jsonl"
    status = cli.main(["infer", "--checkpoint", saved[0], "--prompts", str(prompts), "--out", str(out),
                       "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["errors"] == len(BAD_LINES) + 1
    assert set(results(out)) == {'"ok"', '"fine"'}
    errors = [json.loads(line) for line in open(tmp_path / "out.errors.jsonl")]
    assert [error["line"] for error in errors] == list(range(2, len(BAD_LINES) + 2)) + [len(body) + 1]
    for error, (_, reason) in zip(errors, BAD_LINES):
        assert reason in error["reason"], (error, reason)
    assert "not UTF-8" in errors[-1]["reason"]
    assert f"{len(BAD_LINES) + 1} error(s)" in captured.err


def test_killed_job_resumes_to_the_uninterrupted_result(saved, tmp_path):
    """SIGKILL of the `mcdist infer` process after some lines, then a rerun: every id once, equal to the
    uninterrupted results."""
    lines = make_lines(count=24, seed=5)
    prompts = write_lines(tmp_path / "prompts.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = ["infer", "--checkpoint", saved[0], "--prompts", prompts, "--out", str(out), "--batch-size", "1",
            "--max-new-tokens", "24"]
    process = subprocess.Popen([sys.executable, "-m", "mcdist.cli", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
        stderr = process.stderr.read().decode()
        process.stderr.close()
    first = results(out)
    assert 3 <= len(first) < len(lines), f"not killed mid-job ({len(first)} lines): {stderr[-2000:]}"
    assert cli.main([*argv, "--batch-size", "4"]) == 0  # how it is batched is not part of the job
    assert results(out) == reference(saved[1], lines, max_new_tokens=24)


def test_a_torn_last_line_is_removed_and_redone(saved, job, tmp_path):
    prompts, lines, expected, one, _ = job
    out = tmp_path / "out.jsonl"
    data = open(one, "rb").read().splitlines(keepends=True)
    header = os.path.join(os.path.dirname(one), "one.job.json")
    (tmp_path / "out.job.json").write_bytes(open(header, "rb").read())
    out.write_bytes(b"".join(data[:-2]) + data[-2][:len(data[-2]) // 2])  # two missing, one of them torn
    notices = []
    summary = run_infer_job(saved[0], prompts, str(out), options=InferOptions(max_new_tokens=NEW_TOKENS),
                            log=notices.append)
    assert results(out) == expected and summary["written"] == 2 and summary["skipped"] == len(lines) - 2
    assert any("torn last line" in notice for notice in notices)


def test_a_foreign_out_is_refused_in_one_line(saved, job, tmp_path, capsys):
    prompts, lines, _, one, _ = job
    before = open(one, "rb").read()
    base = ["infer", "--checkpoint", saved[0], "--prompts", prompts, "--out", one,
            "--max-new-tokens", str(NEW_TOKENS)]
    other_prompts = write_lines(tmp_path / "other.jsonl", lines[:3])
    for extra, message in ((["--temperature", "0.5"], "temperature = 0.0, this run 0.5"),
                           (["--seed", "1"], "seed = 0, this run 1"),
                           (["--prompts", other_prompts], "another prompts file")):
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "belongs to another job" in err and len(err.strip().splitlines()) == 1, err
    stranger = tmp_path / "stranger.jsonl"
    stranger.write_text('{"something": "else"}\n')
    assert cli.main([*base, "--out", str(stranger)]) == 2
    assert "was not written by mcdist infer" in capsys.readouterr().err
    with pytest.raises(InferJobError, match="another checkpoint"):
        other = tmp_path / "other_checkpoint"
        config = ModelConfig(vocab_size=256, d_model=16, n_layers=2, n_heads=2, memory="gated", aggregation="grm",
                             segment_len=SEGMENT_LEN, chunk_len=2, minibatch_len=2, top_k=2)
        torch.manual_seed(1)  # other weights (the same ones would be the same checkpoint)
        save_model(MCLanguageModel(config).double(), config, str(other))
        run_infer_job(str(other), prompts, one, options=InferOptions(max_new_tokens=NEW_TOKENS), log=None)
    assert open(one, "rb").read() == before


BAD_OPTIONS = [
    (["--top-p", "0"], "top-p = 0.0"),
    (["--temperature", "-1"], "temperature = -1.0"),
    (["--replicas", "0"], "--replicas = 0 is invalid"),
    (["--batch-size", "0"], "--batch-size = 0 is invalid"),
    (["--address", "127.0.0.1:1"], "need --ray"),
    (["--prompts", "no-such-prompts.jsonl"], "no-such-prompts.jsonl"),
    (["--checkpoint", "no-such-checkpoint"], "no-such-checkpoint"),
]


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[message for _, message in BAD_OPTIONS])
def test_bad_options_exit_2_naming_them(saved, job, tmp_path, capsys, extra, message):
    status = cli.main(["infer", "--checkpoint", saved[0], "--prompts", job[0], "--out", str(tmp_path / "o.jsonl"),
                       *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_corrupt_checkpoint_exits_2_naming_the_file(saved, job, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes(open(os.path.join(saved[0], "config.json"), "rb").read())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    status = cli.main(["infer", "--checkpoint", str(corrupt), "--prompts", job[0], "--out",
                       str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert status == 2 and "model.safetensors" in err and len(err.strip().splitlines()) == 1, err


def test_two_local_replicas_equal_one_process(saved, job, tmp_path):
    prompts, lines, expected, _, _ = job
    out = tmp_path / "two.jsonl"
    summary = run_infer_job(saved[0], prompts, str(out), options=InferOptions(max_new_tokens=NEW_TOKENS, batch_size=2),
                            replicas=2, log=None, timeout_s=120)
    assert results(out) == expected
    assert [stats["replica"] for stats in summary["per_replica"]] == [0, 1]
    assert sum(stats["prompts"] for stats in summary["per_replica"]) == len(lines)


def test_two_local_replicas_of_sp2_equal_one_process(saved, job, tmp_path):
    """Without Ray: each replica's two ranks join a rendezvous store the driver holds (docs/distributed.md §6);
    long prompts decode over the group."""
    prompts, lines, expected, _, _ = job
    out = tmp_path / "local-sp2.jsonl"
    events = []
    summary = run_infer_job(saved[0], prompts, str(out), options=InferOptions(max_new_tokens=NEW_TOKENS, batch_size=2),
                            replicas=2, sp=2, log=None, on_event=events.append, timeout_s=180)
    assert results(out) == expected
    assert summary["sp_prompts"] == sum(length >= 2 * 2 * SEGMENT_LEN for length in LENGTHS) == 3
    assert sum(stats["prompts"] for stats in summary["per_replica"]) == len(lines)


# -- Ray ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 4 logical CPUs (2 replicas × sp 2 ranks), a small object store; always shut down."""
    ray = import_optional("ray", "ray")
    ray.init(address="local", num_cpus=4, object_store_memory=128 * 1024 * 1024, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.xdist_group("ray")
def test_ray_two_replicas_of_sp2_equal_one_process(local_ray, saved, job, tmp_path):
    """Long prompts (>= 16 tokens) decode over each replica's sp group, short ones on its ranks alone."""
    prompts, lines, expected, _, _ = job
    out = tmp_path / "ray.jsonl"
    events = []
    summary = run_infer_job(saved[0], prompts, str(out), options=InferOptions(max_new_tokens=NEW_TOKENS,
                                                                               batch_size=2),
                            replicas=2, sp=2, ray=True, device="cpu", log=None, on_event=events.append,
                            timeout_s=120)
    assert results(out) == expected
    assert summary["sp_prompts"] == sum(length >= 2 * 2 * SEGMENT_LEN for length in LENGTHS) == 3
    assert sorted(len(event[2]) for event in events if event[0] == "started") == [2, 2]  # two ranks each


ATTEMPTS = 4  # tries of the lost-replica job until the kill lands before the batch is done


@pytest.mark.xdist_group("ray")
def test_ray_a_lost_replica_s_batch_is_retried_on_another(local_ray, saved, job, tmp_path):
    """Replica 1's actor is killed (SIGKILL) as soon as it takes its first batch: the batch is done by replica
    0, the results equal one process's, every id once.

    The kill races the batch (two prompts decode in tens of milliseconds): on a loaded machine replica 1 can send
    its results before the driver reads its "took". Such a try proves no retry, so the job runs again (at most
    ATTEMPTS times) until replica 1 dies holding its batch; every try must still give one process's results."""
    prompts, lines, expected, _, _ = job
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"lost-{attempt}.jsonl"
        pids, killed, finished_anyway = {}, [], []

        def watch(event):
            if event[0] == "started":
                pids[event[1]] = event[2]
            elif event[0] == "took" and event[1] == 1 and not killed:
                killed.append(event[2])
                os.kill(pids[1][0], signal.SIGKILL)
            elif event[0] == "done" and event[1] == 1 and killed and event[2] == killed[0]:
                finished_anyway.append(event[2])

        summary = run_infer_job(saved[0], prompts, str(out), options=InferOptions(max_new_tokens=NEW_TOKENS,
                                                                                   batch_size=2),
                                replicas=2, ray=True, device="cpu", log=None, on_event=watch, timeout_s=120)
        assert killed, "replica 1 never took a batch"
        assert results(out) == expected
        assert [lost["replica"] for lost in summary["lost_replicas"]] == [1]
        if not finished_anyway:
            break
    assert not finished_anyway, f"replica 1 finished its batch before the kill in all {ATTEMPTS} tries"
    assert summary["retried_batches"] >= 1
