"""Save and load a model in the Hugging Face layout: ``<dir>/model.safetensors`` + ``<dir>/config.json``.

``config.json`` holds the :class:`~mcdist.config.ModelConfig` fields and nothing else, so
``ModelConfig.load("<dir>/config.json")`` reads it. The safetensors header carries metadata (all strings):

* ``format`` = ``"pt"`` (the Hugging Face convention),
* ``mcdist_format_version`` (this module writes ``1`` and reads versions up to it),
* ``mcdist_version``, the package version that wrote the file,
* ``mcdist_config``, the same config as ``config.json``: a mismatch means the two files come from different
  saves and the load is refused,
* ``mcdist_aliases``, a JSON map ``{name: stored_name}`` for tensors that share storage (tied embeddings):
  safetensors refuses shared tensors, so each one is stored once and its other names point to it,
* ``mcdist_sha256``, a digest of every tensor's name, dtype, shape and bytes, checked on load.

Saving is atomic per file and ordered: both files are written under temporary names in the target folder and
fsynced, then renamed over the old ones (weights first); if the second rename fails, the old weights are put
back from a hard link taken before, so a failed save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from importlib import metadata as importlib_metadata
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mcdist.config import ConfigError, ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit its config."""


def mcdist_version() -> str:
    """The installed mcdist version, or ``"unknown"`` when the package metadata is not available."""
    try:
        return importlib_metadata.version("mcdist")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        if tensor.numel() > 0:
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once: exact aliases become ``{alias: stored_name}``; partial overlaps are copied."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())
        groups.setdefault(key, []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    copied: set[str] = set()
    for names in groups.values():
        if len(names) < 2:
            continue
        names = sorted(names)
        first = state[names[0]]
        same_view = all(state[n].storage_offset() == first.storage_offset() and state[n].shape == first.shape
                        and state[n].stride() == first.stride() and state[n].dtype == first.dtype
                        for n in names[1:])
        if same_view:
            for other in names[1:]:
                aliases[other] = names[0]
        else:
            copied.update(names)
    for name, tensor in state.items():
        if name in aliases:
            continue
        tensor = tensor.detach()
        tensors[name] = tensor.clone().contiguous() if name in copied else tensor.contiguous()
    return tensors, aliases


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        handle = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open a folder; the files themselves are synced
            return
        raise
    try:
        os.fsync(handle)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(handle)


def save_model(model: torch.nn.Module, config: ModelConfig, directory: str | os.PathLike) -> str:
    """Write ``model``'s state dict and ``config`` to ``directory`` (created if needed), atomically.

    Args:
        model: the module to save (its ``state_dict()``: parameters and persistent buffers).
        config: the :class:`ModelConfig` that builds ``model``.
        directory: target folder; an existing checkpoint there is replaced only once the new one is complete.

    Returns:
        The directory path as a string.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"save_model: config must be a ModelConfig, got {type(config).__name__}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    config_path = os.path.join(directory, CONFIG_NAME)
    config_text = config.to_json() + "\n"

    tensors, aliases = _split_shared(model.state_dict())
    header = {
        "format": "pt",
        "mcdist_format_version": str(FORMAT_VERSION),
        "mcdist_version": mcdist_version(),
        "mcdist_config": json.dumps(config.to_dict(), sort_keys=True),
        "mcdist_aliases": json.dumps(aliases, sort_keys=True),
        "mcdist_sha256": _tensor_digest(tensors),
    }

    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_weights = os.path.join(directory, f".{WEIGHTS_NAME}.tmp-{tag}")
    tmp_config = os.path.join(directory, f".{CONFIG_NAME}.tmp-{tag}")
    backup = os.path.join(directory, f".{WEIGHTS_NAME}.bak-{tag}")
    try:
        save_file(tensors, tmp_weights, metadata=header)
        _fsync_path(tmp_weights)
        with open(tmp_config, "w", encoding="utf-8") as out:
            out.write(config_text)
            out.flush()
            os.fsync(out.fileno())

        has_backup = False
        if os.path.exists(weights_path):
            try:
                os.link(weights_path, backup)
                has_backup = True
            except OSError:  # no hard links here: the rename pair below is still ordered, only not undoable
                pass
        os.replace(tmp_weights, weights_path)
        try:
            os.replace(tmp_config, config_path)
        except BaseException:
            if has_backup:
                os.replace(backup, weights_path)
                has_backup = False
            raise
        _fsync_path(directory, directory=True)
    finally:
        for leftover in (tmp_weights, tmp_config, backup):
            if os.path.lexists(leftover):
                os.unlink(leftover)
    return directory


def _default_factory(config: ModelConfig) -> torch.nn.Module:
    from mcdist.model import MCLanguageModel

    return MCLanguageModel(config)


def _names_preview(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:8])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 8 else "")


def load_config(directory: str | os.PathLike) -> ModelConfig:
    """Read ``<directory>/config.json``; raises :class:`CheckpointError` naming the path when it is unusable."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"checkpoint {directory!r} has no {CONFIG_NAME} (expected {config_path!r})")
    try:
        with open(config_path, encoding="utf-8") as handle:
            return ModelConfig.from_json(handle.read())
    except (ConfigError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{config_path}: invalid model config: {error}") from error


def load_model(
    directory: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    model_factory: Callable[[ModelConfig], torch.nn.Module] | None = None,
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build a model from ``<directory>/config.json`` and fill it from ``<directory>/model.safetensors``.

    Args:
        directory: a folder written by :func:`save_model`.
        map_location: device the returned model is moved to.
        model_factory: builds the empty model from the config; default ``mcdist.model.MCLanguageModel``.

    Returns:
        ``(model, config)``; the model is in eval mode.

    Raises:
        CheckpointError: (a ``ValueError``) naming the offending path when a file is missing, the config is
            invalid, the weights file is truncated or corrupt, or tensor names or shapes do not fit the config.
    """
    directory = os.fspath(directory)
    config = load_config(directory)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"checkpoint {directory!r} has no {WEIGHTS_NAME} (expected {weights_path!r})")

    try:
        with safe_open(weights_path, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file, truncated or corrupt ({error})") \
            from error

    version = header.get("mcdist_format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{weights_path}: format version {version!r} is not supported; this mcdist "
                              f"({mcdist_version()}) reads versions up to {FORMAT_VERSION}")
    if "mcdist_config" in header:
        try:
            stored = json.loads(header["mcdist_config"])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{weights_path}: corrupt header (mcdist_config is not JSON: {error})") from error
        if stored != config.to_dict():
            raise CheckpointError(
                f"{os.path.join(directory, CONFIG_NAME)} does not match the config stored in {weights_path}: the "
                "two files come from different saves (an interrupted or mixed copy?)")
    if "mcdist_sha256" in header and _tensor_digest(tensors) != header["mcdist_sha256"]:
        raise CheckpointError(f"{weights_path}: tensor data is corrupt (sha256 of the stored tensors does not "
                              "match the header)")
    try:
        aliases = json.loads(header.get("mcdist_aliases", "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{weights_path}: corrupt header (mcdist_aliases is not JSON: {error})") from error
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{weights_path}: tensor {alias!r} is stored as {target!r}, which is missing")
        tensors[alias] = tensors[target]

    model = (model_factory or _default_factory)(config)
    stored_float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(stored_float_dtypes) == 1:  # keep the precision it was saved in (a float64 run stays float64)
        model.to(stored_float_dtypes.pop())
    expected = model.state_dict()
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names_preview(unexpected)}")
        raise CheckpointError(f"{weights_path} does not fit its config: " + "; ".join(parts))
    wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(expected[name].shape)})"
             for name in sorted(expected) if tensors[name].shape != expected[name].shape]
    if wrong:
        raise CheckpointError(f"{weights_path}: tensor shapes do not fit its config: " + ", ".join(wrong[:8])
                              + (f", ... ({len(wrong)} in all)" if len(wrong) > 8 else ""))
    model.load_state_dict(tensors, strict=True)
    model.to(map_location)
    model.eval()
    return model, config
