"""Save and load a model in the Hugging Face layout: ``<dir>/model.safetensors`` + ``<dir>/config.json``, or,
for a model larger than ``max_shard_size``, shards ``<dir>/model-00001-of-0000N.safetensors`` ... with the index
``<dir>/model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: shard}}``).

``config.json`` holds the :class:`~mcdist.config.ModelConfig` fields and nothing else, so
``ModelConfig.load("<dir>/config.json")`` reads it. The safetensors header carries metadata (all strings):

* ``format`` = ``"pt"`` (the Hugging Face convention),
* ``mcdist_format_version`` (this module writes ``1`` and reads versions up to it),
* ``mcdist_version``, the package version that wrote the file,
* ``mcdist_config``, the same config as ``config.json``: a mismatch means the two files come from different
  saves and the load is refused,
* ``mcdist_aliases``, a JSON map ``{name: stored_name}`` for tensors that share storage (tied embeddings):
  safetensors refuses shared tensors, so each one is stored once and its other names point to it,
* ``mcdist_sha256``, a digest of every tensor's name, dtype, shape and bytes (of this file), checked on load,
* in shards only: ``mcdist_shard`` (``"i/N"``) and ``mcdist_save_id``, which the index repeats, so a shard left
  from another save is refused instead of mixed in.

Saving is atomic per file and ordered: every file is written under a temporary name in the target folder and
fsynced; the files of the previous save are hard-linked to backups; then the new weights (shards, then the
index) and last ``config.json`` are renamed into place, and only then are weight files of the previous layout
that the new one does not overwrite removed (the index first: while it exists it is what loads). A switch
between one file and shards, with the same config, therefore loads the old or the new weights at every moment;
a re-save with the same shard count or another config passes moments where the folder mixes two saves, which
loading refuses (save ids, the config in each header), never loads. If any step fails, the previous checkpoint
is put back from the backups; a process killed in the middle leaves the backups (``.<name>.bak-<tag>``) beside
the files, and :func:`load_model` names them when the folder does not load (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from importlib import metadata as importlib_metadata
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mcdist.config import ConfigError, ModelConfig, parse_size
from mcdist.model import MCLanguageModel

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
# Hugging Face's save_pretrained default; a model smaller than this is one file
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SHARD_PATTERN = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit its config."""


def shard_name(index: int, count: int) -> str:
    """The Hugging Face name of shard ``index`` (1-based) of ``count``: ``model-00001-of-00003.safetensors``."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def weight_files(directory: str | os.PathLike) -> list[str]:
    """The names of the weight files of the checkpoint in ``directory``: ``[model.safetensors]``, or the index
    followed by the shards it lists (``[]`` when there is neither, or the index is unreadable)."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, INDEX_NAME)):
        try:
            weight_map = _read_index(directory)[0]
        except CheckpointError:
            return []
        return [INDEX_NAME] + sorted(set(weight_map.values()))
    if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        return [WEIGHTS_NAME]
    return []


