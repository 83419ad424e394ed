"""The trainer: one function, :func:`run_training`, for a single process, spawned processes, torchrun and Ray.

Every rank of a ``dp × sp`` mesh calls :func:`run_training` with the same :class:`~mcdist.config.RunConfig`.
It builds the model (the MC layers sequence-parallel when ``sp > 1``), AdamW with linear warmup and a cosine
decay to ``min_lr_ratio · lr``, the rank's data, resumes from a checkpoint, trains, evaluates and saves.

What a step computes. The global batch of step ``n`` is ``grad_accum`` micro-batches of ``batch_size``
sequences; sample ``i = (n · grad_accum + micro) · batch_size + row`` is a pure function of ``(train.seed, i)``
(:class:`RankData`). Rank ``(dp_rank, sp_rank)`` takes rows ``[dp_rank · b, (dp_rank + 1) · b)``,
``b = batch_size / dp``, and of each row only its own pieces of the sequence (``shard_sequence`` semantics;
from a token file it reads nothing else). Each micro-batch adds ``Σ cross-entropy / N`` to the gradients,
``N`` = labelled tokens of the whole step on every rank, so after the gradient all-reduce (a plain sum,
``reduce_gradients``) every rank holds exactly the gradient of the mean loss over the whole step: the same as
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

import contextlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcdist.checkpoint import CheckpointError
from mcdist.config import ConfigError, ParallelConfig, RunConfig
from mcdist.data.mqar import IGNORE_INDEX, make_mqar_batch
from mcdist.data.passkey import make_passkey_batch, passkey_min_seq_len, passkey_min_vocab_size
from mcdist.data.rows import mqar_row, passkey_row
from mcdist.data.tokens import TokenFile, TokenFileError, window_for_sample
from mcdist.layer import at_least_float32
from mcdist.parallel.layout import check_sequence_length, rank_pieces, shard_sequence
from mcdist.parallel.mesh import Mesh, build_mesh
from mcdist.parallel.model import communication_report, parallelize, reduce_gradients
from mcdist.train import state as ckpt
from mcdist.train.simple import (ADAM_BETAS, EVAL_SEED_OFFSET, _param_groups, check_task, learning_rate_at,
                                 resolve_device)

TRAIN_SPLIT = 0
EVAL_SPLIT = 1
FINAL_MODEL_DIR = "checkpoint"
METRICS_NAME = "metrics.jsonl"
_MASK64 = (1 << 64) - 1
_PEER_RESUME_ERROR = "another rank could not resume"


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


# -- data ------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, split: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``split``: splitmix64 of the three, so nearby indices decorrelate."""
    value = (seed * 0x9E3779B97F4A7C15 + split * 0xD1B54A32D192ED03 + index) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & ((1 << 63) - 1)


