"""The checks a run passes before any rank starts work, so that every rank fails alike, naming the field."""

from __future__ import annotations

import importlib.util

from mcdist.checkpoint import CheckpointError, load_config
from mcdist.config import ConfigError, RunConfig
from mcdist.data.mqar import NUM_SPECIAL, mqar_min_seq_len
from mcdist.data.passkey import passkey_min_seq_len, passkey_min_vocab_size
from mcdist.data.tokens import TokenFile, TokenFileError
from mcdist.parallel.layout import check_sequence_length
from mcdist.train.state import model_differences

__all__ = ["check_run", "check_task", "length_run"]


def length_run(run_config: RunConfig, seq_len: int) -> RunConfig:
    """``run_config`` scoring sequences of ``seq_len`` tokens (evaluation only: no extra lengths, no initial
    weights to load, no TensorBoard)."""
    return run_config.replace(train=run_config.train.replace(seq_len=seq_len, eval_seq_lens=(), init_from="",
                                                             tensorboard=False))


def check_task(run_config: RunConfig) -> None:
    """Refuse, naming the fields, a task that cannot be drawn at ``train.seq_len`` with ``model.vocab_size``
    (mqar, passkey), or a token file that does not fit the model or holds less than one window."""
    train, model = run_config.train, run_config.model
    if train.task == "mqar":
        if train.seq_len < mqar_min_seq_len(train.num_kv_pairs):
            raise ConfigError(f"train.seq_len = {train.seq_len} is too short for train.num_kv_pairs = "
                              f"{train.num_kv_pairs}; expected at least {mqar_min_seq_len(train.num_kv_pairs)}")
        if (model.vocab_size - NUM_SPECIAL) // 2 < train.num_kv_pairs:
            raise ConfigError(f"model.vocab_size = {model.vocab_size} is too small for train.num_kv_pairs = "
                              f"{train.num_kv_pairs}; expected at least {NUM_SPECIAL + 2 * train.num_kv_pairs}")
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
            if train.packed and name == "data_path" and file.boundaries_source is None:
                raise ConfigError(f"train.packed = true, but train.data_path = {path!r} has no document boundaries "
                                  "(no .docs file, no eos_id); expected a token file written by `mcdist data "
                                  "prepare`")


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
    if parallel.fsdp and train.shard_optimizer:
        raise ConfigError("train.shard_optimizer = true with parallel.fsdp = true: FSDP already shards the optimizer "
                          "state over every rank; expected train.shard_optimizer = false")
    check_task(run_config)
    if train.init_from:
        try:
            saved = load_config(train.init_from)
        except CheckpointError as error:
            raise ConfigError(f"train.init_from: {error}") from error
        problems = model_differences(saved, model)
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
