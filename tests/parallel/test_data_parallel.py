"""Data parallelism by DDP and FSDP2 on real gloo processes: one step equals one process on the whole batch (loss,
every gradient, the clipped AdamW step, the saved weights and optimizer state), and trainer checkpoints written
sharded resume unsharded and the other way round on the same loss curve."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from checks import relative_error  # inf, never NaN, on a NaN or inf: safe under max() and an all-reduce MAX
from mcdist.config import ConfigError, ModelConfig, ParallelConfig, RunConfig
from mcdist.parallel.spawn import spawn
from mcdist.train.checks import check_run
from mcdist.train.trainer import StopAtStep, launch_local, run_training

SEGMENT = 4


def _full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# -- one step on spawned ranks against one process -------------------------------------------------------------


def _step(rank, world, dp, sp, fsdp, checkpointing, tie):
    """Errors of one dp × sp step (DDP or FSDP2) against one process on the whole batch, the largest on any rank."""
    from mcdist.model import MCLanguageModel
    from mcdist.parallel.data_parallel import DataParallel
    from mcdist.parallel.layout import shard_sequence
    from mcdist.parallel.mesh import build_mesh
    from mcdist.parallel.model import parallelize
    from mcdist.train.trainer import apply_activation_checkpointing

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, segment_len=SEGMENT, chunk_len=2,
                         minibatch_len=2, state_init="checkpoint", tie_embeddings=tie)
    reference = MCLanguageModel(config).double()
    model = MCLanguageModel(config).double()
    model.load_state_dict(reference.state_dict())
    plain = MCLanguageModel(config).double()  # the previous reduction: every gradient summed by hand
    plain.load_state_dict(reference.state_dict())
    seq_len = 2 * sp * SEGMENT * 2
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (2 * dp, seq_len), generator=generator)
    labels = torch.randint(0, 32, (2 * dp, seq_len), generator=generator)
    labels[:, ::3] = -100

    def optimizer(net):
        return torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)

    reference_loss = reference(ids, labels, impl="chunked").loss
    reference_loss.backward()
    reference_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}
    max_norm = 0.5 * float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
    reference_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm))  # clips: half
    reference_optimizer = optimizer(reference)
    reference_optimizer.step()

    mesh = build_mesh(ParallelConfig(dp=dp, sp=sp, layout="zigzag"))
    rows = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
    local_ids = shard_sequence(ids[rows], sp, mesh.sp_rank, "zigzag")
    local_labels = shard_sequence(labels[rows], sp, mesh.sp_rank, "zigzag")
    count = float((labels != -100).sum())  # labelled tokens of the whole batch

    parallelize(plain, mesh, "zigzag")
    (plain.loss_sum(local_ids, local_labels, impl="chunked") / count).backward()
    summed = {}
    for name, p in plain.named_parameters():
        summed[name] = p.grad.clone()
        dist.all_reduce(summed[name])

    parallelize(model, mesh, "zigzag")
    if checkpointing:
        apply_activation_checkpointing(model)
    parallel = DataParallel(model, mesh, fsdp=fsdp)
    share = parallel.loss_sum(local_ids, local_labels, impl="chunked") / count
    share.backward()
    loss = share.detach().clone()
    dist.all_reduce(loss)
    names = {p: name.replace("_checkpoint_wrapped_module.", "") for name, p in model.named_parameters()}
    grads = {names[p]: _full(p.grad) for p in model.parameters()}
    errors = {"loss": relative_error(loss, reference_loss),
              "grads": max(relative_error(grads[name], g) for name, g in reference_grads.items()),
              "grads_vs_sum": max(relative_error(grads[name], summed[name]) for name in grads),
              "grad_names": float(sorted(grads) != sorted(dict(reference.named_parameters())))}
    norm = parallel.clip_grad_norm_(max_norm)
    errors["norm"] = relative_error(norm, reference_norm)
    step_optimizer = optimizer(model)
    step_optimizer.step()
    params = {names[p]: _full(p.detach()) for p in model.parameters()}
    errors["params"] = max(relative_error(params[name], p) for name, p in reference.named_parameters())

    # what a checkpoint holds: the full weights under the same names, the unsharded AdamW's state dict
    saved = parallel.model_to_save()
    state = parallel.optimizer_state_dict(step_optimizer)
    errors.update(dict.fromkeys(["saved_names", "saved", "saved_tied", "optimizer_layout", "optimizer"], 0.0))
    if rank == 0:
        weights, expected = saved.state_dict(), reference.state_dict()
        errors["saved_names"] = float(list(weights) != list(expected))
        errors["saved"] = max(relative_error(weights[name], expected[name]) for name in expected)
        errors["saved_tied"] = float(tie and weights["lm_head.weight"].data_ptr() != weights["embed.weight"].data_ptr())
        whole = reference_optimizer.state_dict()
        errors["optimizer_layout"] = float(state["param_groups"] != whole["param_groups"]
                                           or sorted(state["state"]) != sorted(whole["state"]))
        errors["optimizer"] = max(relative_error(state["state"][i][key], value) for i, values in whole["state"].items()
                                  for key, value in values.items())
        # and back: this rank's form of the full state loads into the (sharded) optimizer unchanged
    local = parallel.local_optimizer_state(step_optimizer, reference_optimizer.state_dict())
    step_optimizer.load_state_dict(local)
    reloaded = [_full(value) for values in step_optimizer.state.values() for value in values.values()]
    expected_state = [value for values in reference_optimizer.state.values() for value in values.values()]
    errors["reloaded"] = max(relative_error(a, b) for a, b in zip(reloaded, expected_state, strict=True))
    values = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(errors, values.tolist()))


def steps_worker(rank, world, cases, out_path):
    results = {"-".join(map(str, case)): _step(rank, world, *case) for case in cases}
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


# (dp, sp, fsdp, activation checkpointing, tied embeddings)
CASES = {2: [(2, 1, False, False, False), (1, 2, False, True, False), (2, 1, True, False, True),
             (1, 2, True, True, False)],
         4: [(2, 2, False, False, True), (2, 2, True, True, False)]}


@pytest.fixture(scope="module")
def step_errors(tmp_path_factory):
    results = {}
    for world, cases in CASES.items():
        path = tmp_path_factory.mktemp("dp") / f"steps-{world}.json"
        spawn(steps_worker, world, cases, str(path), timeout_s=600, collective_timeout_s=120)
        results.update(json.loads(path.read_text()))
    return results


@pytest.mark.parametrize("case", [case for cases in CASES.values() for case in cases],
                         ids=lambda case: "dp{}-sp{}-{}{}{}".format(case[0], case[1], "fsdp" if case[2] else "ddp",
                                                                 "-ac" if case[3] else "", "-tied" if case[4] else ""))
def test_a_data_parallel_step_equals_one_process(step_errors, case):
    errors = step_errors["-".join(map(str, case))]
    for key in ("loss", "grads", "norm", "params", "saved", "optimizer", "reloaded"):
        assert errors[key] <= 1e-12, (key, errors)
    assert errors["grads_vs_sum"] <= 1e-14, errors  # DDP's and FSDP's sum is the hand-written sum
    for key in ("grad_names", "saved_names", "saved_tied", "optimizer_layout"):
        assert errors[key] == 0, (key, errors)


# -- the trainer: checkpoints between sharded and unsharded runs -------------------------------------------------

TINY = ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.segment_len=8",
        "model.chunk_len=4", "model.minibatch_len=4", "train.seq_len=32", "train.batch_size=4",
        "train.num_kv_pairs=3", "train.steps=4", "train.warmup_steps=2", "train.lr=1e-2", "train.log_every=1",
        "train.eval_every=100", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
        "train.dtype=float64", "train.grad_accum=2", "train.loss_chunk=24", "train.checkpoint_every=2",
        "model.tie_embeddings=true"]


def tiny(out_dir, *overrides) -> RunConfig:
    return RunConfig().with_overrides([*TINY, f"train.out_dir={out_dir}", *overrides])


def train_entries(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        return [entry for entry in map(json.loads, handle) if entry["kind"] == "train"]


def curve(out_dir):
    return [(entry["step"], entry["loss"], entry["grad_norm"]) for entry in train_entries(out_dir)]


def assert_same_curve(got, expected):
    assert [step for step, *_ in got] == [step for step, *_ in expected]
    for (_, loss, norm), (_, loss2, norm2) in zip(got, expected, strict=True):
        assert relative_error(loss, loss2) <= 1e-12 and relative_error(norm, norm2) <= 1e-10, (got, expected)


def test_fsdp_checkpoints_resume_unsharded_and_back_on_the_same_curve(tmp_path):
    from mcdist.checkpoint import load_model

    dp2, fsdp = ["parallel.dp=2"], ["parallel.dp=2", "parallel.fsdp=true"]
    straight = launch_local(tiny(tmp_path / "ddp", *dp2), timeout_s=600)  # replicated, 4 steps
    expected = curve(tmp_path / "ddp")
    assert len(expected) == 4
    launch_local(tiny(tmp_path / "fsdp", *fsdp), callbacks=StopAtStep(2), timeout_s=600)
    assert_same_curve(curve(tmp_path / "fsdp"), expected[:2])  # FSDP trains as the replicated run
    held = {name: train_entries(tmp_path / name)[-1]["optimizer_state_bytes"] for name in ("ddp", "fsdp")}
    assert held["fsdp"] < 0.75 * held["ddp"], held  # each rank holds about half of the AdamW state

    sharded = tmp_path / "fsdp" / "checkpoints" / "step-000002"
    replicated = tmp_path / "ddp" / "checkpoints" / "step-000002"
    runs = {"fsdp-to-ddp": (dp2, sharded), "fsdp-to-one": ([], sharded), "ddp-to-fsdp": (fsdp, replicated)}
    for name, (layout, checkpoint) in runs.items():
        shutil.copytree(checkpoint, tmp_path / f"{name}-step-2")
        config = tiny(tmp_path / name, *layout, f"train.resume={tmp_path / f'{name}-step-2'}")
        result = launch_local(config, timeout_s=600) if layout else run_training(config)
        assert result["resumed_from"] is not None and result["step"] == 4, name
        assert_same_curve(curve(tmp_path / name), expected[2:])
        assert relative_error(result["eval_loss"], straight["eval_loss"]) <= 1e-12, name
        final, _ = load_model(result["final_model"])
        reference, _ = load_model(straight["final_model"])
        weights, expected_weights = final.state_dict(), reference.state_dict()
        assert list(weights) == list(expected_weights), name
        assert max(relative_error(weights[key], expected_weights[key]) for key in expected_weights) <= 1e-12, name


def test_fsdp_refuses_the_zero_optimizer_and_non_booleans(tmp_path):
    with pytest.raises(ConfigError, match="FSDP already shards the optimizer state"):
        check_run(tiny(tmp_path, "parallel.dp=2", "parallel.fsdp=true", "train.shard_optimizer=true"))
    with pytest.raises(ConfigError, match="parallel.fsdp = 'yes' is invalid"):
        ParallelConfig(fsdp="yes")
