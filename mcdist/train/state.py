"""Training checkpoints: weights, config and the whole training state, saved atomically, resumed exactly.

Layout under ``<out_dir>/checkpoints``::

    step-000120/
        model.safetensors     the weights (mcdist.checkpoint.save_model: Hugging Face layout, sha256 in header);
                              above train.max_shard_size: model-0000i-of-0000N.safetensors + model.safetensors.index.json
        config.json           the ModelConfig
        run_config.json       the whole RunConfig of the run that saved it
        training_state.pt     optimizer state, step, RNG states, data position, world layout, progress
        COMPLETE              written last: the manifest {step, files: {name: {bytes, sha256}}}
    step-000160/
    .tmp-step-000200-...      a save in progress (or one killed mid-way): never read, removed by the next save

A save writes everything into a ``.tmp-`` folder, fsyncs it, then renames it to ``step-NNNNNN`` in one
``os.rename``: a process killed at any moment leaves either the complete new checkpoint or none, and the
previous ones untouched. After the rename the oldest checkpoints beyond ``keep_last`` are removed (renamed to
``.trash-`` first, so a half-deleted folder is never taken for a checkpoint).

The latest checkpoint is the ``step-`` folder with the highest step. It must verify (:func:`verify_checkpoint`:
COMPLETE present and every file's size and sha256 as listed); a corrupt latest checkpoint is an error naming
the path, never skipped in favour of an older one or a fresh start.

Parameters and optimizer state are replicated on every rank (data and sequence parallelism shard activations,
not weights), so rank 0 alone saves, every rank loads the same files, and a checkpoint resumes under any
dp × sp layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from typing import Optional

import numpy as np
import torch

from mcdist.checkpoint import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError, _fsync_path, mcdist_version,
                               save_model, weight_files)
from mcdist.config import ConfigError, ModelConfig, RunConfig

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
COMPLETE_NAME = "COMPLETE"
STATE_NAME = "training_state.pt"
RUN_CONFIG_NAME = "run_config.json"
STATE_FORMAT_VERSION = 1

# train fields that define which samples step n reads: a resumed run must agree on them to continue the same
# data stream (the schedule fields, steps, lr, ..., may change: the schedule is recomputed at the resumed step)
DATA_FIELDS = ("task", "seq_len", "batch_size", "grad_accum", "seed", "num_kv_pairs", "dtype")

# model fields that choose how, not what, the model computes: they may differ on resume
MODEL_RUNTIME_FIELDS = {"impl"}

_STEP_NAME = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str | os.PathLike) -> str:
    """``<out_dir>/checkpoints``."""
    return os.path.join(os.fspath(out_dir), CHECKPOINTS_DIR)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def step_dirs(root: str | os.PathLike) -> list[tuple[int, str]]:
    """Every ``step-N`` folder under ``root`` as ``(N, path)``, by step; complete or not."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_NAME.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check that ``path`` is a complete, intact training checkpoint; return its manifest.

    Raises:
        CheckpointError: naming ``path`` and what is wrong (no COMPLETE marker, a missing file, a size or
            sha256 that differs from the manifest).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    marker = os.path.join(path, COMPLETE_NAME)
    if not os.path.isfile(marker):
        raise CheckpointError(f"checkpoint {path!r} is incomplete (no {COMPLETE_NAME} marker): it was not "
                              "written by a finished save; delete it or resume from another checkpoint")
    try:
        with open(marker, encoding="utf-8") as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        step = manifest["step"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{marker}: corrupt manifest ({error})") from error
    if not isinstance(step, int) or not isinstance(files, dict):
        raise CheckpointError(f"{marker}: corrupt manifest (expected an integer step and a files map)")
    for name in (CONFIG_NAME, RUN_CONFIG_NAME, STATE_NAME):
        if name not in files:
            raise CheckpointError(f"{marker}: the manifest does not list {name}")
    if WEIGHTS_NAME not in files and INDEX_NAME not in files:
        raise CheckpointError(f"{marker}: the manifest lists neither {WEIGHTS_NAME} nor a sharded {INDEX_NAME}")
    for name, expected in files.items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"checkpoint {path!r} is missing {name}")
        size = os.path.getsize(file_path)
        if size != expected.get("bytes"):
            raise CheckpointError(f"{file_path} is corrupt: {size} bytes, the manifest says {expected.get('bytes')}")
        if _sha256(file_path) != expected.get("sha256"):
            raise CheckpointError(f"{file_path} is corrupt: its sha256 differs from the one in {marker}")
    return manifest


def latest_checkpoint(root: str | os.PathLike) -> Optional[str]:
    """The verified checkpoint with the highest step under ``root``, or ``None`` when there is none.

    Raises:
        CheckpointError: when the highest one is incomplete or corrupt (naming it): the run must not silently
            restart from an older state or from scratch.
    """
    found = step_dirs(root)
    if not found:
        return None
    path = found[-1][1]
    verify_checkpoint(path)
    return path


