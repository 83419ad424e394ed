"""The trainer: one function, :func:`run_training`, for a single process, spawned processes, torchrun and Ray.

Every rank of a ``dp × sp`` mesh calls :func:`run_training` with the same :class:`~mcdist.config.RunConfig`.
It builds the model (the MC layers sequence-parallel when ``sp > 1``), AdamW (betas :data:`ADAM_BETAS`, weight
decay on matrices and embeddings only: :func:`param_groups`) with linear warmup and a cosine decay to
``min_lr_ratio · lr`` (:func:`learning_rate_at`), the rank's data, resumes from a checkpoint, trains, evaluates
(:func:`mcdist.evaluation.evaluate_model`: the numbers ``mcdist eval`` gives) and saves. The layers compute with
``train.impl``. It runs in one process, on spawned local processes (:func:`launch_local`), as a rank of a torchrun
job (:func:`train_under_torchrun`) or on Ray workers (:func:`mcdist.train.ray_job.train_with_ray`), each through
its launcher in :mod:`mcdist.runners`.

What a step computes. The global batch of step ``n`` is ``grad_accum`` micro-batches of ``batch_size``
sequences; sample ``i = (n · grad_accum + micro) · batch_size + row`` is a pure function of ``(train.seed, i)``
(:class:`~mcdist.train.data.RankData`). Rank ``(dp_rank, sp_rank)`` takes rows ``[dp_rank · b, (dp_rank + 1) · b)``,
``b = batch_size / dp``, and of each row only its own pieces of the sequence (``shard_sequence`` semantics;
from a token file it reads nothing else). Each micro-batch adds ``Σ cross-entropy / N`` to the gradients,
``N`` = labelled tokens of the whole step on every rank, so after the gradient reduction over every rank (a
plain sum: DDP, or FSDP2's reduce-scatter under ``parallel.fsdp``; :mod:`mcdist.parallel.data_parallel`) every
rank holds exactly the gradient of the mean loss over the whole step (its shard of it under FSDP): the same as
one big batch, whatever ``dp``, ``sp`` and ``grad_accum``. Gradients are clipped after the reduction.

Precision: ``train.dtype = bfloat16`` runs the forward under ``torch.autocast(bfloat16)`` on a GPU (parameters,
optimizer state and the loss stay float32); on the CPU it runs in float32. ``float64`` makes every parameter
float64 (tests).

Outputs in ``train.out_dir`` (rank 0 writes them):

* ``run_config.json``; ``metrics.jsonl``: ``{"kind": "train", ...}`` every ``log_every`` steps (loss, lr,
  grad_norm, tokens_per_s, peak_memory_bytes, comm bytes) and ``{"kind": "eval", ...}`` every ``eval_every``
  steps and at the end; on resume, the lines after the checkpoint's step are dropped first,
* ``checkpoints/step-NNNNNN/`` every ``checkpoint_every`` steps and at the end (:mod:`mcdist.train.state`),
* ``checkpoint/``: the final weights + ``config.json`` (no training state) once the run reaches ``steps``,
* ``tensorboard/`` when ``train.tensorboard``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mcdist.checkpoint import CheckpointError, load_model
from mcdist.config import ConfigError, RunConfig, write_text_atomic
from mcdist.device import autocast_for, resolve_device
from mcdist.evaluation import evaluate_model
from mcdist.model import MCLanguageModel
from mcdist.parallel.failure import PEER_ERROR_PREFIX
from mcdist.parallel.mesh import Mesh, build_mesh
from mcdist.parallel.data_parallel import DataParallel
from mcdist.parallel.model import communication_report, parallelize
from mcdist.runners.spawned import run_spawned
from mcdist.runners.torchrun import run_under_torchrun
from mcdist.train import state as ckpt
from mcdist.train.checks import check_run
from mcdist.train.data import RankData

FINAL_MODEL_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"
ADAM_BETAS = (0.9, 0.95)


# -- callbacks -------------------------------------------------------------------------------------------------


class TrainCallbacks:
    """Hooks into :func:`run_training`; every method is an optional no-op.

    ``on_metrics`` and ``on_checkpoint`` run on rank 0 only, unless a subclass sets ``all_ranks = True`` (the
    metrics are reduced, hence equal, on every rank; Ray Train, whose ``report`` every worker must call, needs
    that). ``should_stop`` runs on every rank after every step; the run stops when any rank says so.
    Callbacks travel to spawned processes by pickling: define them at module level.
    """

    all_ranks: bool = False

    def on_metrics(self, metrics: dict) -> None:
        """A ``{"kind": "train" | "eval", "step", ...}`` record, as written to metrics.jsonl."""

    def on_checkpoint(self, step: int, path: str, metrics: dict) -> None:
        """Called once the checkpoint of ``step`` is complete on disk (renamed into place) at ``path``."""

    def resume_from(self) -> Optional[str]:
        """A checkpoint folder to resume from, overriding ``train.resume``; ``None`` = use ``train.resume``."""
        return None

    def should_stop(self, step: int) -> bool:
        """Stop after ``step`` optimizer steps (a checkpoint is saved first), e.g. at the end of an allocation."""
        return False


class StopAtStep(TrainCallbacks):
    """Stop (and checkpoint) once ``step`` optimizer steps are done: a job that ends before ``train.steps``."""

    def __init__(self, step: int):
        self.step = step

    def should_stop(self, step: int) -> bool:
        return step >= self.step


# -- schedule and optimizer ----------------------------------------------------------------------------------


def learning_rate_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over ``warmup_steps`` to ``lr``, then a
    cosine to ``min_lr_ratio · lr`` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups: weight decay on parameters of two or more dimensions (matrices, embeddings), none on
    norms' gains and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -- model -----------------------------------------------------------------------------------------------------


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them: every block of
    ``model.blocks`` is put inside torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``;
    keyword arguments such as ``impl=`` pass through). State-dict names do not change (the wrapper strips its
    ``_checkpoint_wrapped_module.`` prefix when saving and restores it when loading)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def build_model(run_config: RunConfig, mesh: Mesh, device: torch.device) -> DataParallel:
    """The model of ``run_config``, seeded, sequence-parallel over the mesh, checkpointed if asked, and under data
    parallelism over every rank (DDP, or FSDP2 with ``parallel.fsdp``); its ``.model`` is the language model."""
    torch.manual_seed(run_config.train.seed)  # the same weights on every rank (DDP also broadcasts rank 0's)
    model = MCLanguageModel(run_config.model)
    if run_config.train.dtype == "float64":
        model.double()
    fsdp = run_config.parallel.fsdp and mesh.dp * mesh.sp > 1
    if not fsdp:  # fully_shard moves each rank's shard to the device itself: the whole model need not fit there
        model.to(device)
    parallelize(model, mesh, run_config.parallel.layout)
    if run_config.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    parallel = DataParallel(model, mesh, fsdp=fsdp)
    model.train()
    return parallel


def build_optimizer(model: torch.nn.Module, cfg, mesh: Mesh, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups; with ``train.shard_optimizer`` on more than one rank, its state
    sharded over every rank of the world (``ZeroRedundancyOptimizer``: a rank steps the parameters it owns and
    broadcasts them). Gradients are already summed over the world, so every rank's update is the one unsharded
    AdamW makes, and the checkpointed state dict (consolidated on rank 0) has the same form either way. Under
    ``parallel.fsdp`` the parameters are FSDP's shards, and so is the AdamW state made for them."""
    groups = param_groups(model, cfg.weight_decay)
    options = dict(lr=cfg.lr, betas=ADAM_BETAS, foreach=device.type == "cuda")
    if cfg.shard_optimizer and mesh.distributed and dist.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


def _saved_weights(path: str) -> dict:
    """The full weights of a checkpoint folder (training or weights-only), on the CPU, verified."""
    return load_model(path, map_location="cpu")[0].state_dict()


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def _on_rank_0(rank: int, device: torch.device, action: Callable[[], object], failure: str) -> None:
    """Run ``action`` on rank 0 only (a save), and make every rank raise if it failed: rank 0 its own error, the
    others ``RuntimeError(failure)``; otherwise they would wait forever at the next collective."""
    error = None
    if rank == 0:
        try:
            action()
        except Exception as caught:
            error = caught
    ok = _all_reduce(torch.tensor([0.0 if error else 1.0], device=device), dist.ReduceOp.MIN)
    if error is not None:
        raise error
    if float(ok[0]) < 1:
        raise RuntimeError(failure)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (its shard under ``train.shard_optimizer``)."""
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps this rank's shard in .optim
    values = [getattr(value, "_local_tensor", value) for state in local.state.values() for value in state.values()]
    return sum(value.numel() * value.element_size() for value in values if torch.is_tensor(value))  # FSDP: shard


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


# -- output ----------------------------------------------------------------------------------------------------


class _Reporter:
    """Rank 0's outputs: metrics.jsonl, the progress bar or plain lines, TensorBoard, callbacks."""

    def __init__(self, run_config: RunConfig, *, rank: int, start_step: int, callbacks: TrainCallbacks):
        cfg = run_config.train
        self.rank, self.callbacks, self.steps = rank, callbacks, cfg.steps
        self.is_writer = rank == 0
        self.progress = cfg.progress
        self.bar = self.writer = self.metrics_file = None
        if not self.is_writer:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        run_config.save(os.path.join(cfg.out_dir, "run_config.json"))
        metrics_path = os.path.join(cfg.out_dir, METRICS_NAME)
        _keep_metrics_up_to(metrics_path, start_step)
        self.metrics_file = open(metrics_path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step or None)
        if cfg.progress:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True,
                                file=sys.stderr, leave=True)

    def say(self, line: str) -> None:
        if self.is_writer and self.progress:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def advance(self, postfix: Optional[str] = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def record(self, entry: dict) -> None:
        if self.is_writer:
            self.metrics_file.write(json.dumps(entry, sort_keys=True) + "\n")
            self.metrics_file.flush()
            if self.writer is not None:
                for key, value in entry.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                        self.writer.add_scalar(f"{entry['kind']}/{key}", value, entry["step"])
                    elif isinstance(value, dict):
                        for sub, number in value.items():
                            if isinstance(number, (int, float)):
                                self.writer.add_scalar(f"{entry['kind']}/{key}/{sub}", number, entry["step"])
        if self.is_writer or self.callbacks.all_ranks:
            self.callbacks.on_metrics(dict(entry))

    def checkpoint(self, step: int, path: str, metrics: dict) -> None:
        if self.is_writer or self.callbacks.all_ranks:
            self.callbacks.on_checkpoint(step, path, dict(metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def _keep_metrics_up_to(path: str, step: int) -> None:
    """Drop the metrics lines after ``step`` (0 = all): a resumed run rewrites what came after its checkpoint."""
    if not os.path.exists(path):
        return
    kept = []
    if step > 0:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed process
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
                    kept.append(json.dumps(entry, sort_keys=True) + "\n")
    write_text_atomic(path, "".join(kept))


# -- resume ----------------------------------------------------------------------------------------------------


def resolve_resume(run_config: RunConfig, callbacks: TrainCallbacks) -> Optional[str]:
    """The checkpoint folder to resume from, or ``None`` for a fresh start (see ``train.resume``).

    Raises:
        CheckpointError: the chosen or latest checkpoint is corrupt or incomplete (naming it; with
            ``train.resume = 'auto'`` out_dir's latest is checked even when a callback names the checkpoint), or
            ``train.resume = 'never'`` while ``out_dir`` already holds checkpoints (they would be mixed with the
            new run's and pruned by step number).
    """
    cfg = run_config.train
    override = callbacks.resume_from()
    root = ckpt.checkpoints_dir(cfg.out_dir)
    if override:
        if cfg.resume == "auto":  # a damaged latest checkpoint in out_dir is refused, not passed over for the
            ckpt.latest_checkpoint(root)  # override (Ray's copy of an earlier one)
        return ckpt.find_checkpoint(override)
    if cfg.resume == "never":
        existing = ckpt.step_dirs(root)
        if existing:
            raise CheckpointError(f"train.resume = 'never' but {root!r} already holds checkpoints (latest "
                                  f"{os.path.basename(existing[-1][1])}); use a new train.out_dir, delete them, "
                                  "or resume with train.resume=auto")
        return None
    if cfg.resume == "auto":
        return ckpt.latest_checkpoint(root)
    return ckpt.find_checkpoint(cfg.resume)


def _checked_resume(path: str, run_config: RunConfig, data: RankData) -> tuple[dict, dict]:
    state = ckpt.load_training_state(path)
    saved = ckpt.load_run_config(path)
    ckpt.check_compatible(path, saved, run_config, saved_data=state.get("data", {}).get("fingerprint"),
                          current_data=data.fingerprint())
    return state, state.get("world", {})


# -- the run ---------------------------------------------------------------------------------------------------


def _device_for(run_config: RunConfig) -> torch.device:
    device = resolve_device(run_config.train.device)
    if device.type == "cuda" and device.index is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            index = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
        else:
            index = torch.cuda.current_device()
        device = torch.device("cuda", index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@ckpt.releases_run_lock  # rank 0 takes out_dir's lock below; released however the run ends
def run_training(config: RunConfig, *, callbacks: Optional[TrainCallbacks] = None) -> dict:
    """Train as ``config`` says on this rank of the (initialised, or single-process) world; see the module doc.

    Args:
        config: the whole run; ``parallel.dp · parallel.sp`` must equal the world size.
        callbacks: hooks (:class:`TrainCallbacks`); default none.

    Returns:
        The final metrics, equal on every rank: ``step``, ``loss`` (the last step's), ``eval_loss``,
        ``eval_accuracy``, ``tokens_per_s`` (this session), ``tokens_seen``, ``elapsed_s`` (all sessions),
        ``peak_memory_bytes``, ``num_params``, ``checkpoint`` (the last checkpoint folder), ``final_model``
        (``out_dir/checkpoint`` once ``steps`` are done, else ``None``), ``resumed_from``, ``stopped_early``.

    Raises:
        ConfigError: the config cannot run (naming the field). CheckpointError: the checkpoint to resume from is
            corrupt or does not fit (naming its path). FloatingPointError: the loss stopped being finite.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"run_training: config must be a RunConfig, got {type(config).__name__}")
    callbacks = callbacks or TrainCallbacks()
    cfg = config.train
    check_run(config)
    mesh = build_mesh(config.parallel)
    rank = dist.get_rank() if mesh.distributed else 0
    device = _device_for(config)
    use_bf16 = cfg.dtype == "bfloat16" and device.type == "cuda"
    autocast = autocast_for(cfg.dtype, device)
    data = RankData(config, mesh)

    def score() -> dict:
        """The evaluation (:func:`mcdist.evaluation.evaluate_model`) at seq_len, plus ``eval_loss_at`` /
        ``eval_accuracy_at`` {length: value} for the ``eval_seq_lens``."""
        first, *others = evaluate_model(model, config, mesh=mesh, device=device,
                                        seq_lens=[cfg.seq_len, *cfg.eval_seq_lens])
        result = {key: first[key] for key in ("eval_loss", "eval_accuracy", "labelled")}
        if others:
            result["eval_loss_at"] = {str(other["seq_len"]): other["eval_loss"] for other in others}
            result["eval_accuracy_at"] = {str(other["seq_len"]): other["eval_accuracy"] for other in others}
        return result

    parallel = build_model(config, mesh, device)
    model = parallel.model
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg, mesh, device)

    # resume: every rank reads the same verified files (they hold the full weights and optimizer state, so any
    # dp × sp layout, sharded or not, may resume: each rank takes its own part)
    start_step, elapsed_before, tokens_seen, last_loss, evaluation, saved_world = 0, 0.0, 0, math.nan, {}, {}
    resume_path, resume_error, run_id = None, None, None
    try:
        if rank == 0:  # one run per out_dir (docs/reliability.md)
            ckpt.acquire_run_lock(cfg.out_dir)
        resume_path = resolve_resume(config, callbacks)
        run_id = ckpt.resumed_run_id(resume_path)
        if resume_path is not None:
            ckpt.check_resume_target(cfg.out_dir, resume_path)
            state, saved_world = _checked_resume(resume_path, config, data)
            parallel.load_model_state_dict(_saved_weights(resume_path))
            state = {**state, "optimizer": parallel.local_optimizer_state(optimizer, state["optimizer"])}
            ckpt.restore_training_state(resume_path, state, optimizer)
            start_step = int(state["step"])
            progress = state.get("progress", {})
            elapsed_before = float(progress.get("elapsed_s", 0.0))
            tokens_seen = int(progress.get("tokens_seen", 0))
            last_loss = float(progress.get("loss", math.nan))
            evaluation = dict(progress.get("eval", {}))
        elif cfg.init_from:  # a fresh run from saved weights (every rank reads them, as it would a checkpoint)
            parallel.load_model_state_dict(_saved_weights(cfg.init_from))
    except Exception as error:  # whatever it is, every rank learns of it at the agreement below
        resume_error = error
    # every rank must resume from the same step: out_dir on a file system one node alone sees would split them
    agreement = _all_reduce(torch.tensor([float(resume_error is not None), start_step, -start_step],
                                         dtype=torch.float64, device=device), dist.ReduceOp.MAX)
    if resume_error is not None:
        raise resume_error
    if agreement[0] > 0:
        raise CheckpointError(f"{PEER_ERROR_PREFIX} could not resume (its error names the checkpoint); this rank "
                              f"{'resumed from ' + resume_path if resume_path else 'found no checkpoint'}")
    if int(agreement[1]) != -int(agreement[2]):
        raise CheckpointError(f"ranks disagree on the step to resume from (between {-int(agreement[2])} and "
                              f"{int(agreement[1])}; this rank: {start_step} from {resume_path}); train.out_dir must "
                              "be on a file system that every rank sees, with the same checkpoints")

    reporter = _Reporter(config, rank=rank, start_step=start_step, callbacks=callbacks)
    world = f"dp {mesh.dp} × sp {mesh.sp}" + (f" ({config.parallel.layout})" if mesh.sp > 1 else "")
    reporter.say(f"train: {config.model.memory}/{config.model.aggregation}, {num_params:,} parameters, task "
                 f"{cfg.task}, {cfg.steps} steps of {cfg.grad_accum}×{cfg.batch_size}×{cfg.seq_len} tokens, "
                 f"{world} on {device} -> {cfg.out_dir}")
    if cfg.dtype == "bfloat16" and not use_bf16:
        reporter.say("train: dtype bfloat16 runs as float32 on the CPU (autocast to bfloat16 is used on GPUs)")
    if resume_path is None and cfg.init_from:
        reporter.say(f"train: weights from {cfg.init_from} (a fresh run: step 0, new optimizer state and schedule)")
    if resume_path is not None:
        layout = {key: saved_world.get(key) for key in ("dp", "sp", "layout")}
        changed = layout != {"dp": mesh.dp, "sp": mesh.sp, "layout": config.parallel.layout}
        reporter.say(f"train: resumed from {resume_path} at step {start_step}"
                     + (f" (saved under dp {layout['dp']} × sp {layout['sp']} {layout['layout']}; checkpoints hold "
                        "the full weights and optimizer state, split here as this layout needs)" if changed
                       else ""))

    root = ckpt.checkpoints_dir(cfg.out_dir)
    tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) \
        if mesh.distributed and dist.get_world_size() > 1 else 0
    bytes_per_value = 8 if cfg.dtype == "float64" else 4
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    last_checkpoint = resume_path
    last_saved_step = start_step if resume_path is not None else -1
    session_start = time.perf_counter()

    def save(step: int, metrics: dict) -> str:
        nonlocal last_checkpoint, last_saved_step

        weights = parallel.model_to_save()  # under FSDP: gathered on rank 0 (collective)
        optimizer_state = parallel.optimizer_state_dict(optimizer)  # sharded (FSDP, ZeRO): gathered on rank 0

        def write() -> None:
            state = {"format_version": ckpt.STATE_FORMAT_VERSION, "step": step,
                     "optimizer": optimizer_state, "rng": ckpt.rng_state(),
                     "data": {"task": cfg.task, "samples_per_step": cfg.grad_accum * cfg.batch_size,
                              "next_sample": step * cfg.grad_accum * cfg.batch_size,
                              "fingerprint": data.fingerprint()},
                     "world": {"dp": mesh.dp, "sp": mesh.sp, "layout": config.parallel.layout,
                               "world_size": mesh.dp * mesh.sp},
                     "progress": {"elapsed_s": elapsed_before + (time.perf_counter() - session_start),
                                  "tokens_seen": tokens_seen, "loss": last_loss, "eval": evaluation}}
            ckpt.save_training_checkpoint(root, step, model=weights, run_config=config, state=state,
                                          keep_last=cfg.keep_last, run_id=run_id)

        _on_rank_0(rank, device, write, f"rank 0 failed to save the checkpoint of step {step} under {root}")
        path = os.path.join(root, ckpt.step_dir_name(step))  # what save_training_checkpoint renamed into place
        last_checkpoint, last_saved_step = path, step
        reporter.checkpoint(step, path, metrics)
        return path

    train_time, window_time, window_tokens, window_loss, window_steps = 0.0, 0.0, 0, 0.0, 0
    stopped_early = False
    done = start_step
    last_metrics: dict = {}
    for comm in getattr(model, "sp_groups", []):
        comm.stats.reset()
    try:
        for step in range(start_step, cfg.steps):
            step_start = time.perf_counter()
            lr = learning_rate_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                  min_lr_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [data.train_batch(step, micro) for micro in range(cfg.grad_accum)]
            labelled = sum(data.labelled(labels) for _, labels in batches)
            count = _all_reduce(torch.tensor([float(labelled)], dtype=torch.float64, device=device))
            if float(count[0]) == 0:
                raise ValueError(f"step {step + 1} has no labelled token on any rank; expected at least one")
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro, (input_ids, labels) in enumerate(batches):
                documents = data.train_documents(step, micro)  # packed: the rows end to end, cut at documents
                if documents is not None:
                    input_ids, labels = input_ids.reshape(1, -1), labels.reshape(1, -1)
                input_ids, labels = input_ids.to(device), labels.to(device)
                with parallel.gradient_sync(micro == len(batches) - 1):  # summed over every rank at the last one
                    with autocast():
                        options = {} if documents is None else {"cu_seqlens": documents}
                        total = parallel.loss_sum(input_ids, labels, chunk_tokens=cfg.loss_chunk,
                                                  impl=cfg.impl, **options)  # Σ CE, float32 or wider
                    (total / count[0].to(total.dtype)).backward()
                loss_sum += total.detach().double()
            stop = callbacks.should_stop(step + 1)
            reduced = _all_reduce(torch.stack([loss_sum, torch.tensor(float(stop), dtype=torch.float64,
                                                                       device=device)]))
            loss = float(reduced[0] / count[0])
            stop = float(reduced[1]) > 0
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step + 1}; expected a finite loss "
                                         f"(try a lower train.lr than {cfg.lr})")
            grad_norm = parallel.clip_grad_norm_(clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            last_loss = loss
            tokens_seen += tokens_per_step
            seconds = time.perf_counter() - step_start
            train_time += seconds
            window_time += seconds
            window_tokens += tokens_per_step
            window_loss += loss
            window_steps += 1
            reporter.advance(f"loss {loss:.4f} lr {lr:.2e}")
            is_last = done == cfg.steps or stop
            if done % cfg.log_every == 0 or is_last:
                largest = _all_reduce(torch.tensor([_peak_memory_bytes(device), _optimizer_state_bytes(optimizer)],
                                                   dtype=torch.float64, device=device), dist.ReduceOp.MAX)  # any rank
                entry = {"kind": "train", "step": done, "loss": window_loss / window_steps, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(window_time, 1e-9),
                         "tokens_seen": tokens_seen, "elapsed_s": elapsed_before + time.perf_counter() - session_start,
                         "peak_memory_bytes": int(largest[0]), "optimizer_state_bytes": int(largest[1]),
                         "comm_bytes_per_step": _communication(model, config, data, window_steps, grad_bytes,
                                                               bytes_per_value)}
                reporter.record(entry)
                last_metrics = entry
                if not (reporter.progress and reporter.bar is not None):
                    reporter.say(f"step {done:>6}/{cfg.steps}  loss {entry['loss']:.4f}  lr {lr:.2e}  gnorm "
                                 f"{grad_norm:.3f}  {entry['tokens_per_s']:,.0f} tok/s")
                window_time, window_tokens, window_loss, window_steps = 0.0, 0, 0.0, 0
            if done % cfg.eval_every == 0 or is_last:
                evaluation = score()
                entry = {"kind": "eval", "step": done, **evaluation,
                         "elapsed_s": elapsed_before + time.perf_counter() - session_start}
                reporter.record(entry)
                last_metrics = {**last_metrics, **evaluation}
                reporter.say(f"eval {done:>6}/{cfg.steps}  accuracy {evaluation['eval_accuracy']:.4f}  "
                             f"loss {evaluation['eval_loss']:.4f}" + "".join(
                                 f"  | L {length}: accuracy {evaluation['eval_accuracy_at'][length]:.4f} loss "
                                 f"{evaluation['eval_loss_at'][length]:.4f}"
                                 for length in evaluation.get("eval_loss_at", {})))
                for comm in getattr(model, "sp_groups", []):
                    comm.stats.reset()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or is_last:
                save(done, {"step": done, "loss": last_loss, **evaluation})
            if stop and done < cfg.steps:
                stopped_early = True
                reporter.say(f"train: stopped after step {done} (checkpoint {last_checkpoint})")
                break

        if not evaluation or done == start_step:  # nothing trained this session: score what was loaded
            evaluation = score()
        if last_saved_step != done:
            save(done, {"step": done, "loss": last_loss, **evaluation})
        final_model = None
        if done >= cfg.steps:
            final_model = os.path.join(cfg.out_dir, FINAL_MODEL_DIR)
            _on_rank_0(rank, device, lambda: ckpt.export_checkpoint(last_checkpoint, final_model, verify=False),
                       f"rank 0 failed to write the final weights to {final_model}")
    finally:
        reporter.close()

    result = {"step": done, "loss": last_loss, **evaluation,
              "elapsed_s": elapsed_before + time.perf_counter() - session_start,
              "tokens_per_s": (done - start_step) * tokens_per_step / max(train_time, 1e-9),
              "tokens_seen": tokens_seen, "peak_memory_bytes": last_metrics.get("peak_memory_bytes",
                                                                                _peak_memory_bytes(device)),
              "num_params": num_params, "checkpoint": last_checkpoint, "final_model": final_model,
              "resumed_from": resume_path, "stopped_early": stopped_early}
    if mesh.distributed and dist.get_world_size() > 1:  # identical on every rank: rank 0's
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    return result


def _communication(model, run_config: RunConfig, data: RankData, steps: int, grad_bytes: int,
                   bytes_per_value: int) -> dict:
    """Bytes per optimizer step on this rank since the last report: the SP layers' traffic (by direction, and
    the budget of the forward reads, docs/distributed.md §5) and the gradient all-reduce payload; resets the SP
    counters."""
    rows = communication_report(model, run_config.model, run_config.train.seq_len, run_config.parallel.layout,
                                batch=data.local_batch, bytes_per_value=bytes_per_value)
    received = sum(sum(row["received"].values()) for row in rows)
    sent = sum(sum(row["sent"].values()) for row in rows)
    spec = sum(row["spec_7_5"] for row in rows) * run_config.train.grad_accum
    for comm in getattr(model, "sp_groups", []):
        comm.stats.reset()
    steps = max(steps, 1)
    return {"sp_received": received // steps, "sp_sent": sent // steps, "sp_spec_7_5": spec,
            "grad_allreduce": grad_bytes}


# -- launchers ------------------------------------------------------------------------------------------------


def train_rank(rank: int, world_size: int, device: str, where: str, config_data: dict,
               callbacks: Optional[TrainCallbacks]) -> dict:
    """One rank of :func:`run_training` (a :mod:`mcdist.runners` rank function; the trainer picks its device from
    ``train.device``)."""
    return run_training(RunConfig.from_dict(config_data), callbacks=callbacks)


def launch_local(config: RunConfig, nprocs: Optional[int] = None, *, callbacks: Optional[TrainCallbacks] = None,
                 timeout_s: Optional[float] = None) -> dict:
    """Run :func:`run_training` on ``dp · sp`` local processes (in this process when that is 1), through
    :func:`mcdist.runners.spawned.run_spawned`: a rank's error is raised here as its own type.

    Args:
        config: the run.
        nprocs: must equal ``parallel.dp · parallel.sp`` when given.
        callbacks: passed (pickled) to every process; define the class at module level.
        timeout_s: wall-clock limit of the whole run (every process is terminated past it); default none.

    Returns:
        Rank 0's result of :func:`run_training`.
    """
    world = config.parallel.world_size
    if nprocs is not None and nprocs != world:
        raise ConfigError(f"--nprocs = {nprocs} does not equal parallel.dp · parallel.sp = {config.parallel.dp} · "
                          f"{config.parallel.sp} = {world}; expected them equal")
    if world == 1:
        return run_training(config, callbacks=callbacks)
    check_run(config)  # fail here, once, rather than in every process
    device = resolve_device(config.train.device)  # a CUDA device that is not there: refused here, naming why
    backend = config.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise ConfigError(f"parallel.backend = 'nccl' but this torch ({torch.__version__}) has no NCCL; expected "
                          "gloo or auto, or a CUDA build of torch")
    return run_spawned(train_rank, world, config.to_dict(), callbacks, what="training", timeout_s=timeout_s,
                       backend=backend, collective_timeout_s=config.parallel.timeout_s,
                       threads_per_rank=max(1, (os.cpu_count() or 1) // world))


def train_under_torchrun(config: RunConfig, *, callbacks: Optional[TrainCallbacks] = None) -> dict:
    """Run :func:`run_training` as this process's rank of a torchrun job (it set RANK, WORLD_SIZE, MASTER_*),
    through :func:`mcdist.runners.torchrun.run_under_torchrun`; every rank returns rank 0's result."""
    return run_under_torchrun(train_rank, config.to_dict(), callbacks, what="training",
                              backend=config.parallel.backend, timeout_s=config.parallel.timeout_s)
