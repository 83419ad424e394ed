"""The trainer on a packed token file (train.packed, docs/packing.md): each window's documents are computed apart.
Reference: the same windows cut at their end-of-document ids by hand, each document's loss summed alone with the
model's plain forward."""

import json
import os

import pytest
import torch

from checks import assert_rel_close
from mcdist.checkpoint import save_model
from mcdist.config import ConfigError, RunConfig
from mcdist.data.tokens import TokenFile, TokenWriter, window_for_sample
from mcdist.model import MCLanguageModel
from mcdist.train.trainer import launch_local, run_training

EOS = 31
TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.segment_len=4",
        "model.chunk_len=2", "model.minibatch_len=2", "model.memory=titans", "model.aggregation=grm",
        "model.conv_size=3", "train.seq_len=24", "train.batch_size=3", "train.steps=1", "train.warmup_steps=0",
        "train.log_every=1", "train.eval_every=1", "train.eval_batches=1", "train.progress=false",
        "train.device=cpu", "train.task=tokens", "train.dtype=float64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    generator = torch.Generator().manual_seed(0)
    path = str(folder / "docs.bin")
    with TokenWriter(path, vocab_size=32, eos_id=EOS) as writer:
        for _ in range(40):
            writer.write(torch.randint(0, EOS, (int(torch.randint(2, 14, (1,), generator=generator)),),
                                       generator=generator))
            writer.end_document()
    model = MCLanguageModel(RunConfig().with_overrides(TINY + [f"train.data_path={path}"]).model)
    start = str(folder / "start")
    save_model(model, model.config, start)
    return path, start


def loss_of_first_step(tmp_path, path, start, packed: bool) -> float:
    run = RunConfig().with_overrides(TINY + [f"train.data_path={path}", f"train.init_from={start}",
                                             f"train.out_dir={tmp_path / ('packed' if packed else 'plain')}",
                                             f"train.packed={'true' if packed else 'false'}"])
    run_training(run)
    with open(os.path.join(run.train.out_dir, "metrics.jsonl")) as handle:
        return next(e["loss"] for e in map(json.loads, handle) if e["kind"] == "train" and e["step"] == 1)


def test_packed_training_equals_each_document_alone(tmp_path, corpus):
    path, start = corpus
    packed = loss_of_first_step(tmp_path, path, start, True)
    plain = loss_of_first_step(tmp_path, path, start, False)

    from mcdist.checkpoint import load_model
    model, _ = load_model(start)
    model = model.double()
    file = TokenFile(path)
    count = file.num_windows(24)
    total, labelled = torch.zeros((), dtype=torch.float64), 0
    for sample in range(3):  # step 0's rows
        ids, labels = file.read_window(window_for_sample(sample, count, 0, shuffle=True), 24, [(0, 24)])
        first = 0
        ends = [p + 1 for p in range(23) if int(ids[p]) == EOS] + [24]
        for end in ends:  # a document: from after an end-of-document id to (and with) the next one
            with torch.no_grad():
                total += model.loss_sum(ids[None, first:end], labels[None, first:end]).double()
            first = end
        labelled += int((labels != -100).sum())
    expected = float(total / labelled)
    assert_rel_close(torch.tensor(packed), torch.tensor(expected), 1e-9, "packed loss against documents alone")
    assert abs(plain - expected) > 1e-4  # unpacked, documents read each other: the comparison can fail


def test_packed_needs_a_token_task():
    with pytest.raises(ConfigError, match="train.packed = true needs train.task = 'tokens'"):
        RunConfig().with_overrides(["train.packed=true"])


@pytest.mark.parametrize("sp,layout,fsdp", [(2, "zigzag", False), (2, "contiguous", False), (4, "zigzag", False),
                                            (2, "zigzag", True)])
def test_packed_under_sequence_parallelism_equals_one_process(tmp_path, corpus, sp, layout, fsdp):
    """Two steps at sp = 2 and 4 (every rank reads whole windows; each computes its share of the documents:
    MCLanguageModel.document_share) against one process: the same losses, to float64 rounding; under FSDP too,
    whose every block call gathers weights (the ranks' calls must match though their documents differ)."""
    path, start = corpus
    common = TINY + [f"train.data_path={path}", f"train.init_from={start}", "train.packed=true", "train.steps=2",
                     "train.seq_len=32"]
    one = RunConfig().with_overrides(common + [f"train.out_dir={tmp_path / 'one'}"])
    run_training(one)
    many = RunConfig().with_overrides(common + [f"train.out_dir={tmp_path / 'sp'}", f"parallel.sp={sp}",
                                                f"parallel.layout={layout}", f"parallel.fsdp={str(fsdp).lower()}"])
    launch_local(many)

    def losses(run, kind="train", key="loss"):
        with open(os.path.join(run.train.out_dir, "metrics.jsonl")) as handle:
            return [e[key] for e in map(json.loads, handle) if e["kind"] == kind]

    assert len(losses(one)) == 2
    assert_rel_close(torch.tensor(losses(many)), torch.tensor(losses(one)), 1e-9, f"losses at sp = {sp}")
    # the validation of a packed run under sp scores each rank's share of the documents (document_share)
    assert len(losses(one, "eval", "eval_loss")) == 2
    assert_rel_close(torch.tensor(losses(many, "eval", "eval_loss")), torch.tensor(losses(one, "eval", "eval_loss")),
                     1e-9, f"validation losses at sp = {sp}")
    assert losses(many, "eval", "labelled") == losses(one, "eval", "labelled")


def test_validation_of_a_packed_run_scores_each_document_alone(corpus):
    """The trainer's evaluation (mcdist.evaluation.evaluate_on_data) of a packed run, one process: the documents
    of each evaluation window are scored alone."""
    import contextlib

    from mcdist.checkpoint import load_model
    from mcdist.evaluation import evaluate_on_data
    from mcdist.parallel.mesh import Mesh
    from mcdist.train.data import EVAL_SEED_OFFSET, RankData

    path, start = corpus
    run = RunConfig().with_overrides(TINY + [f"train.data_path={path}", "train.packed=true"])
    model, _ = load_model(start)
    model = model.double()
    got = evaluate_on_data(model, RankData(run, Mesh.single()), num_batches=1, device=torch.device("cpu"),
                           autocast=contextlib.nullcontext)
    file = TokenFile(path)
    count = file.num_windows(24)
    total, labelled = 0.0, 0
    for sample in range(3):  # the one evaluation batch: windows drawn with the evaluation seed
        ids, labels = file.read_window(window_for_sample(sample, count, EVAL_SEED_OFFSET, shuffle=True), 24, [(0, 24)])
        first = 0
        for end in [p + 1 for p in range(23) if int(ids[p]) == EOS] + [24]:
            with torch.no_grad():
                total += float(model.loss_sum(ids[None, first:end], labels[None, first:end]))
            first = end
        labelled += int((labels != -100).sum())
    assert got["labelled"] == labelled
    assert_rel_close(torch.tensor(got["eval_loss"]), torch.tensor(total / labelled), 1e-9, "packed eval loss")
