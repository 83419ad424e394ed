"""Generation from a saved model (mcdist.infer_job): one process against a greedy rollout by full forwards, local
sequence-parallel processes and Ray workers against one process, and the `mcdist generate` command."""

import json
import os
import socket

import pytest
import torch

from checks import import_optional
from tiny_models import save_tiny_model
from mcdist import cli
from mcdist.checkpoint import CheckpointError, save_model
from mcdist.config import ModelConfig
from mcdist.infer_job import generate_from_checkpoint, generate_local
from mcdist.model import MCLanguageModel

SEGMENT_LEN = 4
P = 2
# 19 = 2·P·C + 3: SP prefills 16 tokens (zigzag, every rank a piece) and decodes the tail; 5 is too short to
# shard; 35 = two zigzag units + 3. Nine new tokens cross segment ends, so segments close while decoding.
PROMPT_LENS = (19, 5, 35)
NEW_TOKENS = 9


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder, the model) of a tiny float64 model with a byte-sized vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("generate") / "checkpoint", vocab_size=256,
                           segment_len=SEGMENT_LEN, top_k=2)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def one_process(saved, prompts):
    return generate_from_checkpoint(saved[0], prompts, max_new_tokens=NEW_TOKENS, device="cpu")


def greedy_rollout(model, prompt, steps):
    """The reference: every token from a full forward over the whole sequence so far."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), impl="chunked").logits  # [1, T, vocab]
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_one_process_equals_greedy_full_forwards(saved, prompts, one_process):
    _, model = saved
    assert one_process == [greedy_rollout(model, prompt, NEW_TOKENS) for prompt in prompts]
    assert len({tuple(new) for new in one_process}) == len(prompts)  # the prompts matter


def test_eos_ends_a_continuation_and_sampling_is_per_prompt(saved, prompts, one_process):
    eos = one_process[0][4]
    first = one_process[0].index(eos)
    got = generate_from_checkpoint(saved[0], prompts[:1], max_new_tokens=NEW_TOKENS, eos_id=eos, device="cpu")
    assert got == [one_process[0][:first + 1]]
    options = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=20, seed=5, device="cpu")
    both = generate_from_checkpoint(saved[0], prompts[:2], **options)
    assert generate_from_checkpoint(saved[0], prompts[1:2], **options) == both[1:]  # not shifted by prompt 0
    assert both != one_process[:2]  # it did sample


def test_equal_length_prompts_decode_as_one_batch_with_the_same_result(saved):
    """Batches of equal-length prompts (batch_size 3: a batch of 3 and one of 1, beside a prompt of its own
    length) continue each prompt as it continues alone, greedy and sampled, and with eos in some rows."""
    generator = torch.Generator().manual_seed(11)
    group = [torch.randint(0, 256, (10,), generator=generator).tolist() for _ in range(4)]
    lone = torch.randint(0, 256, (6,), generator=generator).tolist()
    mixed = [group[0], lone, *group[1:]]
    for options in (dict(), dict(temperature=1.0, top_k=20, seed=3)):
        alone = [generate_from_checkpoint(saved[0], [prompt], max_new_tokens=NEW_TOKENS, device="cpu",
                                          **options)[0] for prompt in mixed]
        batched = generate_from_checkpoint(saved[0], mixed, max_new_tokens=NEW_TOKENS, device="cpu", batch_size=3,
                                           **options)
        assert batched == alone
    eos = alone[0][2]  # the sampled run's: ends prompt 0 early, maybe others, not all at once
    with_eos = generate_from_checkpoint(saved[0], mixed, max_new_tokens=NEW_TOKENS, device="cpu", batch_size=3,
                                        eos_id=eos, temperature=1.0, top_k=20, seed=3)
    assert with_eos == [new[:new.index(eos) + 1] if eos in new else new for new in alone]


def test_local_sp_processes_equal_one_process(saved, prompts, one_process):
    assert generate_local(saved[0], prompts, nprocs=P, max_new_tokens=NEW_TOKENS, timeout_s=240) == one_process


def test_bad_requests_name_the_value(saved, prompts, tmp_path):
    with pytest.raises(ValueError, match=r"prompt 1 = \[\] is invalid"):
        generate_from_checkpoint(saved[0], [[1], []], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"token id 256 at position 2 is invalid; expected an integer in \[0, 256\)"):
        generate_from_checkpoint(saved[0], [[1, 2, 256]], max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens = -1 is invalid"):
        generate_from_checkpoint(saved[0], prompts, max_new_tokens=-1)
    with pytest.raises(CheckpointError, match="nowhere"):
        generate_from_checkpoint(str(tmp_path / "nowhere"), prompts, max_new_tokens=1)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    with open(os.path.join(saved[0], "config.json")) as source:
        (corrupt / "config.json").write_text(source.read())
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):  # found by the worker, raised here
        generate_local(str(corrupt), prompts[:1], nprocs=P, max_new_tokens=1, timeout_s=240)


# -- the command line ------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    status = cli.main(["generate", *argv])
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()] if status == 0 else captured.err


def test_cli_impl_reaches_the_decode_session(saved, prompts, one_process, capsys):
    """--impl chunked continues a prompt as one process does; --impl reference, which a decode cache cannot use,
    is refused naming it (so the option reaches the session); an unknown one is refused by the parser."""
    ids = ",".join(map(str, prompts[0]))
    status, records = run_cli(capsys, "--checkpoint", saved[0], "--prompt-ids", ids, "--max-new-tokens",
                              str(NEW_TOKENS), "--device", "cpu", "--impl", "chunked")
    assert status == 0 and [record["new_ids"] for record in records] == one_process[:1]
    status, err = run_cli(capsys, "--checkpoint", saved[0], "--prompt-ids", ids, "--max-new-tokens", "1",
                          "--impl", "reference")
    assert status == 2 and "impl = 'reference'" in err and len(err.strip().splitlines()) == 1, err
    status, err = run_cli(capsys, "--checkpoint", saved[0], "--prompt-ids", "1", "--max-new-tokens", "1",
                          "--impl", "fastest")
    assert status == 2 and "--impl: invalid choice: 'fastest'" in err


def test_cli_token_ids_and_out_file(saved, prompts, one_process, capsys, tmp_path):
    out = tmp_path / "runs" / "generated.jsonl"
    status, records = run_cli(capsys, "--checkpoint", saved[0], "--prompt-ids", ",".join(map(str, prompts[0])),
                              "--prompt-ids", " ".join(map(str, prompts[1])), "--max-new-tokens", str(NEW_TOKENS),
                              "--device", "cpu", "--out", str(out))
    assert status == 0
    assert records == [{"prompt_ids": prompts[i], "new_ids": one_process[i]} for i in range(2)]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert os.listdir(out.parent) == ["generated.jsonl"]  # no temporary left behind


def test_under_torchrun_each_prompt_spreads_over_its_processes(saved, prompts, one_process, tmp_path):
    import subprocess
    import sys

    argv = ["generate", "--checkpoint", saved[0], "--prompt-ids", ",".join(map(str, prompts[0])), "--prompt-ids",
            ",".join(map(str, prompts[2])), "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]

    def torchrun(*extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(P), "-m", "mcdist.cli", *argv, *extra], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    done = torchrun()
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]  # rank 0 prints, once
    assert records == [{"prompt_ids": prompts[i], "new_ids": one_process[i]} for i in (0, 2)]
    refused = torchrun("--sp", "3")
    assert refused.returncode != 0 and "--sp = 3 under torchrun of 2 processes" in refused.stderr


def test_cli_text_with_the_byte_tokenizer(saved, capsys, tmp_path):
    texts = ["Memory caching, ", "héllo"]
    expected = generate_from_checkpoint(saved[0], [list(text.encode()) for text in texts], max_new_tokens=5)
    status, records = run_cli(capsys, "--checkpoint", saved[0], "--prompt", texts[0], "--prompt", texts[1],
                              "--tokenizer", "byte", "--max-new-tokens", "5")
    assert status == 0
    assert [r["prompt_ids"] for r in records] == [list(text.encode()) for text in texts]
    assert [r["new_ids"] for r in records] == expected
    assert [r["text"] for r in records] == [bytes(new).decode("utf-8", errors="replace") for new in expected]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(texts[0] + "\n\n" + texts[1] + "\n", encoding="utf-8")
    status, from_file = run_cli(capsys, "--checkpoint", saved[0], "--prompt-file", str(prompt_file),
                                "--tokenizer", "byte", "--max-new-tokens", "5")
    assert status == 0 and from_file == records


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD = [
    (["--prompt-ids", "1,x,3"], "'x' is not a token id"),
    (["--prompt-ids", "1,300"], "token id 300 at position 1"),
    (["--prompt-ids", " "], "holds no token ids"),
    (["--prompt-ids", "1", "--max-new-tokens", "-2"], "max_new_tokens = -2"),
    (["--prompt-ids", "1", "--eos-id", "256"], "eos_id = 256"),
    (["--prompt", "hi"], "--prompt needs --tokenizer"),
    (["--prompt", "hi", "--tokenizer", "no-such-tokenizer.json"], "no-such-tokenizer.json"),
    (["--prompt-ids", "1", "--prompt", "hi", "--tokenizer", "byte"], "--prompt-ids and --prompt given together"),
    (["--prompt-file", "no-such-prompts.txt"], "no-such-prompts.txt"),
    (["--prompt-ids", "1", "--sp", "0"], "--sp = 0 is invalid"),
    (["--prompt-ids", "1", "--batch-size", "0"], "batch_size = 0 is invalid"),
    (["--prompt-ids", "1", "--address", "127.0.0.1:1"], "need --ray"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[message for _, message in BAD])
def test_cli_bad_input_exits_2_naming_it(saved, capsys, argv, message):
    if "--max-new-tokens" not in argv:
        argv = [*argv, "--max-new-tokens", "3"]
    status, err = run_cli(capsys, "--checkpoint", saved[0], *argv)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_missing_checkpoint_and_unreachable_ray_exit_2(capsys, tmp_path):
    missing = str(tmp_path / "no-checkpoint")
    status, err = run_cli(capsys, "--checkpoint", missing, "--prompt-ids", "1", "--max-new-tokens", "1")
    assert status == 2 and missing in err
    import_optional("ray.train", "ray")
    address = f"127.0.0.1:{closed_port()}"
    folder = str(tmp_path / "checkpoint")
    config = ModelConfig(vocab_size=8, d_model=8, n_heads=1, segment_len=4, chunk_len=2, minibatch_len=2)
    save_model(MCLanguageModel(config), config, folder)
    status, err = run_cli(capsys, "--checkpoint", folder, "--prompt-ids", "1", "--max-new-tokens", "1", "--ray",
                          "--address", address)
    assert status == 2 and address in err


# -- Ray -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray for the module (2 CPUs, a small object store), always shut down."""
    import ray
    import ray.train  # noqa: F401  (a dependency: make setup installs it)

    ray.init(address="local", num_cpus=2, object_store_memory=128 * 1024 * 1024, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.xdist_group("ray")
def test_ray_workers_equal_one_process(local_ray, saved, prompts, one_process):
    from mcdist.infer_job import generate_with_ray

    got = generate_with_ray(os.path.relpath(saved[0]), prompts, workers=P, max_new_tokens=NEW_TOKENS, log=None,
                            timeout_s=240)
    assert got == one_process