class RankData:
    """The micro-batches one rank trains and evaluates on: its dp rows, and its sp pieces of each row.

    Args:
        run_config: the run (task, sizes, seed, parallel layout).
        mesh: this rank's place in the dp × sp mesh.
        record_reads: token files record every read (tests check that a rank reads only its slice).

    Synthetic tasks (mqar, passkey) draw each training sample from its own seed :func:`sample_seed`
    ``(seed, TRAIN_SPLIT, sample)``, and only this rank's pieces of it (:mod:`mcdist.data.rows`); evaluation draws
    ``eval_batches`` whole batches from one generator seeded with ``seed + EVAL_SEED_OFFSET`` (the batches
    ``mcdist eval`` scores). Token files: sample ``i`` reads window ``window_for_sample(i)`` (every window once
    per epoch, shuffled by the seed); evaluation reads the first windows of ``val_data_path`` in order, or, with
    no validation file, windows of the training file drawn with the evaluation seed (not held out).
    """

    def __init__(self, run_config: RunConfig, mesh: Mesh, *, record_reads: bool = False):
        cfg = run_config.train
        self.task = cfg.task
        self.config = run_config
        self.seed = cfg.seed
        self.seq_len = cfg.seq_len
        self.batch_size = cfg.batch_size
        self.grad_accum = cfg.grad_accum
        self.local_batch = cfg.batch_size // mesh.dp
        self.first_row = mesh.dp_rank * self.local_batch
        self.sp, self.sp_rank, self.layout = mesh.sp, mesh.sp_rank, run_config.parallel.layout
        self.pieces = rank_pieces(cfg.seq_len, mesh.sp, mesh.sp_rank, self.layout)
        self.train_file = self.val_file = None
        if self.task == "tokens":
            self.train_file = TokenFile(cfg.data_path, record_reads=record_reads)
            if cfg.val_data_path:
                self.val_file = TokenFile(cfg.val_data_path, record_reads=record_reads)

    @property
    def local_seq_len(self) -> int:
        return sum(length for _, length in self.pieces)

    def fingerprint(self) -> dict:
        """What identifies the data beyond the config's fields (token files: size, vocabulary, dtype)."""
        if self.train_file is None:
            return {}
        header = self.train_file.header
        return {"num_tokens": header["num_tokens"], "vocab_size": header["vocab_size"], "dtype": header["dtype"]}

    def _synthetic(self, count: int, generator: torch.Generator,
                   depth: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.config.model
        if self.task == "mqar":
            return make_mqar_batch(count, self.seq_len, self.config.train.num_kv_pairs, model.vocab_size, generator)
        return make_passkey_batch(count, self.seq_len, model.vocab_size, generator, depth=depth)

    def _shard(self, x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, self.sp, self.sp_rank, self.layout) if self.sp > 1 else x

    def _token_rows(self, file: TokenFile, samples, shuffle: bool, seed: int):
        count = file.num_windows(self.seq_len)
        rows = [file.read_window(window_for_sample(sample, count, seed, shuffle=shuffle), self.seq_len, self.pieces)
                for sample in samples]
        return torch.stack([ids for ids, _ in rows]), torch.stack([labels for _, labels in rows])

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of micro-batch ``micro`` of optimizer step ``step`` (0-based).

        Returns:
            ``(input_ids, labels)``, int64 ``[batch_size / dp, seq_len / sp]`` each (labels aligned with inputs).
        """
        first = (step * self.grad_accum + micro) * self.batch_size + self.first_row
        samples = range(first, first + self.local_batch)
        if self.train_file is not None:
            return self._token_rows(self.train_file, samples, True, self.seed)
        rows = [self._synthetic_row(sample_seed(self.seed, TRAIN_SPLIT, sample)) for sample in samples]
        return torch.stack([ids for ids, _ in rows]), torch.stack([labels for _, labels in rows])

    def _synthetic_row(self, row_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's pieces of one training row, drawn piece by piece (:mod:`mcdist.data.rows`)."""
        pieces = self.pieces if self.sp > 1 else None
        vocab = self.config.model.vocab_size
        if self.task == "mqar":
            return mqar_row(row_seed, self.seq_len, self.config.train.num_kv_pairs, vocab, pieces)
        return passkey_row(row_seed, self.seq_len, vocab, pieces)

    def eval_batches(self, num_batches: int, *, depth: Optional[float] = None,
                     seed: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of each of the ``num_batches`` evaluation batches (the same ones at every eval).

        ``depth`` (passkey only) places every passkey at that depth in [0, 1]; ``seed`` replaces the evaluation
        seed ``train.seed + EVAL_SEED_OFFSET`` (the generator of the synthetic batches, the window order of a
        training file read without a validation file)."""
        seed = self.seed + EVAL_SEED_OFFSET if seed is None else seed
        rows = slice(self.first_row, self.first_row + self.local_batch)
        if self.train_file is not None:
            file = self.val_file or self.train_file
            for index in range(num_batches):
                first = index * self.batch_size + self.first_row
                yield self._token_rows(file, range(first, first + self.local_batch), self.val_file is None, seed)
            return
        generator = torch.Generator().manual_seed(seed)
        for _ in range(num_batches):
            ids, labels = self._synthetic(self.batch_size, generator, depth)  # [B, T] each: the whole global batch
            yield self._shard(ids[rows]), self._shard(labels[rows])


# -- checks ----------------------------------------------------------------------------------------------------


def length_run(run_config: RunConfig, seq_len: int) -> RunConfig:
    """``run_config`` scoring sequences of ``seq_len`` tokens (evaluation only: no extra lengths, no initial
    weights to load, no TensorBoard)."""
    return run_config.replace(train=run_config.train.replace(seq_len=seq_len, eval_seq_lens=(), init_from="",
                                                             tensorboard=False))


def check_run(run_config: RunConfig) -> None:
    """Refuse, naming the fields, a run that cannot start (before any rank communicates, so all fail alike)."""
    train, model, parallel = run_config.train, run_config.model, run_config.parallel
    if train.batch_size % parallel.dp != 0:
        raise ConfigError(f"train.batch_size = {train.batch_size} is not divisible by parallel.dp = {parallel.dp}; "
                          "expected a multiple (batch_size is the global batch of all dp ranks)")
    if parallel.sp > 1:
        try:
            check_sequence_length(train.seq_len, parallel.sp, model.segment_len, parallel.layout)
        except ValueError as error:
            raise ConfigError(f"train.seq_len = {train.seq_len} does not fit parallel.sp = {parallel.sp}: "
                              f"{error}") from error
    if train.task == "mqar":
        check_task(run_config.replace(parallel=ParallelConfig()))
    elif train.task == "passkey":
        if train.seq_len < passkey_min_seq_len():
            raise ConfigError(f"train.seq_len = {train.seq_len} is too short for the passkey task; expected at "
                              f"least {passkey_min_seq_len()}")
        if model.vocab_size < passkey_min_vocab_size():
            raise ConfigError(f"model.vocab_size = {model.vocab_size} is too small for the passkey task; expected "
                              f"at least {passkey_min_vocab_size()}")
    else:
        for name in ("data_path", "val_data_path"):
            path = getattr(train, name)
            if not path:
                continue
            try:
                file = TokenFile(path)
            except TokenFileError as error:
                raise ConfigError(f"train.{name}: {error}") from error
            if file.vocab_size > model.vocab_size:
                raise ConfigError(f"train.{name} = {path!r} holds ids of a vocabulary of {file.vocab_size}; "
                                  f"model.vocab_size = {model.vocab_size} expected at least that")
            if file.num_windows(train.seq_len) < 1:
                raise ConfigError(f"train.{name} = {path!r} holds {file.num_tokens} tokens, fewer than "
                                  f"train.seq_len + 1 = {train.seq_len + 1}")
    if train.init_from:
        from mcdist.checkpoint import load_config

        try:
            saved = load_config(train.init_from)
        except CheckpointError as error:
            raise ConfigError(f"train.init_from: {error}") from error
        problems = ckpt.model_differences(saved, model)
        if problems:
            raise ConfigError(f"train.init_from = {train.init_from!r} holds a model that does not fit this run: "
                              + "; ".join(problems[:6]) + (f"; ... ({len(problems)} differences)"
                                                           if len(problems) > 6 else ""))
    for length in train.eval_seq_lens:  # each scored as a run of that length would be
        try:
            check_run(length_run(run_config, length))
        except ConfigError as error:
            raise ConfigError(f"train.eval_seq_lens: length {length} cannot be evaluated: {error}") from error
    if train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard = true needs the tensorboard package, which is not installed; run "
                          "`pip install tensorboard` (or install mcdist[logging]) or set train.tensorboard=false")


# -- model -----------------------------------------------------------------------------------------------------


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward instead of storing them (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(x, *, impl=None, _inner=inner):
            if not torch.is_grad_enabled():
                return _inner(x, impl=impl)
            return checkpoint(_inner, x, impl=impl, use_reentrant=False)

        block.forward = forward


def build_model(run_config: RunConfig, mesh: Mesh, device: torch.device) -> torch.nn.Module:
    """The model of ``run_config`` on ``device``, seeded, parallelized over the mesh, checkpointed if asked."""
    from mcdist.model import MCLanguageModel

    torch.manual_seed(run_config.train.seed)
    model = MCLanguageModel(run_config.model)
    if run_config.train.dtype == "float64":
        model.double()
    model.to(device)
    if mesh.distributed and dist.get_world_size() > 1:  # every rank starts from rank 0's weights
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    parallelize(model, mesh, run_config.parallel.layout)
    if run_config.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    return model


def build_optimizer(model: torch.nn.Module, cfg, mesh: Mesh, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups; with ``train.shard_optimizer`` on more than one rank, its state
    sharded over every rank of the world (``ZeroRedundancyOptimizer``: a rank steps the parameters it owns and
    broadcasts them). Gradients are already summed over the world, so every rank's update is the one unsharded
    AdamW makes, and the checkpointed state dict (consolidated on rank 0) has the same form either way."""
    groups = _param_groups(model, cfg.weight_decay)
    options = dict(lr=cfg.lr, betas=ADAM_BETAS, foreach=device.type == "cuda")
    if cfg.shard_optimizer and mesh.distributed and dist.get_world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **options)
    return torch.optim.AdamW(groups, **options)


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
    return sum(value.numel() * value.element_size() for state in local.state.values() for value in state.values()
               if torch.is_tensor(value))


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def autocast_for(run_config: RunConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """What the forward runs under: autocast to bfloat16 for ``train.dtype = bfloat16`` on a GPU, else nothing."""
    if run_config.train.dtype == "bfloat16" and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: RankData, *, num_batches: int, device: torch.device, autocast,
             edges: Optional[Sequence[int]] = None, depth: Optional[float] = None,
             seed: Optional[int] = None) -> dict:
    """Mean loss and accuracy (arg-max = label, over labelled positions) on the evaluation batches, all ranks.

    Args:
        edges: position bucket boundaries ``0 = e_0 < e_1 < ... < e_K = seq_len``: the result then also holds
            ``by_position``, one ``{"start", "end", "eval_loss", "eval_accuracy", "labelled"}`` per bucket of
            label positions ``[e_i, e_i+1)`` (global positions, whatever the sp layout).
        depth, seed: as :meth:`RankData.eval_batches`.

    Returns:
        ``{"eval_loss", "eval_accuracy", "labelled"}`` (+ ``by_position``), the same on every rank.
    """
    bounds = [0, data.seq_len] if edges is None else list(edges)
    positions = torch.cat([torch.arange(start, start + length) for start, length in data.pieces])  # [t] global
    bucket = torch.bucketize(positions, torch.tensor(bounds[1:-1], dtype=torch.int64), right=True).to(device)
    sums = torch.zeros(len(bounds) - 1, 3, dtype=torch.float64, device=device)  # per bucket: loss, correct, count
    was_training = model.training
    model.eval()
    chunk_tokens = data.config.train.loss_chunk  # logits a few positions at a time, as training makes them
    try:
        for input_ids, labels in data.eval_batches(num_batches, depth=depth, seed=seed):
            input_ids, labels = input_ids.to(device), labels.to(device)
            positions = max(1, chunk_tokens // input_ids.shape[0]) if chunk_tokens else 0
            with autocast():
                for first, logits in model.logit_chunks(input_ids, chunk_tokens=positions):  # [b, n, V]
                    part = labels[:, first:first + logits.shape[1]]
                    losses = F.cross_entropy(at_least_float32(logits).transpose(1, 2), part,
                                             ignore_index=IGNORE_INDEX, reduction="none")  # [b, n], 0 unlabelled
                    mask = part != IGNORE_INDEX  # [b, n]
                    correct = (logits.argmax(dim=-1) == part) & mask
                    for column, values in enumerate((losses, correct, mask)):
                        sums[:, column].index_add_(0, bucket[first:first + logits.shape[1]],
                                                   values.double().sum(dim=0))
    finally:
        model.train(was_training)
    _all_reduce(sums)

    def scores(row: torch.Tensor) -> dict:
        count = float(row[2])
        return {"eval_loss": float(row[0]) / max(count, 1.0), "eval_accuracy": float(row[1]) / max(count, 1.0),
                "labelled": int(count)}

    result = scores(sums.sum(dim=0))
    if edges is not None:
        result["by_position"] = [{"start": bounds[i], "end": bounds[i + 1], **scores(sums[i])}
                                 for i in range(len(bounds) - 1)]
    return result


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
    from mcdist.config import write_text_atomic

    write_text_atomic(path, "".join(kept))


# -- resume ----------------------------------------------------------------------------------------------------


def resolve_resume(run_config: RunConfig, callbacks: TrainCallbacks) -> Optional[str]:
    """The checkpoint folder to resume from, or ``None`` for a fresh start (see ``train.resume``).

    Raises:
        CheckpointError: the chosen or latest checkpoint is corrupt or incomplete (naming it), or
            ``train.resume = 'never'`` while ``out_dir`` already holds checkpoints (they would be mixed with the
            new run's and pruned by step number).
    """
    cfg = run_config.train
    override = callbacks.resume_from()
    if override:
        return ckpt.find_checkpoint(override)
    root = ckpt.checkpoints_dir(cfg.out_dir)
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
    autocast = autocast_for(config, device)

    data = RankData(config, mesh)
    other_lengths = [(length, RankData(length_run(config, length), mesh)) for length in cfg.eval_seq_lens]

    def score() -> dict:
        """The evaluation at seq_len, plus ``eval_loss_at`` / ``eval_accuracy_at`` {length: value} for the
        ``eval_seq_lens``."""
        result = evaluate(model, data, num_batches=cfg.eval_batches, device=device, autocast=autocast)
        if other_lengths:
            at = {str(length): evaluate(model, other, num_batches=cfg.eval_batches, device=device,
                                        autocast=autocast) for length, other in other_lengths}
            result["eval_loss_at"] = {length: value["eval_loss"] for length, value in at.items()}
            result["eval_accuracy_at"] = {length: value["eval_accuracy"] for length, value in at.items()}
        return result
    model = build_model(config, mesh, device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg, mesh, device)

    # resume: every rank reads the same verified files (nothing is sharded, so any dp × sp layout may resume)
    start_step, elapsed_before, tokens_seen, last_loss, evaluation, saved_world = 0, 0.0, 0, math.nan, {}, {}
    resume_path, resume_error = None, None
    try:
        resume_path = resolve_resume(config, callbacks)
        if resume_path is not None:
            state, saved_world = _checked_resume(resume_path, config, data)
            ckpt.load_model_weights(resume_path, model)
            optimizer.load_state_dict(state["optimizer"])
            ckpt.set_rng_state(state["rng"])
            start_step = int(state["step"])
            progress = state.get("progress", {})
            elapsed_before = float(progress.get("elapsed_s", 0.0))
            tokens_seen = int(progress.get("tokens_seen", 0))
            last_loss = float(progress.get("loss", math.nan))
            evaluation = dict(progress.get("eval", {}))
        elif cfg.init_from:  # a fresh run from saved weights (every rank reads them, as it would a checkpoint)
            ckpt.load_model_weights(cfg.init_from, model)
    except (CheckpointError, ConfigError, ValueError, OSError) as error:
        resume_error = error
    # every rank must resume from the same step: out_dir on a file system one node alone sees would split them
    agreement = _all_reduce(torch.tensor([float(resume_error is not None), start_step, -start_step],
                                         dtype=torch.float64, device=device), dist.ReduceOp.MAX)
    if resume_error is not None:
        raise resume_error
    if agreement[0] > 0:
        raise CheckpointError(f"{_PEER_RESUME_ERROR} (its error names the checkpoint); this rank "
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
                     + (f" (saved under dp {layout['dp']} × sp {layout['sp']} {layout['layout']}; weights and "
                        "optimizer state are replicated, nothing to reshard)" if changed else ""))

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

        def write() -> None:
            state = {"format_version": ckpt.STATE_FORMAT_VERSION, "step": step,
                     "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(),
                     "data": {"task": cfg.task, "samples_per_step": cfg.grad_accum * cfg.batch_size,
                              "next_sample": step * cfg.grad_accum * cfg.batch_size,
                              "fingerprint": data.fingerprint()},
                     "world": {"dp": mesh.dp, "sp": mesh.sp, "layout": config.parallel.layout,
                               "world_size": mesh.dp * mesh.sp},
                     "progress": {"elapsed_s": elapsed_before + (time.perf_counter() - session_start),
                                  "tokens_seen": tokens_seen, "loss": last_loss, "eval": evaluation}}
            ckpt.save_training_checkpoint(root, step, model=model, run_config=config, state=state,
                                          keep_last=cfg.keep_last)

        if hasattr(optimizer, "consolidate_state_dict"):  # sharded: gather the whole state on rank 0 (collective)
            optimizer.consolidate_state_dict(to=0)
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
            labelled = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
            count = _all_reduce(torch.tensor([float(labelled)], dtype=torch.float64, device=device))
            if float(count[0]) == 0:
                raise ValueError(f"step {step + 1} has no labelled token on any rank; expected at least one")
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for input_ids, labels in batches:
                input_ids, labels = input_ids.to(device), labels.to(device)
                with autocast():
                    total = model.loss_sum(input_ids, labels, chunk_tokens=cfg.loss_chunk)  # Σ CE, float32 or wider
                (total / count[0].to(total.dtype)).backward()
                loss_sum += total.detach().double()
            reduce_gradients(model)
            stop = callbacks.should_stop(step + 1)
            reduced = _all_reduce(torch.stack([loss_sum, torch.tensor(float(stop), dtype=torch.float64,
                                                                       device=device)]))
            loss = float(reduced[0] / count[0])
            stop = float(reduced[1]) > 0
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step + 1}; expected a finite loss "
                                         f"(try a lower train.lr than {cfg.lr})")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
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
    SPEC §7.5's figure for the forward reads) and the gradient all-reduce payload; resets the SP counters."""
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