def _layout_files(directory: str) -> list[str]:
    """Every file in ``directory`` named like a weight file of either layout (what a new save replaces)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.match(name))


def _leftover_backups(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if ".bak-" in name and name.startswith("."))


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensors in state-dict order, a new shard whenever the next one would pass ``max_bytes`` (a tensor larger
    than ``max_bytes`` gets a shard of its own, as Hugging Face does)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


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


def fsync_path(path: str, directory: bool = False) -> None:
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


def _write_tensors(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    save_file(tensors, path, metadata=header)
    fsync_path(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())


def save_model(model: torch.nn.Module, config: ModelConfig, directory: str | os.PathLike, *,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
    """Write ``model``'s state dict and ``config`` to ``directory`` (created if needed), atomically.

    Args:
        model: the module to save (its ``state_dict()``: parameters and persistent buffers).
        config: the :class:`ModelConfig` that builds ``model``.
        directory: target folder; an existing checkpoint there (either layout) is replaced only once the new one
            is complete. Other files in the folder are left alone.
        max_shard_size: bytes per weight file (an int, or a string such as ``"500MB"``, ``"5GB"``, ``"2GiB"``);
            a larger model is written as shards plus ``model.safetensors.index.json``.

    Returns:
        The directory path as a string.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"save_model: config must be a ModelConfig, got {type(config).__name__}")
    max_bytes = parse_size(max_shard_size)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tensors, aliases = _split_shared(model.state_dict())
    header = {
        "format": "pt",
        "mcdist_format_version": str(FORMAT_VERSION),
        "mcdist_version": mcdist_version(),
        "mcdist_config": json.dumps(config.to_dict(), sort_keys=True),
        "mcdist_aliases": json.dumps(aliases, sort_keys=True),
    }
    plan = _plan_shards(tensors, max_bytes)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def tmp_name(name: str) -> str:
        return os.path.join(directory, f".{name}.tmp-{tag}")

    written: list[tuple[str, str]] = []  # (temporary path, final name), in rename order; config.json last
    backups: dict[str, str] = {}
    renamed: list[str] = []
    try:
        if len(plan) == 1:
            _write_tensors(tensors, tmp_name(WEIGHTS_NAME), {**header, "mcdist_sha256": _tensor_digest(tensors)})
            written.append((tmp_name(WEIGHTS_NAME), WEIGHTS_NAME))
        else:
            save_id = uuid.uuid4().hex
            weight_map = {}
            for number, names in enumerate(plan, 1):
                name = shard_name(number, len(plan))
                part = {n: tensors[n] for n in names}
                _write_tensors(part, tmp_name(name), {**header, "mcdist_sha256": _tensor_digest(part),
                                                      "mcdist_shard": f"{number}/{len(plan)}",
                                                      "mcdist_save_id": save_id})
                written.append((tmp_name(name), name))
                weight_map.update({n: name for n in names})
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                                  "format": "pt", "mcdist_format_version": str(FORMAT_VERSION),
                                  "mcdist_save_id": save_id, "mcdist_aliases": aliases},
                     "weight_map": dict(sorted(weight_map.items()))}
            _write_text(tmp_name(INDEX_NAME), json.dumps(index, indent=2) + "\n")
            written.append((tmp_name(INDEX_NAME), INDEX_NAME))
        _write_text(tmp_name(CONFIG_NAME), config.to_json() + "\n")
        written.append((tmp_name(CONFIG_NAME), CONFIG_NAME))

        new_names = {name for _, name in written}
        old_names = _layout_files(directory) + ([CONFIG_NAME] if os.path.exists(
            os.path.join(directory, CONFIG_NAME)) else [])
        for name in old_names:
            backup = os.path.join(directory, f".{name}.bak-{tag}")
            try:
                os.link(os.path.join(directory, name), backup)
                backups[name] = backup
            except OSError:  # no hard links here: the renames below are still ordered, only not undoable
                pass
        try:
            for tmp, name in written:
                os.replace(tmp, os.path.join(directory, name))
                renamed.append(name)
            # only now, weight files of the previous layout that nothing overwrote: the index first (while it is
            # there it wins over model.safetensors, so each moment loads one whole layout), then its shards
            for name in sorted(old_names, key=lambda old: old != INDEX_NAME):
                if name not in new_names:
                    os.unlink(os.path.join(directory, name))
                    renamed.append(name)
        except BaseException:
            for name in renamed:  # put the previous checkpoint back
                if name in new_names and os.path.lexists(os.path.join(directory, name)):
                    os.unlink(os.path.join(directory, name))
            for name, backup in backups.items():
                # rename() between two links of one file does nothing: the file was never replaced, keep it
                os.replace(backup, os.path.join(directory, name))
                if os.path.lexists(backup):
                    os.unlink(backup)
            backups.clear()
            raise
        fsync_path(directory, directory=True)
    finally:  # every temporary this save may have started (also one whose write failed), and the backups
        names = [WEIGHTS_NAME, INDEX_NAME, CONFIG_NAME] + [shard_name(i, len(plan)) for i in range(1, len(plan) + 1)]
        for leftover in [tmp_name(name) for name in names] + list(backups.values()):
            if os.path.lexists(leftover):
                os.unlink(leftover)
    return directory


def _default_factory(config: ModelConfig) -> torch.nn.Module:
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


def _read_index(directory: str) -> tuple[dict[str, str], dict]:
    """(weight_map, metadata) of ``<directory>/model.safetensors.index.json``, validated."""
    path = os.path.join(directory, INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable index, truncated or corrupt ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata", {}) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: corrupt index (expected {{'metadata': {{...}}, 'weight_map': "
                              "{tensor name: file name}})")
    for file_name in set(weight_map.values()):
        if os.path.basename(file_name) != file_name or file_name.startswith("."):
            raise CheckpointError(f"{path}: corrupt index (shard {file_name!r} is not a file name in the folder)")
    return weight_map, metadata


