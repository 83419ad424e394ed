"""Training checkpoints: weights, config and the whole training state, saved atomically, resumed exactly.

Layout under ``<out_dir>``::

    run.lock                  held (flock) by the run training here: its pid, host and start time
    checkpoints/
      step-000120/
        model.safetensors     the weights (mcdist.checkpoint.save_model: Hugging Face layout, sha256 in header);
                              above train.max_shard_size: model-0000i-of-0000N.safetensors
                              + model.safetensors.index.json
        config.json           the ModelConfig
        run_config.json       the whole RunConfig of the run that saved it
        training_state.pt     optimizer state, step, RNG states, data position, world layout, progress
        COMPLETE              written last: the manifest {step, run_id, files: {name: {bytes, sha256}},
                              manifest_sha256 (of the rest)}
      step-000160/
      .tmp-step-000200-...      a save in progress (or one killed mid-way): never read, removed by the next save

A save writes everything into a ``.tmp-`` folder, fsyncs it, then renames it to ``step-NNNNNN`` in one
``os.rename``: a process killed at any moment leaves either the complete new checkpoint or none, and the
previous ones untouched. A re-save of an existing step swaps the two folders in one atomic exchange where the
system has one (Linux ``renameat2``), else moves the old one to ``.replaced-step-NNNNNN-<tag>`` first, which the
next run takes back when the new one never arrived (:func:`recover_replaced`). After the rename the oldest
checkpoints beyond ``keep_last`` are removed (renamed to ``.trash-`` first, so a half-deleted folder is never
taken for a checkpoint). docs/reliability.md lists every fault this survives and how it is tested.

One run at a time trains into an ``out_dir``: it holds ``run.lock`` (:func:`acquire_run_lock`); a second run
there is refused naming the first one's pid and host; a lock left by a process that died on this host is taken
over, saying so. Every checkpoint records the ``run_id`` of the run that wrote it (a fresh start draws one, a
resume keeps the checkpoint's): a resume into an ``out_dir`` holding another run's checkpoints, or later ones
than the resume point, is refused naming both (:func:`check_resume_target`).

The latest checkpoint is the ``step-`` folder with the highest step. It must verify (:func:`verify_checkpoint`:
COMPLETE present and every file's size and sha256 as listed); a corrupt latest checkpoint is an error naming
the path, never skipped in favour of an older one or a fresh start.

Parameters and optimizer state are replicated on every rank (data and sequence parallelism shard activations,
not weights), so rank 0 alone saves, every rank loads the same files, and a checkpoint resumes under any
dp × sp layout.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from typing import Optional

import numpy as np
import torch

from mcdist.checkpoint import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, CheckpointError, fsync_path, load_model,
                               mcdist_version, save_model, weight_files)
from mcdist.config import ConfigError, ModelConfig, RunConfig

CHECKPOINTS_DIR = "checkpoints"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
REPLACED_PREFIX = ".replaced-"
LOCK_NAME = "run.lock"
COMPLETE_NAME = "COMPLETE"
STATE_NAME = "training_state.pt"
RUN_CONFIG_NAME = "run_config.json"
STATE_FORMAT_VERSION = 1

# train fields that define which samples step n reads: a resumed run must agree on them to continue the same
# data stream (the schedule fields, steps, lr, ..., may change: the schedule is recomputed at the resumed step)
DATA_FIELDS = ("task", "seq_len", "batch_size", "grad_accum", "seed", "num_kv_pairs", "dtype")

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


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's content (every key but ``manifest_sha256``, as sorted JSON): a manifest carries
    it, so a damaged manifest is refused rather than trusted."""
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def write_manifest(path: str, manifest: dict) -> None:
    """Write ``manifest`` (with its ``manifest_sha256``) as the COMPLETE marker of the checkpoint folder ``path``."""
    manifest = {**manifest, "manifest_sha256": manifest_digest(manifest)}
    _write_bytes(os.path.join(path, COMPLETE_NAME),
                 lambda handle: handle.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))


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
    if "manifest_sha256" in manifest or "run_id" in manifest:  # written with its own digest (no run_id: older)
        if manifest.get("manifest_sha256") != manifest_digest(manifest):
            raise CheckpointError(f"{marker}: corrupt manifest (its manifest_sha256 does not match its content)")
    named = _STEP_NAME.match(os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{marker}: corrupt manifest (step {step} in a folder named for step "
                              f"{int(named.group(1))})")
    for name, expected in files.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..") \
                or not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int) \
                or not isinstance(expected.get("sha256"), str):
            raise CheckpointError(f"{marker}: corrupt manifest (entry {name!r}: expected a file name of the folder "
                                  f"mapped to {{'bytes': int, 'sha256': str}}, got {expected!r:.80})")
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
        if size != expected["bytes"]:
            raise CheckpointError(f"{file_path} is corrupt: {size} bytes, {marker} says {expected['bytes']}")
        if _sha256(file_path) != expected["sha256"]:
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


def _exchange(first: str, second: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the system or
    the file system has no such call (the caller then takes the recoverable two-rename path)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # not on this file system
        return False
    raise OSError(code, os.strerror(code), second)


def replace_folder(tmp: str, final: str) -> None:
    """Make the finished folder ``tmp`` be ``final``, replacing one there, so that a process killed at any point
    leaves ``final`` whole: the old one or the new one, never neither.

    A new name is one rename. An existing ``final`` is swapped with ``tmp`` atomically where the system can
    (the old folder then sits at ``tmp`` and is removed); elsewhere it is first renamed to
    ``.replaced-<name>-<tag>`` beside it, which :func:`recover_replaced` renames back if the process dies before
    the new one is in place.
    """
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.lexists(final):
        os.rename(tmp, final)
        fsync_path(parent, directory=True)
        return
    if _exchange(tmp, final):
        fsync_path(parent, directory=True)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    backup = os.path.join(parent, f"{REPLACED_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    os.rename(final, backup)
    fsync_path(parent, directory=True)
    os.rename(tmp, final)  # a kill between the two renames: recover_replaced puts the backup back
    fsync_path(parent, directory=True)
    shutil.rmtree(backup, ignore_errors=True)


def recover_replaced(root: str | os.PathLike, only: Optional[str] = None) -> list[str]:
    """Undo replacements :func:`replace_folder` left half-done under ``root`` (the process died between its two
    renames): ``.replaced-<name>-<tag>`` is renamed back to ``<name>`` when ``<name>`` is missing, and removed
    when the new ``<name>`` made it. Says (stderr) what it restored; returns the restored paths.

    Args:
        only: restrict to the folder ``<only>`` (an export destination), default every one under ``root``.
    """
    root = os.fspath(root)
    restored = []
    if not os.path.isdir(root):
        return restored
    for entry in sorted(os.listdir(root)):
        if not entry.startswith(REPLACED_PREFIX) or "-" not in entry[len(REPLACED_PREFIX):]:
            continue
        name = entry[len(REPLACED_PREFIX):].rsplit("-", 1)[0]
        if only is not None and name != only:
            continue
        backup, target = os.path.join(root, entry), os.path.join(root, name)
        if os.path.lexists(target):
            shutil.rmtree(backup, ignore_errors=True)
            continue
        os.rename(backup, target)
        fsync_path(root, directory=True)
        print(f"mcdist: restored {target} from {backup}: a replacement of it was interrupted before the new "
              "folder was in place", file=sys.stderr, flush=True)
        restored.append(target)
    return restored


def remove_stale(root: str | os.PathLike) -> list[str]:
    """Remove ``.tmp-`` (saves that never finished) and ``.trash-`` folders under ``root``, after taking back
    any checkpoint an interrupted replacement left as ``.replaced-`` (:func:`recover_replaced`); return the
    removed paths."""
    root = os.fspath(root)
    recover_replaced(root)
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
                             state: dict, keep_last: int, run_id: Optional[str] = None) -> str:
    """Write the checkpoint of ``step`` under ``root`` atomically and keep the last ``keep_last``.

    Args:
        root: the checkpoints folder (``<out_dir>/checkpoints``), created if needed.
        step: optimizer steps done; the folder is ``step-NNNNNN``.
        model: the model whose ``state_dict()`` is saved (parallelized models save the same weights).
        run_config: the run's whole config (its ``model`` section must build ``model``).
        state: the training state (optimizer, RNG, data position, ...; see :func:`training_state`).
        keep_last: how many checkpoints to keep, the newest.
        run_id: the identity of the run (:func:`resumed_run_id`), kept in the manifest.

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
                    "mcdist_version": mcdist_version(), "run_id": run_id}
        write_manifest(tmp, manifest)
        fsync_path(tmp, directory=True)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(root, keep_last)
    return final


# -- one run per out_dir: the lock and the run identity ----------------------------------------------------------

try:
    import fcntl
except ImportError:  # not on POSIX: the lock relies on its record alone
    fcntl = None

_held_locks: dict[str, "RunLock"] = {}  # realpath(out_dir) -> the lock this process holds there


def check_out_dir(out_dir: str | os.PathLike) -> None:
    """Refuse, with one line, a ``train.out_dir`` that is (or lies under) a file rather than a folder."""
    out_dir = os.fspath(out_dir)
    if not out_dir:
        raise ConfigError("train.out_dir is empty; expected a folder for the run's outputs")
    path = os.path.abspath(out_dir)
    while True:
        if os.path.exists(path):
            if not os.path.isdir(path):
                where = "is a file" if path == os.path.abspath(out_dir) else f"lies under the file {path!r}"
                raise ConfigError(f"train.out_dir = {out_dir!r} {where}; expected a folder (new, or a run's out_dir)")
            return
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _process_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), ``None`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, start: Optional[str]) -> bool:
    """Whether ``pid`` is a live (not zombie) process of this host, and the same one (its start time) as recorded."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except (OSError, IndexError):
        pass
    current = _process_start(pid)
    return not (start and current and current != start)  # a reused pid is another process


def _describe_holder(record: dict) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')!r}, started {record.get('started', '?')}"
            + (f": {record['command']}" if record.get("command") else ""))


class RunLock:
    """The lock of one ``out_dir``, held by this process (:func:`acquire_run_lock`); ``release()`` frees it."""

    def __init__(self, out_dir: str, path: str, handle: int):
        self.out_dir, self.path, self.handle = out_dir, path, handle

    def release(self) -> None:
        """Remove ``run.lock`` (while still holding it, so no other run can have taken it) and let it go."""
        if self.handle is None:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.handle).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.handle)
        self.handle = None
        _held_locks.pop(os.path.realpath(self.out_dir), None)