def find_checkpoint(spec: str | os.PathLike) -> str:
    """A checkpoint folder from ``spec``: a ``step-N`` folder, a ``checkpoints`` folder or a run's ``out_dir``.

    Raises:
        CheckpointError: when ``spec`` is none of these or the checkpoint does not verify.
    """
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise CheckpointError(f"checkpoint {spec!r} does not exist")
    if os.path.isfile(os.path.join(spec, COMPLETE_NAME)) or os.path.isfile(os.path.join(spec, STATE_NAME)) \
            or _STEP_NAME.match(os.path.basename(os.path.normpath(spec))):
        verify_checkpoint(spec)
        return spec
    for root in (spec, checkpoints_dir(spec)):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    raise CheckpointError(f"{spec!r} holds no training checkpoint (expected a step-N folder, a checkpoints folder "
                          "or a run's out_dir)")


def _write_bytes(path: str, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_training_state(path: str, state: dict) -> None:
    _write_bytes(path, lambda handle: torch.save(state, handle))


def _publish(tmp: str, final: str) -> None:
    """Make the finished ``tmp`` folder the checkpoint ``final`` in one rename (replacing one there)."""
    trash = None
    if os.path.exists(final):  # only a re-save of the same step; the rename pair keeps one of them whole
        trash = os.path.join(os.path.dirname(final), f"{TRASH_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_path(os.path.dirname(final), directory=True)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale(root: str | os.PathLike) -> list[str]:
    """Remove ``.tmp-`` (saves that never finished) and ``.trash-`` folders under ``root``; return them."""
    root = os.fspath(root)
    removed = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(os.path.join(root, name))
    return removed


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` highest-step checkpoints under ``root``; return the deleted paths."""
    if keep_last <= 0:
        raise ValueError(f"keep_last = {keep_last} is invalid; expected a positive integer")
    found = step_dirs(root)
    removed = []
    for _, path in found[:-keep_last]:
        trash = os.path.join(os.path.dirname(path), f"{TRASH_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
    return removed


def save_training_checkpoint(root: str | os.PathLike, step: int, *, model: torch.nn.Module, run_config: RunConfig,
                             state: dict, keep_last: int) -> str:
    """Write the checkpoint of ``step`` under ``root`` atomically and keep the last ``keep_last``.

    Args:
        root: the checkpoints folder (``<out_dir>/checkpoints``), created if needed.
        step: optimizer steps done; the folder is ``step-NNNNNN``.
        model: the model whose ``state_dict()`` is saved (parallelized models save the same weights).
        run_config: the run's whole config (its ``model`` section must build ``model``).
        state: the training state (optimizer, RNG, data position, ...; see :func:`training_state`).
        keep_last: how many checkpoints to keep, the newest.

    Returns:
        The path of the new checkpoint folder. On any error the temporary folder is removed and the earlier
        checkpoints are as they were.
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    remove_stale(root)
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f"{TMP_PREFIX}{step_dir_name(step)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        save_model(model, run_config.model, tmp, max_shard_size=run_config.train.max_shard_size)
        _write_training_state(os.path.join(tmp, STATE_NAME), state)
        _write_bytes(os.path.join(tmp, RUN_CONFIG_NAME), lambda handle: handle.write((run_config.to_json() + "\n")
                                                                                       .encode()))
        files = {}
        for name in sorted(os.listdir(tmp)):
            file_path = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(file_path), "sha256": _sha256(file_path)}
        manifest = {"step": step, "files": files, "format_version": STATE_FORMAT_VERSION,
                    "mcdist_version": mcdist_version()}
        _write_bytes(os.path.join(tmp, COMPLETE_NAME),
                     lambda handle: handle.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))
        _fsync_path(tmp, directory=True)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last)
    return final


# -- training state ------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states: torch CPU, every CUDA device, Python ``random``, NumPy."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"kind": kind, "keys": keys.tolist(), "position": int(position), "has_gauss": int(has_gauss),
                      "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where this process has the devices)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached"]))


def load_training_state(path: str | os.PathLike) -> dict:
    """Read ``training_state.pt`` of the checkpoint ``path`` (tensors on the CPU, no code executed)."""
    file_path = os.path.join(os.fspath(path), STATE_NAME)
    try:
        state = torch.load(file_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged pickle/zip
        raise CheckpointError(f"{file_path}: unreadable training state ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise CheckpointError(f"{file_path}: not a training state (expected a dict with step and optimizer)")
    version = state.get("format_version")
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise CheckpointError(f"{file_path}: format version {version!r} is not supported; this mcdist reads "
                              f"versions up to {STATE_FORMAT_VERSION}")
    return state


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """The RunConfig a checkpoint was saved with."""
    file_path = os.path.join(os.fspath(path), RUN_CONFIG_NAME)
    try:
        return RunConfig.load(file_path)
    except (ConfigError, FileNotFoundError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{file_path}: invalid run config ({error})") from error


def _differences(saved: dict, current: dict, section: str, names) -> list[str]:
    return [f"{section}.{name} = {saved.get(name)!r} there, {current.get(name)!r} here"
            for name in names if saved.get(name) != current.get(name)]


def model_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """``model.NAME = A there, B here`` for each model field that differs, except those that only pick kernels."""
    return _differences(saved.to_dict(), current.to_dict(), "model",
                        sorted(set(ModelConfig.__dataclass_fields__) - MODEL_RUNTIME_FIELDS))


def check_compatible(path: str, saved: RunConfig, current: RunConfig, *, saved_data: Optional[dict] = None,
                     current_data: Optional[dict] = None) -> None:
    """Refuse to resume ``current`` from the checkpoint ``path`` (saved with ``saved``) when they do not fit.

    The model section must be equal except ``impl`` (which kernels compute it: the same function; the weights
    would not fit, or would mean something else), and so must the
    train fields that define the data stream (:data:`DATA_FIELDS`) and the data file's identity (``*_data``:
    e.g. token count and vocabulary). The parallel layout (dp, sp, layout) may differ: nothing is sharded.
    """
    problems = model_differences(saved.model, current.model)
    problems += _differences(saved.train.to_dict(), current.train.to_dict(), "train", DATA_FIELDS)
    if saved_data is not None and current_data is not None and saved_data != current_data:
        problems.append(f"data {saved_data} there, {current_data} here")
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit this run: " + "; ".join(problems[:6])
            + (f"; ... ({len(problems)} differences)" if len(problems) > 6 else "")
            + ". Resume refused: use the saved settings, or a new train.out_dir for a new run")


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Fill ``model`` (any device/wrapping) from the checkpoint's ``model.safetensors``, verified."""
    from mcdist.checkpoint import load_model

    loaded, _ = load_model(path, map_location="cpu")
    target = model.state_dict()
    source = loaded.state_dict()
    with torch.no_grad():
        for name, tensor in target.items():
            tensor.copy_(source[name].to(dtype=tensor.dtype))


def export_checkpoint(source: str | os.PathLike, destination: str | os.PathLike, *,
                      dtype: Optional[torch.dtype] = None, verify: bool = True,
                      max_shard_size: Optional[int | str] = None) -> str:
    """Write the weights-only checkpoint (weights + ``config.json``) of ``source`` to ``destination``.

    Args:
        source: a training checkpoint, a ``checkpoints`` folder or a run's ``out_dir`` (:func:`find_checkpoint`).
        destination: the folder to write; an existing weights-only folder there is replaced atomically, anything
            else there is refused.
        dtype: convert floating-point weights (e.g. ``torch.bfloat16`` for inference); ``None`` keeps them (the
            files are hard-linked when possible, so no bytes are copied).
        verify: check ``source`` against its manifest first (the trainer skips it for a checkpoint it just wrote).
        max_shard_size: re-shard the weights (e.g. ``"2GB"``); ``None`` keeps the source's layout.

    Returns:
        ``destination`` as a string; ``mcdist.checkpoint.load_model(destination)`` loads it.
    """
    source = find_checkpoint(source) if verify else os.fspath(source)
    destination = os.path.abspath(os.fspath(destination))
    if os.path.exists(destination):
        extra = ({name for name in os.listdir(destination) if name != CONFIG_NAME} - set(weight_files(destination))
                 if os.path.isdir(destination) else {""})
        if extra:
            raise CheckpointError(f"export destination {destination!r} exists and is not a weights-only checkpoint "
                                  f"(it holds {sorted(extra)[:5]}); expected a new or an exported folder")
    parent = os.path.dirname(destination)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{os.path.basename(destination)}{TMP_PREFIX}{tag}")
    os.makedirs(tmp)
    try:
        if dtype is None and max_shard_size is None:
            for name in weight_files(source) + [CONFIG_NAME]:
                try:
                    os.link(os.path.join(source, name), os.path.join(tmp, name))
                except OSError:  # another file system, or no hard links: copy
                    shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        else:
            from mcdist.checkpoint import load_model

            model, config = load_model(source, map_location="cpu")
            if dtype is not None:
                model = model.to(dtype)
            save_model(model, config, tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        _fsync_path(tmp, directory=True)
        trash = None
        if os.path.exists(destination):
            trash = os.path.join(parent, f".{os.path.basename(destination)}{TRASH_PREFIX}{tag}")
            os.rename(destination, trash)
        os.rename(tmp, destination)
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