def _read_weight_file(path: str, config: ModelConfig, directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and header of one safetensors file, its version, config and digest checked."""
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({error})") from error
    version = header.get("mcdist_format_version", str(FORMAT_VERSION))
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r} is not supported; this mcdist "
                              f"({mcdist_version()}) reads versions up to {FORMAT_VERSION}")
    if "mcdist_config" in header:
        try:
            stored = json.loads(header["mcdist_config"])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: corrupt header (mcdist_config is not JSON: {error})") from error
        if stored != config.to_dict():
            raise CheckpointError(
                f"{os.path.join(directory, CONFIG_NAME)} does not match the config stored in {path}: the "
                "two files come from different saves (an interrupted or mixed copy?)")
    if "mcdist_sha256" in header and _tensor_digest(tensors) != header["mcdist_sha256"]:
        raise CheckpointError(f"{path}: tensor data is corrupt (sha256 of the stored tensors does not "
                              "match the header)")
    return tensors, header


def _read_weights(directory: str, config: ModelConfig) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors with aliases resolved, the path to name in errors) of either layout."""
    index_path = os.path.join(directory, INDEX_NAME)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(index_path):
        weight_map, metadata = _read_index(directory)
        save_id = metadata.get("mcdist_save_id")
        tensors: dict[str, torch.Tensor] = {}
        for file_name in sorted(set(weight_map.values())):
            path = os.path.join(directory, file_name)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint {directory!r} is missing shard {file_name} (listed in "
                                      f"{index_path})" + _backups_hint(directory))
            part, header = _read_weight_file(path, config, directory)
            if save_id is not None and header.get("mcdist_save_id") != save_id:
                raise CheckpointError(f"{path} belongs to another save than {index_path} (save id "
                                      f"{header.get('mcdist_save_id')!r}, the index says {save_id!r}): a mixed "
                                      "or interrupted copy" + _backups_hint(directory))
            listed = {name for name, target in weight_map.items() if target == file_name}
            if set(part) != listed:
                raise CheckpointError(f"{path} does not hold the tensors {index_path} lists for it "
                                      f"(stored: {_names_preview(set(part) - listed) or '-'} not listed; "
                                      f"listed: {_names_preview(listed - set(part)) or '-'} not stored)")
            tensors.update(part)
        aliases = metadata.get("mcdist_aliases", {})
        if not isinstance(aliases, dict):
            raise CheckpointError(f"{index_path}: corrupt index (metadata.mcdist_aliases is not a map)")
        where = index_path
    elif os.path.isfile(weights_path):
        tensors, header = _read_weight_file(weights_path, config, directory)
        try:
            aliases = json.loads(header.get("mcdist_aliases", "{}"))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{weights_path}: corrupt header (mcdist_aliases is not JSON: {error})") \
                from error
        where = weights_path
    else:
        raise CheckpointError(f"checkpoint {directory!r} has no {WEIGHTS_NAME} (expected {weights_path!r}) and no "
                              f"sharded {INDEX_NAME}" + _backups_hint(directory))
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{where}: tensor {alias!r} is stored as {target!r}, which is missing")
        tensors[alias] = tensors[target]
    return tensors, where


def _backups_hint(directory: str) -> str:
    backups = _leftover_backups(directory)
    if not backups:
        return ""
    return (f"; an interrupted save left the previous files as {', '.join(backups[:4])}"
            f"{' ...' if len(backups) > 4 else ''} (rename them back to restore it)")


def load_model(
    directory: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    model_factory: Callable[[ModelConfig], torch.nn.Module] | None = None,
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build a model from ``<directory>/config.json`` and fill it from its weights (one file or shards).

    Args:
        directory: a folder written by :func:`save_model`.
        map_location: device the returned model is moved to.
        model_factory: builds the empty model from the config; default ``mcdist.model.MCLanguageModel``.

    Returns:
        ``(model, config)``; the model is in eval mode.

    Raises:
        CheckpointError: (a ``ValueError``) naming the offending path when a file is missing, the config is
            invalid, a weights file or the index is truncated or corrupt, shards come from different saves, or
            tensor names or shapes do not fit the config.
    """
    directory = os.fspath(directory)
    config = load_config(directory)
    tensors, weights_path = _read_weights(directory, config)

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