def _read_record(handle: int) -> dict:
    os.lseek(handle, 0, os.SEEK_SET)
    data = b""
    while True:
        block = os.read(handle, 1 << 16)
        if not block:
            break
        data += block
    if not data.strip():
        return {}
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": True}
    return record if isinstance(record, dict) else {"unreadable": True}


def acquire_run_lock(out_dir: str | os.PathLike) -> RunLock:
    """Take the lock of ``out_dir`` (creating the folder) for the run this process trains there.

    The lock is ``<out_dir>/run.lock``: an exclusive ``flock`` (released by the kernel however the process
    ends) plus a record of the holder (pid, host, process start time, command). Checkpoint replacements an
    interrupted save left half-done are taken back once the lock is held (:func:`recover_replaced`).

    Raises:
        ConfigError: another live run holds it (naming its pid and host), its record names a process of
            another host (whose liveness this host cannot see), ``out_dir`` is a file or cannot be written.
    """
    out_dir = os.fspath(out_dir)
    check_out_dir(out_dir)
    key = os.path.realpath(out_dir)
    if key in _held_locks:
        raise ConfigError(f"train.out_dir = {out_dir!r} is in use by another training run of this process "
                          f"(pid {os.getpid()}); expected one run per out_dir")
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        os.makedirs(out_dir, exist_ok=True)
        handle = None
        for _ in range(20):  # retried only when the holder removed the file between our open and our flock
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            flocked = False
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except BlockingIOError:
                    record = _read_record(handle)
                    os.close(handle)
                    raise ConfigError(f"train.out_dir = {out_dir!r} is in use by another training run "
                                      f"({_describe_holder(record)}); wait for it to end or choose another "
                                      "train.out_dir") from None
                except OSError:  # a file system without flock: the record alone decides
                    pass
            try:
                same = os.stat(path).st_ino == os.fstat(handle).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(handle)
            handle = None
        if handle is None:
            raise ConfigError(f"train.out_dir = {out_dir!r}: could not take {path} (it kept being replaced)")
        record = _read_record(handle)
        if record:
            host, pid = record.get("host"), record.get("pid")
            if record.get("unreadable") or not isinstance(pid, int):
                alive = not flocked  # garbage from a killed write: free if the flock says so
            elif host != socket.gethostname():
                alive = True  # another host's process: this host cannot tell whether it still runs
            elif pid == os.getpid():
                alive = False  # this process, which holds no lock there any more (checked above)
            else:
                alive = _process_alive(pid, record.get("start"))
            if alive:
                os.close(handle)
                raise ConfigError(f"train.out_dir = {out_dir!r} is in use by another training run "
                                  f"({_describe_holder(record)}); wait for it to end, choose another "
                                  f"train.out_dir, or delete {path} if that run is gone")
            print(f"mcdist: took over the lock {path} of a run that is gone ({_describe_holder(record)})",
                  file=sys.stderr, flush=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(handle, 0)
        os.lseek(handle, 0, os.SEEK_SET)
        os.write(handle, (json.dumps(mine, sort_keys=True) + "\n").encode())
        os.fsync(handle)
    except OSError as error:
        raise ConfigError(f"train.out_dir = {out_dir!r} cannot be written ({type(error).__name__}: "
                          f"{error.strerror or error}); expected a writable folder") from error
    lock = RunLock(out_dir, path, handle)
    _held_locks[key] = lock
    recover_replaced(checkpoints_dir(out_dir))
    return lock


def release_run_lock(out_dir: str | os.PathLike) -> None:
    """Release this process's lock of ``out_dir``, if it holds one."""
    lock = _held_locks.get(os.path.realpath(os.fspath(out_dir)))
    if lock is not None:
        lock.release()


def releases_run_lock(train):
    """Decorator of ``train(config, ...)``: however it ends, release the run locks it took
    (:func:`acquire_run_lock`), and only those."""

    @functools.wraps(train)
    def wrapper(*args, **kwargs):
        held_before = set(_held_locks)
        try:
            return train(*args, **kwargs)
        finally:
            for key in set(_held_locks) - held_before:
                _held_locks[key].release()

    return wrapper


def new_run_id() -> str:
    """A fresh run identity: the time and 8 random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _manifest(path: str) -> dict:
    marker = os.path.join(path, COMPLETE_NAME)
    try:
        with open(marker, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{marker}: unreadable manifest ({error})") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{marker}: corrupt manifest (expected an integer step)")
    return manifest


def resumed_run_id(path: Optional[str]) -> str:
    """The identity a run continues: the checkpoint's (``path``), or a new one for a fresh start (also for a
    checkpoint saved before identities existed)."""
    if path is None:
        return new_run_id()
    return _manifest(path).get("run_id") or new_run_id()


def check_resume_target(out_dir: str | os.PathLike, resume_path: str) -> None:
    """Refuse to resume from ``resume_path`` into ``out_dir`` when ``out_dir/checkpoints`` holds checkpoints of
    another run, or later ones of the same run: they would stay the latest (a later ``resume=auto`` would
    continue them) and pruning by step would delete the new run's checkpoints. Checkpoints saved before run ids
    existed match any run (only their step is checked).

    Raises:
        CheckpointError: naming both checkpoints and their run ids.
    """
    resume_path = os.fspath(resume_path)
    resumed = _manifest(resume_path)
    for step, path in step_dirs(checkpoints_dir(out_dir)):
        if os.path.realpath(path) == os.path.realpath(resume_path):
            continue
        other = _manifest(path)
        legacy = other.get("run_id") is None or resumed.get("run_id") is None  # saved before run ids: unknown
        if not legacy and other.get("run_id") != resumed.get("run_id"):
            raise CheckpointError(
                f"train.out_dir = {os.fspath(out_dir)!r} holds checkpoints of another run ({path!r}, run "
                f"{other.get('run_id')}) than the checkpoint to resume from ({resume_path!r}, run "
                f"{resumed.get('run_id')}). Resume refused: resume into a new train.out_dir, or move those "
                "checkpoints away")
        if step > resumed["step"]:
            raise CheckpointError(
                f"train.out_dir = {os.fspath(out_dir)!r} holds {path!r}, later than the checkpoint to resume from "
                f"({resume_path!r}, step {resumed['step']}; both run {resumed.get('run_id')}). Resume refused: "
                "resume from the latest (train.resume=auto), resume into a new train.out_dir, or move the later "
                "checkpoints away")


def restore_training_state(path: str, state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state and this process's RNG states saved in the checkpoint ``path``.

    Raises:
        CheckpointError: naming ``training_state.pt`` and the cause, when either does not fit.
    """
    file_path = os.path.join(os.fspath(path), STATE_NAME)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except Exception as error:  # torch raises ValueError, KeyError, RuntimeError, ... for a state that does not fit
        raise CheckpointError(f"{file_path}: its optimizer state does not fit this run's optimizer "
                              f"({type(error).__name__}: {error})") from error
    try:
        set_rng_state(state["rng"])
    except Exception as error:
        raise CheckpointError(f"{file_path}: its RNG states cannot be restored ({type(error).__name__}: "
                              f"{error})") from error


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
    saved_cuda = state.get("cuda") or []
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda and len(saved_cuda) == devices:
        torch.cuda.set_rng_state_all(saved_cuda)
    elif saved_cuda:  # not silent: dropout-free models are unaffected, but random draws on CUDA now differ
        warnings.warn(f"the checkpoint holds the RNG states of {len(saved_cuda)} CUDA device(s), this process sees "
                      f"{devices}: the CUDA RNG states are not restored, so CUDA random draws after this resume "
                      "differ from an uninterrupted run", RuntimeWarning, stacklevel=2)
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
    """``model.NAME = A there, B here`` for each model field that differs."""
    return _differences(saved.to_dict(), current.to_dict(), "model", sorted(ModelConfig.__dataclass_fields__))


