"""A small single-process trainer on MQAR: AdamW, linear warmup then cosine decay, gradient clipping, seeded.

The run writes into ``train.out_dir``:

* ``run_config.json``: the whole :class:`~mcdist.config.RunConfig`, written before the first step,
* ``metrics.jsonl``: one JSON object a line; ``{"kind": "train", ...}`` every ``log_every`` steps and
  ``{"kind": "eval", ...}`` every ``eval_every`` steps and after the last step,
* ``checkpoint/``: the final model (:func:`mcdist.checkpoint.save_model`).

Choices this module makes:

* Training batches come from a generator seeded with ``train.seed``; evaluation uses the same
  ``eval_batches`` batches every time, from a generator seeded with ``train.seed + EVAL_SEED_OFFSET``, so the
  numbers of one run are comparable step to step and never scored on training batches.
* Weight decay applies to parameters with two or more dimensions (matrices, embeddings), not to norms' gains
  or biases. AdamW betas are (0.9, 0.95).
* The learning rate rises linearly over ``warmup_steps`` to ``train.lr``, then follows a cosine to
  ``train.min_lr_ratio * train.lr`` at the last step.
* ``train.dtype`` float32 / float64 set the parameters' dtype; bfloat16 keeps float32 parameters and runs the
  forward under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from mcdist.checkpoint import save_model
from mcdist.config import ConfigError, ModelConfig, RunConfig
from mcdist.data.mqar import IGNORE_INDEX, NUM_SPECIAL, make_mqar_batch, mqar_min_seq_len

EVAL_SEED_OFFSET = 1_000_003
MIN_LR_RATIO = 0.1
ADAM_BETAS = (0.9, 0.95)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"device = {device!r} is invalid; expected auto, cpu, cuda or cuda:N") from error


def learning_rate_at(step: int, *, lr: float, warmup_steps: int, total_steps: int,
                     min_lr_ratio: float = MIN_LR_RATIO) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio·lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def check_task(run_config: RunConfig) -> None:
    """Refuse, naming the fields, a run whose MQAR task cannot be drawn or whose layout needs several processes."""
    train, model, parallel = run_config.train, run_config.model, run_config.parallel
    if parallel.world_size != 1:
        raise ConfigError(f"parallel.dp = {parallel.dp}, parallel.sp = {parallel.sp}: the single-process trainer "
                          "runs one process; expected dp = sp = 1")
    if train.seq_len < mqar_min_seq_len(train.num_kv_pairs):
        raise ConfigError(f"train.seq_len = {train.seq_len} is too short for train.num_kv_pairs = "
                          f"{train.num_kv_pairs}; expected at least {mqar_min_seq_len(train.num_kv_pairs)}")
    if (model.vocab_size - NUM_SPECIAL) // 2 < train.num_kv_pairs:
        raise ConfigError(f"model.vocab_size = {model.vocab_size} is too small for train.num_kv_pairs = "
                          f"{train.num_kv_pairs}; expected at least {NUM_SPECIAL + 2 * train.num_kv_pairs}")


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss_and_logits(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor):
    output = model(input_ids, labels=labels)
    logits = output.logits  # [B, T, V]
    loss = output.loss
    if loss is None:
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, logits


@torch.no_grad()
def evaluate_mqar(
    model: torch.nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    num_batches: int,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Mean loss and accuracy of ``model`` on ``num_batches`` MQAR batches drawn from ``seed``.

    Returns:
        ``{"eval_loss": float, "eval_accuracy": float}``; accuracy counts every labelled position of every batch.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total_loss, correct, count = 0.0, 0, 0
    try:
        for _ in range(num_batches):
            input_ids, labels = make_mqar_batch(batch_size, seq_len, num_kv_pairs, vocab_size, generator)
            input_ids, labels = input_ids.to(device), labels.to(device)
            with _autocast(device, dtype):
                loss, logits = _loss_and_logits(model, input_ids, labels)
            mask = labels != IGNORE_INDEX  # [B, T]
            correct += int((logits.argmax(dim=-1)[mask] == labels[mask]).sum())
            count += int(mask.sum())
            total_loss += float(loss)
    finally:
        model.train(was_training)
    return {"eval_loss": total_loss / num_batches, "eval_accuracy": correct / max(count, 1)}


def _default_factory(config: ModelConfig) -> torch.nn.Module:
    from mcdist.model import MCLanguageModel

    return MCLanguageModel(config)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    run_config: RunConfig,
    *,
    model_factory: Callable[[ModelConfig], torch.nn.Module] | None = None,
    device: str | torch.device | None = None,
    save_checkpoint: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Train a model on MQAR as ``run_config`` says and return the final metrics.

    Args:
        run_config: the whole run; ``parallel`` must be a single process.
        model_factory: builds the model from ``run_config.model``; default ``mcdist.model.MCLanguageModel``.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ...
        save_checkpoint: write the final model to ``<out_dir>/checkpoint``.
        log: receives one compact line per log/eval event; ``None`` is silent.

    Returns:
        ``{"step", "loss", "eval_loss", "eval_accuracy", "elapsed_s", "tokens_per_s", "num_params",
        "checkpoint"}`` (``checkpoint`` is the folder, or ``None``).
    """
    check_task(run_config)
    cfg, model_cfg = run_config.train, run_config.model
    device = resolve_device(device)
    say = log or (lambda line: None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    run_config.save(os.path.join(cfg.out_dir, "run_config.json"))

    torch.manual_seed(cfg.seed)
    model = (model_factory or _default_factory)(model_cfg)
    if cfg.dtype == "float64":
        model.to(torch.float64)
    model.to(device)
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS,
                                  foreach=device.type == "cuda")
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_kwargs = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs,
                       vocab_size=model_cfg.vocab_size, num_batches=cfg.eval_batches,
                       seed=cfg.seed + EVAL_SEED_OFFSET, device=device, dtype=cfg.dtype)
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    say(f"train: {model_cfg.memory}/{model_cfg.aggregation}, {num_params:,} parameters, {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens on {device} -> {cfg.out_dir}")

    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    start = time.perf_counter()
    window_start, window_tokens, window_loss, window_steps = start, 0, 0.0, 0
    last_loss = float("nan")
    evaluation: dict = {}
    with open(metrics_path, "w", encoding="utf-8") as metrics_file:

        def record(entry: dict) -> None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

        for step in range(cfg.steps):
            lr = learning_rate_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                                  min_lr_ratio=cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            input_ids, labels = make_mqar_batch(cfg.batch_size, cfg.seq_len, cfg.num_kv_pairs,
                                                model_cfg.vocab_size, generator)
            input_ids, labels = input_ids.to(device), labels.to(device)  # [B, T] each
            with _autocast(device, cfg.dtype):
                loss, _ = _loss_and_logits(model, input_ids, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {float(loss)} at step {step + 1}; expected a "
                                         f"finite loss (try a lower train.lr than {cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()

            last_loss = float(loss.detach())
            window_loss += last_loss
            window_steps += 1
            window_tokens += input_ids.numel()
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                entry = {"kind": "train", "step": done, "loss": window_loss / window_steps, "lr": lr,
                         "grad_norm": grad_norm, "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                         "elapsed_s": now - start}
                record(entry)
                say(f"step {done:>5}/{cfg.steps}  loss {entry['loss']:.4f}  lr {lr:.2e}  gnorm {grad_norm:.3f}  "
                    f"{entry['tokens_per_s']:,.0f} tok/s")
                window_start, window_tokens, window_loss, window_steps = now, 0, 0.0, 0
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evaluation = evaluate_mqar(model, **eval_kwargs)
                record({"kind": "eval", "step": done, **evaluation, "elapsed_s": time.perf_counter() - start})
                say(f"eval {done:>5}/{cfg.steps}  accuracy {evaluation['eval_accuracy']:.4f}  "
                    f"loss {evaluation['eval_loss']:.4f}")

    elapsed = time.perf_counter() - start
    checkpoint_dir = None
    if save_checkpoint:
        checkpoint_dir = save_model(model, model_cfg, os.path.join(cfg.out_dir, "checkpoint"))
    return {"step": cfg.steps, "loss": last_loss, **evaluation, "elapsed_s": elapsed,
            "tokens_per_s": cfg.steps * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9),
            "num_params": num_params, "checkpoint": checkpoint_dir}