# -- local launch ----------------------------------------------------------------------------------------------


# errors a spawned rank reports by type and message, so launch_local raises them as if it ran in-process
_LAUNCH_ERRORS = {cls.__name__: cls for cls in (ConfigError, CheckpointError, TokenFileError, FloatingPointError,
                                                ValueError, FileNotFoundError)}


def _launch_worker(rank: int, world_size: int, config_data: dict, callbacks, folder: str) -> None:
    from mcdist.config import write_text_atomic
    from mcdist.parallel.failure import guarded

    try:
        result = guarded(run_training)(RunConfig.from_dict(config_data), callbacks=callbacks)
    except Exception as error:
        write_text_atomic(os.path.join(folder, f"error-{rank}.json"),
                          json.dumps({"type": type(error).__name__, "message": str(error)}))
        raise
    if rank == 0:
        write_text_atomic(os.path.join(folder, "result.json"), json.dumps(result))


def _reraise_worker_error(folder: str, failure: BaseException) -> None:
    """Raise the first rank's own error (not a peer's report of it) as its type, when it is a known one."""
    reports = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("error-"):
            with open(os.path.join(folder, name), encoding="utf-8") as handle:
                reports.append(json.load(handle))
    own = [report for report in reports if report["type"] != "PeerFailure"] or reports
    own.sort(key=lambda report: report["message"].startswith(_PEER_RESUME_ERROR))  # the rank with the cause first
    if own and own[0]["type"] in _LAUNCH_ERRORS:
        raise _LAUNCH_ERRORS[own[0]["type"]](own[0]["message"]) from failure


def launch_local(config: RunConfig, nprocs: Optional[int] = None, *, callbacks: Optional[TrainCallbacks] = None,
                 timeout_s: Optional[float] = None) -> dict:
    """Run :func:`run_training` on ``dp · sp`` local processes (in this process when that is 1).

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
    from mcdist.parallel.spawn import spawn

    backend = config.parallel.backend
    if backend == "auto":
        backend = "nccl" if resolve_device(config.train.device).type == "cuda" else "gloo"
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory(prefix="mcdist-launch-") as folder:
        try:
            spawn(_launch_worker, world, config.to_dict(), callbacks, folder,
                  timeout_s=math.inf if timeout_s is None else timeout_s, backend=backend,
                  collective_timeout_s=config.parallel.timeout_s, threads_per_rank=threads)
        except Exception as failure:
            _reraise_worker_error(folder, failure)
            raise
        with open(os.path.join(folder, "result.json"), encoding="utf-8") as handle:
            return json.load(handle)