def check_compatible(path: str, saved: RunConfig, current: RunConfig, *, saved_data: Optional[dict] = None,
                     current_data: Optional[dict] = None) -> None:
    """Refuse to resume ``current`` from the checkpoint ``path`` (saved with ``saved``) when they do not fit.

    The model section must be equal (the weights would not fit, or would mean something else), and so must the
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
        destination: the folder to write; an existing weights-only folder there is replaced atomically
            (:func:`replace_folder`), anything else there (a file, a folder with other files) is refused.
        dtype: convert floating-point weights (e.g. ``torch.bfloat16`` for inference); ``None`` keeps them (the
            files are hard-linked when possible, so no bytes are copied).
        verify: check ``source`` against its manifest first (the trainer skips it for a checkpoint it just wrote).
        max_shard_size: re-shard the weights (e.g. ``"2GB"``); ``None`` keeps the source's layout.

    Returns:
        ``destination`` as a string; ``mcdist.checkpoint.load_model(destination)`` loads it.
    """
    source = find_checkpoint(source) if verify else os.fspath(source)
    destination = os.path.abspath(os.fspath(destination))
    parent = os.path.dirname(destination)
    try:
        check_out_dir(parent)
    except ConfigError:
        raise CheckpointError(f"export destination {destination!r} lies under a file; expected a folder path")
    if os.path.isdir(parent):
        recover_replaced(parent, only=os.path.basename(destination))
    if os.path.exists(destination):
        if not os.path.isdir(destination):
            raise CheckpointError(f"export destination {destination!r} is a file; expected a new or an exported "
                                  "folder")
        extra = {name for name in os.listdir(destination) if name != CONFIG_NAME} - set(weight_files(destination))
        if extra:
            raise CheckpointError(f"export destination {destination!r} exists and is not a weights-only checkpoint "
                                  f"(it holds {sorted(extra)[:5]}); expected a new or an exported folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"export destination {destination!r}: cannot create {parent!r} "
                              f"({type(error).__name__}: {error.strerror or error})") from error
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
            model, config = load_model(source, map_location="cpu")
            if dtype is not None:
                model = model.to(dtype)
            save_model(model, config, tmp, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
        fsync_path(tmp, directory=True)
        replace_folder(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination
