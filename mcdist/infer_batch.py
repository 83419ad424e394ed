"""``mcdist infer``: a resumable batch-inference job over a prompts file (docs/inference.md, "Batch inference jobs").

The driver reads the prompts (JSON lines), checks each line against the model's vocabulary, sends the good ones
in batches to R replicas and appends every result to the output file as soon as its batch is back (one whole
line per write, flushed and fsynced). A replica is one process (P = 1) or a sequence-parallel group of P ranks
(gloo); its rank 0 pulls batches from a queue (``torch.multiprocessing`` queues on one machine, a
``ray.util.queue.Queue`` with ``--ray``) and every rank of the group runs :func:`mcdist.infer.complete`.

* **Resume**: a rerun with the same ``--out`` skips the ids the file holds; a torn last line (a crash in the
  middle of a write) is cut off and its prompt redone. ``OUT.job.json``, written (atomically) before the first
  result, names the job (checkpoint digest, prompts digest, the options that decide the results); a rerun whose
  job differs is refused.
* **Bad lines** (bad JSON, unknown fields, wrong types, ids outside the vocabulary, a duplicate id, an empty
  prompt) go to the errors file with their line number and reason; the job goes on.
* **Seeds**: each prompt samples with its own generator, seeded from the job's seed and the prompt's id
  (:func:`prompt_seed`), so a result does not depend on the replica, the batch or the order.
* **Long prompts** (at least ``sp_min_tokens`` tokens) decode over a replica's sp group, a batch at a time;
  shorter ones are shared out among the group's ranks, each decoding its share alone.
* **Lost replicas**: a replica whose process (or Ray actor) dies is dropped and the batch it held goes back to
  the queue for the others (at most :data:`MAX_ATTEMPTS` times per batch, then its prompts go to the errors file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue as queue_module
import socket
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from mcdist.checkpoint import CheckpointError, fsync_path, load_config, load_model, weight_files
from mcdist.config import write_text_atomic
from mcdist.data.prepare import decode_text, load_tokenizer
from mcdist.infer import Request, complete

__all__ = ["ALLOWED_FIELDS", "InferJobError", "InferOptions", "MAX_ATTEMPTS", "Prompt", "job_paths", "prompt_seed",
           "read_prompts", "read_results", "run_infer_job"]

JOB_FORMAT = "mcdist-infer-job/1"
ALLOWED_FIELDS = ("id", "prompt_ids", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids")
PER_LINE_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_ids")
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_ATTEMPTS = 3  # replicas a batch may be lost with before its prompts are reported as errors
POLL_S = 0.2  # how long the driver waits for a replica's message before it looks at the replicas' health
WAIT = "wait"  # what rank 0 tells its peers when no batch is queued yet (keeps the group's collectives short)
STALL_S = 5.0  # after a loss: how long nothing may be queued or in flight while prompts remain, before a requeue


class InferJobError(ValueError):
    """A user error of the job (a foreign --out, a damaged output file, a bad option): one line, exit 2."""


@dataclasses.dataclass
class InferOptions:
    """The job's defaults (a prompt line may set ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p`` and
    ``stop_ids`` for itself) and how it runs. The first six decide the results and are part of the job's identity
    (OUT.job.json); the others (how many replicas, batch sizes, kernels) may change between runs of one job."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    cache_dtype: Optional[str] = None  # 'float32', 'bfloat16', or None (the model's dtype)
    batch_size: int = 16  # requests per complete() call on one rank
    sp_min_tokens: Optional[int] = None  # prompts at least this long use the sp group; None: one sharding unit
    layout: str = "zigzag"
    impl: Optional[str] = None

    def identity(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "seed": self.seed, "cache_dtype": self.cache_dtype or "model"}

    def check(self, vocab_size: int) -> None:
        """Raise InferJobError naming a bad option."""
        reason = Request([0], self.max_new_tokens, self.temperature, self.top_k, self.top_p, [],
                         self.seed).problem(vocab_size)
        if reason is None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            reason = f"seed = {self.seed!r}; expected an integer"
        if reason:
            raise InferJobError(f"--{reason.replace('_', '-', 2)}")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise InferJobError(f"--cache-dtype = {self.cache_dtype!r}; expected float32 or bfloat16")
        for name in ("batch_size", "sp_min_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InferJobError(f"--{name.replace('_', '-')} = {value!r} is invalid; expected a positive "
                                    "integer")
        if self.layout not in ("zigzag", "contiguous"):
            raise InferJobError(f"layout = {self.layout!r}; expected zigzag or contiguous")


@dataclasses.dataclass
class Prompt:
    """One good line of the prompts file: its id (as given), ``key`` (the id as canonical JSON, what resume
    compares), its line number and the request to run."""

    id: object
    key: str
    line: int
    request: Request


def prompt_seed(job_seed: int, key: str) -> int:
    """The seed of one prompt's sampling generator: the first 63 bits of sha256("<job seed>:<id as JSON>"). The
    same on every machine and in every run, whichever replica or batch the prompt lands in."""
    digest = hashlib.sha256(f"{job_seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def job_paths(out: str, errors: Optional[str] = None) -> Tuple[str, str]:
    """(errors file, job header) beside ``out``: ``results.jsonl`` → ``results.errors.jsonl``,
    ``results.job.json``."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return errors or f"{stem}.errors.jsonl", f"{stem}.job.json"


# -- reading the prompts ---------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_line(record, number: int, *, vocab_size: int, tokenizer, options: InferOptions) -> Tuple[object, Request]:
    """(id, request) of one decoded JSON line; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with id and prompt_ids (or prompt); got {type(record).__name__}")
    unknown = [key for key in record if key not in ALLOWED_FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; expected {', '.join(ALLOWED_FIELDS)}")
    if "id" not in record:
        raise ValueError("no id; expected an \"id\" (a string or an integer)")
    identifier = record["id"]
    if not (isinstance(identifier, str) or _is_int(identifier)):
        raise ValueError(f"id = {identifier!r} is invalid; expected a string or an integer")
    if ("prompt_ids" in record) == ("prompt" in record):
        raise ValueError("expected exactly one of prompt_ids and prompt")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"prompt = {text!r} is invalid; expected a string")
        if tokenizer is None:
            raise ValueError("a text prompt needs --tokenizer (byte or a tokenizer.json); expected prompt_ids "
                             "without one")
        ids = [int(token) for token in tokenizer.encode(text)]
    else:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(_is_int(token) for token in ids):
            raise ValueError(f"prompt_ids = {_short(ids)} is invalid; expected a list of integer token ids")
    if not ids:
        raise ValueError("the prompt is empty; expected at least one token")
    fields = {name: record.get(name, getattr(options, name, None)) for name in PER_LINE_OPTIONS}
    fields["stop_ids"] = record.get("stop_ids", [])
    for name in ("max_new_tokens", "top_k"):
        if not _is_int(fields[name]):
            raise ValueError(f"{name} = {fields[name]!r} is invalid; expected an integer")
    for name in ("temperature", "top_p"):
        if not _is_number(fields[name]):
            raise ValueError(f"{name} = {fields[name]!r} is invalid; expected a number")
    stops = fields["stop_ids"]
    if not isinstance(stops, list) or not all(isinstance(stop, list) for stop in stops):
        raise ValueError(f"stop_ids = {_short(stops)} is invalid; expected a list of token id lists")
    request = Request(ids, fields["max_new_tokens"], float(fields["temperature"]), fields["top_k"],
                      float(fields["top_p"]), stops, prompt_seed(options.seed, id_key(identifier)))
    reason = request.problem(vocab_size)
    if reason:
        raise ValueError(reason)
    return identifier, request


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def read_prompts(path: str, *, vocab_size: int, tokenizer=None,
                 options: Optional[InferOptions] = None) -> Tuple[List[Prompt], List[dict], str]:
    """The good prompts of the JSON-lines file ``path``, the bad lines and the file's sha256.

    Returns:
        ``(prompts, errors, sha256)``: ``errors`` holds ``{"line": n, "id"?: ..., "reason": "..."}`` for each
        bad line (lines count from 1; blank lines are skipped). The first line with an id wins; a later line
        with the same id is an error.

    Raises:
        InferJobError: the file does not exist or cannot be read.
    """
    options = options or InferOptions()
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise InferJobError(f"prompts file {path!r} cannot be read ({error.strerror or error}); expected a JSON "
                            "lines file") from None
    prompts, errors, first_line = [], [], {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        error = {"line": number}
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise ValueError(f"not UTF-8 text (byte {bad.start} of the line: {bad.reason})") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as bad:
                raise ValueError(f"not valid JSON ({bad.msg} at column {bad.colno})") from None
            if isinstance(record, dict) and (isinstance(record.get("id"), str) or _is_int(record.get("id"))):
                error["id"] = record["id"]
            identifier, request = _parse_line(record, number, vocab_size=vocab_size, tokenizer=tokenizer,
                                              options=options)
            key = id_key(identifier)
            if key in first_line:
                raise ValueError(f"duplicate id {key} (first on line {first_line[key]})")
            first_line[key] = number
            prompts.append(Prompt(identifier, key, number, request))
        except ValueError as reason:
            errors.append({**error, "reason": str(reason)})
    return prompts, errors, hashlib.sha256(data).hexdigest()


# -- the output file, its header and the errors file ------------------------------------------------------------


def read_results(out: str, log: Callable[[str], None] = lambda line: None) -> Dict[str, dict]:
    """The results already in ``out`` by id key; a torn last line (no newline at its end: a crash mid-write) is
    cut off the file (and fsynced) so that its prompt is done again.

    Raises:
        InferJobError: a whole line that is not a result (the file is damaged or is not an mcdist infer output).
    """
    if not os.path.exists(out):
        return {}
    with open(out, "rb") as handle:
        data = handle.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        log(f"infer: removed the torn last line of {out} ({len(data) - end} bytes: a crash in the middle of a "
            "write); its prompt is done again")
    results = {}
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        try:
            record = json.loads(raw.decode("utf-8"))
            key = id_key(record["id"])
            record["new_ids"], record["finish_reason"]  # noqa: B018 (a result line has both)
        except (ValueError, KeyError, TypeError) as error:
            raise InferJobError(f"{out} line {number} is not a result line ({error}); expected the JSON lines "
                                "mcdist infer writes (a damaged file? move it away to start over)") from None
        results[key] = record
    return results


def checkpoint_digest(checkpoint: str) -> str:
    """sha256 of config.json and of each weight file's tensor digest (the ``mcdist_sha256`` its header keeps,
    cheap to read; the file's bytes when it has none)."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    with open(os.path.join(checkpoint, "config.json"), "rb") as handle:
        digest.update(handle.read())
    for name in weight_files(checkpoint):
        path = os.path.join(checkpoint, name)
        stored = None
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    stored = (handle.metadata() or {}).get("mcdist_sha256")
            except Exception:  # a damaged file: the workers' load names it; here its bytes stand for it
                stored = None
        if stored is None:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(f"{name}:{stored}".encode())
    return digest.hexdigest()


def _claim_output(out: str, header_path: str, header: dict) -> None:
    """Write the job header, or check that the one beside ``out`` names this job."""
    if os.path.isfile(header_path):
        try:
            with open(header_path, encoding="utf-8") as handle:
                stored = json.load(handle)
        except (OSError, ValueError) as error:
            raise InferJobError(f"{header_path} is unreadable ({error}); expected the header mcdist infer writes "
                                "beside its output") from None
        for key in header:
            if stored.get(key) != header[key]:
                what = {"checkpoint_sha256": "another checkpoint", "prompts_sha256": "another prompts file"}.get(
                    key, f"{key} = {json.dumps(stored.get(key))}, this run {json.dumps(header[key])}")
                raise InferJobError(f"--out {out!r} belongs to another job ({what}, says {header_path}); expected "
                                    "the same checkpoint, prompts and options to resume it, or a new --out")
        return
    if os.path.exists(out) and os.path.getsize(out) > 0:
        raise InferJobError(f"--out {out!r} exists but {header_path} does not: it was not written by mcdist infer "
                            "(or its header was removed); expected a new --out")
    write_text_atomic(header_path, json.dumps(header, indent=1, sort_keys=True) + "\n")


def _drain(results, empty, timeout: float) -> list:
    """Every event waiting on the ``results`` queue (multiprocessing's or Ray's; ``empty``: its Empty), after
    waiting up to ``timeout`` seconds for the first."""
    found = []
    try:
        found.append(results.get(timeout=timeout))
        while True:
            found.append(results.get_nowait())
    except empty:
        pass
    return found


class _LineFile:
    """Append whole lines to a file: one write per line, then fsync (a crash leaves at most a torn last line)."""

    def __init__(self, path: str):
        existed = os.path.exists(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if not existed:
            fsync_path(folder, directory=True)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        while data:
            data = data[os.write(self.handle, data):]
        os.fsync(self.handle)

    def close(self) -> None:
        os.close(self.handle)


# -- one replica: P ranks decoding batches -----------------------------------------------------------------------


class _ReplicaRank:
    """One rank of a replica: the model (and, in an sp group, a second one sharing its weights for the prompts
    that are decoded alone: :func:`complete` under sp parallelizes its model) and the batches it runs."""

    def __init__(self, model_dir: str, rank: int, size: int, device: str, options: InferOptions):
        from mcdist.model import MCLanguageModel
        from mcdist.parallel.comm import SPGroup
        import torch.distributed as dist

        self.rank, self.size, self.options = rank, size, options
        self.model, config = load_model(model_dir, map_location=device)
        self.sp = None
        self.sp_model = self.model
        if size > 1:
            self.sp = SPGroup(dist.group.WORLD, rank, size, tuple(range(size)))
            self.sp_model = MCLanguageModel(config).to(device=device, dtype=self.model.embed.weight.dtype).eval()
            self.sp_model.load_state_dict(self.model.state_dict(), assign=True)  # the same tensors, no copy
        self.cache_dtype = CACHE_DTYPES.get(options.cache_dtype) if options.cache_dtype else None

    def _complete(self, model, requests, sp) -> list:
        return complete(model, requests, sp=sp, layout=self.options.layout, impl=self.options.impl,
                        cache_dtype=self.cache_dtype, max_batch=self.options.batch_size)

    def run(self, batch: dict) -> Optional[list]:
        """The batch's results ``[(key, new_ids, finish_reason)]`` on rank 0 (None on the others)."""
        keys = [key for key, _ in batch["items"]]
        requests = [request for _, request in batch["items"]]
        if batch["kind"] == "long" and self.sp is not None:
            done = self._complete(self.sp_model, requests, self.sp)
            results = [(key, item.new_ids, item.finish_reason) for key, item in zip(keys, done)]
            return results if self.rank == 0 else None
        mine = list(range(self.rank, len(requests), self.size))  # short prompts: each rank decodes its share
        done = self._complete(self.model, [requests[i] for i in mine], None) if mine else []
        results = [(keys[i], item.new_ids, item.finish_reason) for i, item in zip(mine, done)]
        if self.sp is not None:
            import torch.distributed as dist

            gathered = [None] * self.size
            dist.all_gather_object(gathered, results)
            results = [result for part in gathered for result in part]
        return results if self.rank == 0 else None


def _serve(rank: _ReplicaRank, replica: int, take: Callable[[], object], send: Callable[[tuple], None]) -> None:
    """The loop of every rank of a replica: rank 0 takes a batch (``None`` = stop, :data:`WAIT` = none yet) and
    shares it with its group; all decode it; rank 0 sends ``("took", ...)`` before and ``("done", ...)`` after."""
    import torch.distributed as dist

    while True:
        task = take() if rank.rank == 0 else None
        if rank.rank == 0 and isinstance(task, dict):
            send(("took", replica, task["id"]))
        if rank.size > 1:
            box = [task]
            dist.broadcast_object_list(box, src=0)
            task = box[0]
        if task is None:
            return
        if task == WAIT:
            continue
        start = time.perf_counter()
        try:
            results = rank.run(task)
        except Exception as error:  # said before the replica goes: the driver names it if every replica fails so
            send(("failed", replica, {**_problem(error), "replica": replica}))
            raise
        if rank.rank == 0:
            send(("done", replica, task["id"], results, time.perf_counter() - start))


def _init_group(rank: int, size: int, init_method: Optional[str], backend: str, timeout_s: float,
                store_port: Optional[int] = None) -> None:
    """A replica's group: through ``init_method`` (Ray: rank 0's address), or by joining the rendezvous store the
    local driver holds on ``store_port`` (:func:`mcdist.parallel.spawn.rendezvous_store`)."""
    if size > 1:
        from mcdist.parallel.mesh import init_distributed

        from mcdist.parallel.spawn import join_rendezvous

        store = None if store_port is None else join_rendezvous(store_port, size, timeout_s)
        init_distributed(backend, timeout_s=timeout_s, rank=rank, world_size=size, init_method=init_method,
                         store=store)


def _problem(error: BaseException) -> dict:
    return {"type": type(error).__name__, "message": str(error).strip().splitlines()[0] if str(error).strip() else
            type(error).__name__}


def _raise_problem(problem: dict, where: str) -> None:
    if problem["type"] in ("CheckpointError", "FileNotFoundError"):
        raise CheckpointError(problem["message"])
    if problem["type"] in ("ValueError", "InferJobError", "ConfigError"):  # the request does not fit the model
        raise InferJobError(problem["message"])
    raise RuntimeError(f"{where}: {problem['type']}: {problem['message']}")


# -- where the replicas run ---------------------------------------------------------------------------------------


class _InProcess:
    """One replica of one rank in the driver's own process (R = 1, P = 1, no Ray)."""

    def __init__(self, model_dir: str, device: str, options: InferOptions):
        from mcdist.device import resolve_device

        self.rank = _ReplicaRank(model_dir, 0, 1, str(resolve_device(device)), options)
        self.tasks: List[object] = []
        self.current = None
        self.alive = {0}
        self.pids = {0: [os.getpid()]}

    def put(self, batch) -> None:
        self.tasks.append(batch)

    def queued(self) -> int:
        return len(self.tasks)

    def events(self, timeout: float) -> list:
        """One call says which batch it takes, the next decodes it and returns its results."""
        if self.current is None:
            if not self.tasks:
                return []
            self.current = self.tasks.pop(0)
            return [("took", 0, self.current["id"])]
        batch, self.current = self.current, None
        start = time.perf_counter()
        return [("done", 0, batch["id"], self.rank.run(batch), time.perf_counter() - start)]

    def lost(self) -> list:
        return []

    def stop(self) -> None:
        pass


def _local_rank_main(replica: int, rank: int, size: int, store_port: Optional[int], model_dir: str,
                     options: InferOptions, tasks, results, parent_pid: int, threads: int, timeout_s: float) -> None:
    from mcdist.parallel.spawn import die_with_parent

    die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    try:
        _init_group(rank, size, None, "gloo", timeout_s, store_port)
        worker = _ReplicaRank(model_dir, rank, size, "cpu", options)
    except Exception as error:
        results.put(("failed", replica, {**_problem(error), "replica": replica}))
        raise SystemExit(1)

    def take():
        try:
            return tasks.get(timeout=1.0)
        except queue_module.Empty:
            return WAIT

    try:
        _serve(worker, replica, take, results.put)
    except ValueError:  # the request does not fit the model: sent to the driver, which names it; no traceback
        raise SystemExit(1)


class _LocalProcesses:
    """R replicas × P ranks as local processes (``torch.multiprocessing``, spawn; gloo groups on the CPU)."""

    def __init__(self, model_dir: str, replicas: int, sp: int, options: InferOptions, *, threads: int = 1,
                 timeout_s: float = 600.0):
        import torch.multiprocessing as mp
        from mcdist.parallel.spawn import rendezvous_store

        context = mp.get_context("spawn")
        self.task_queue, self.result_queue = context.Queue(), context.Queue()
        self.processes: Dict[int, list] = {}
        # one rendezvous per replica: a store this driver binds and holds until stop (no port is probed)
        self.stores = [rendezvous_store(timeout_s) if sp > 1 else None for _ in range(replicas)]
        for replica, store in enumerate(self.stores):
            port = None if store is None else store.port
            self.processes[replica] = [
                context.Process(target=_local_rank_main, daemon=True, name=f"mcdist-infer-{replica}-{rank}",
                                args=(replica, rank, sp, port, model_dir, options, self.task_queue,
                                      self.result_queue, os.getpid(), threads, timeout_s))
                for rank in range(sp)]
            for process in self.processes[replica]:
                process.start()
        self.alive = set(self.processes)
        self.pids = {replica: [process.pid for process in group] for replica, group in self.processes.items()}

    def put(self, batch) -> None:
        self.task_queue.put(batch)

    def queued(self) -> int:
        try:
            return self.task_queue.qsize()
        except NotImplementedError:  # macOS: treat as empty (only the stall check after a loss reads it)
            return 0

    def events(self, timeout: float) -> list:
        return _drain(self.result_queue, queue_module.Empty, timeout)

    def _kill(self, replica: int) -> None:
        for process in self.processes[replica]:
            if process.is_alive():
                process.kill()
            process.join(5)

    def lost(self) -> list:
        gone = []
        for replica in sorted(self.alive):
            dead = [process for process in self.processes[replica] if process.exitcode is not None]
            if dead:
                self.alive.discard(replica)
                self._kill(replica)
                gone.append((replica, f"process {dead[0].name} (pid {dead[0].pid}) ended with exit code "
                                      f"{dead[0].exitcode}"))
        return gone

    def stop(self) -> None:
        for _ in self.alive:
            self.task_queue.put(None)
        deadline = time.monotonic() + 30
        for replica in self.processes:
            for process in self.processes[replica]:
                process.join(max(0.0, deadline - time.monotonic()))
            self._kill(replica)
        self.stores = []  # the rendezvous stores close with their last reference


class _RankActor:
    """One rank of a replica as a Ray actor (made remote by :class:`_RayReplicas`)."""

    def rendezvous(self) -> str:
        """The address rank 0 of a group listens on for its peers (this node's IP, a free port)."""
        import ray

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def setup(self, replica: int, rank: int, size: int, init_method: Optional[str], model_dir: str,
              options: InferOptions, device: str, backend: str, threads: int, timeout_s: float) -> dict:
        self.replica = replica
        torch.set_num_threads(threads)
        try:
            if device.startswith("cuda"):
                device = f"cuda:{torch.cuda.current_device()}"  # the GPU Ray gave this actor
            _init_group(rank, size, init_method, backend, timeout_s)
            self.worker = _ReplicaRank(model_dir, rank, size, device, options)
        except Exception as error:
            import ray

            return {"problem": {**_problem(error), "message": f"{_problem(error)['message']} (on the Ray actor of "
                                f"replica {replica} rank {rank}, node {ray.util.get_node_ip_address()})"}}
        return {"pid": os.getpid()}

    def serve(self, tasks, results) -> str:
        from ray.util.queue import Empty

        def take():
            try:
                return tasks.get(timeout=1.0)
            except Empty:
                return WAIT

        _serve(self.worker, self.replica, take, results.put)
        return "stopped"


class _RayReplicas:
    """R replicas × P ranks as Ray actors, one per rank (a gloo or NCCL group per replica), pulling batches from a
    ``ray.util.queue.Queue``; results come back through another."""

    def __init__(self, model_dir: str, replicas: int, sp: int, options: InferOptions, *, device: str,
                 cpus_per_rank: int, timeout_s: float, log: Callable[[str], None]):
        import ray
        from ray.util.queue import Queue

        from mcdist.runners.ray import wants_gpu

        self.ray = ray
        gpus = wants_gpu(False, device, replicas * sp)
        device, backend = ("cuda", "nccl") if gpus else ("cpu", "gloo")
        self.task_queue = Queue(actor_options={"num_cpus": 0})
        self.result_queue = Queue(actor_options={"num_cpus": 0})
        Actor = ray.remote(_RankActor)
        resources = dict(num_cpus=cpus_per_rank, num_gpus=1 if gpus else 0, max_restarts=0)
        self.groups, self.actors = [], {}
        for replica in range(replicas):
            if sp == 1:
                self.actors[replica] = [Actor.options(**resources).remote()]
                continue
            # a replica's ranks on as few nodes as fit (PACK: one when it can): its per-token all-gathers stay local
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundle = {"CPU": cpus_per_rank, **({"GPU": 1} if gpus else {})}
            group = placement_group([dict(bundle) for _ in range(sp)], strategy="PACK")
            self.groups.append(group)
            self.actors[replica] = [Actor.options(**resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=rank)).remote() for rank in range(sp)]
        addresses = {replica: self.actors[replica][0].rendezvous.remote() if sp > 1 else None
                     for replica in range(replicas)}
        setups = {replica: [actor.setup.remote(replica, rank, sp, addresses[replica] if sp > 1 else None,
                                               model_dir, options, device, backend, cpus_per_rank, timeout_s)
                            for rank, actor in enumerate(self.actors[replica])] for replica in range(replicas)}
        self.pids, self.alive, problems = {}, set(), []
        deadline = time.monotonic() + timeout_s
        for replica, refs in setups.items():
            try:
                answers = ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                free = ray.available_resources()
                answers = [{"problem": {"type": "InferJobError", "message": (
                    f"replica {replica} did not start within {timeout_s:g} s: its {sp} rank(s) of {cpus_per_rank} "
                    f"CPU{' + 1 GPU' if gpus else ''} each found no room (the Ray cluster has "
                    f"{free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free); expected fewer "
                    "--replicas, --sp or --workers-cpus, or a bigger cluster")}}]
            except Exception as error:  # an actor died while it started
                answers = [{"problem": _problem(error)}]
            found = [answer["problem"] for answer in answers if "problem" in answer]
            if found:
                problems.append(found[0])
                log(f"infer: replica {replica} did not start ({found[0]['message']})")
                self._kill(replica)
                continue
            self.pids[replica] = [answer["pid"] for answer in answers]
            self.alive.add(replica)
        if not self.alive:
            self.stop()
            _raise_problem(problems[0], "every replica failed to start")
        self.serving = {replica: [actor.serve.remote(self.task_queue, self.result_queue)
                                  for actor in self.actors[replica]] for replica in self.alive}

    def put(self, batch) -> None:
        self.task_queue.put(batch)

    def queued(self) -> int:
        return self.task_queue.qsize()

    def events(self, timeout: float) -> list:
        from ray.util.queue import Empty

        return _drain(self.result_queue, Empty, timeout)

    def _kill(self, replica: int) -> None:
        for actor in self.actors[replica]:
            self.ray.kill(actor)

    def lost(self) -> list:
        gone = []
        for replica in sorted(self.alive):
            ready, _ = self.ray.wait(self.serving[replica], num_returns=len(self.serving[replica]), timeout=0)
            if not ready:
                continue
            try:
                self.ray.get(ready[0])
                reason = "its actor returned early"
            except Exception as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self.alive.discard(replica)
            self._kill(replica)
            gone.append((replica, reason))
        return gone

    def stop(self) -> None:
        for _ in self.alive:
            self.task_queue.put(None)
        refs = [ref for replica in self.alive for ref in self.serving.get(replica, [])] if hasattr(
            self, "serving") else []
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=30)
        for replica in self.actors:
            self._kill(replica)
        for q in (self.task_queue, self.result_queue):
            q.shutdown()
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)


# -- the driver -----------------------------------------------------------------------------------------------


def _batches(prompts: List[Prompt], *, sp: int, threshold: int, batch_size: int) -> List[dict]:
    """Long prompts (>= threshold tokens, when sp > 1) in batches of ``batch_size`` for a whole sp group; the
    others in batches of ``batch_size`` per rank. Sorted by length, so a batch holds similar lengths; long
    batches first (they take longest)."""
    ordered = sorted(prompts, key=lambda prompt: len(prompt.request.prompt_ids))
    long = [prompt for prompt in ordered if sp > 1 and len(prompt.request.prompt_ids) >= threshold]
    short = [prompt for prompt in ordered if not (sp > 1 and len(prompt.request.prompt_ids) >= threshold)]
    batches = []
    for kind, members, size in (("long", long[::-1], batch_size), ("short", short, batch_size * sp)):
        for start in range(0, len(members), size):
            batches.append({"id": len(batches), "kind": kind, "prompts": members[start:start + size]})
    return batches


class _Progress:
    def __init__(self, total: int, log: Callable[[str], None], every_s: float):
        self.total, self.log, self.every_s = total, log, every_s
        self.created = self.start = self.last = time.monotonic()
        self.done = self.tokens = 0

    def add(self, prompts: int, tokens: int, errors: int, started: bool = True) -> None:
        self.done += prompts
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            if not started:
                self.log(f"infer: waiting for the replicas to start ({now - self.created:.0f} s)")
                return
            rate = self.tokens / max(now - self.start, 1e-9)
            self.log(f"infer: {self.done}/{self.total} prompts, {self.tokens} new tokens, {rate:.1f} tokens/s, "
                     f"{errors} error(s)")


def run_infer_job(checkpoint: str, prompts_path: str, out: str, *, options: Optional[InferOptions] = None,
                  replicas: int = 1, sp: int = 1, tokenizer: Optional[str] = None, errors_path: Optional[str] = None,
                  ray: bool = False, address: Optional[str] = None, device: str = "auto", cpus_per_rank: int = 1,
                  timeout_s: float = 600.0, progress_every_s: float = 2.0,
                  log: Optional[Callable[[str], None]] = None,
                  on_event: Optional[Callable[[tuple], None]] = None) -> dict:
    """Run (or resume) the batch-inference job: every good line of ``prompts_path`` continued by the model in
    ``checkpoint``, one result line each in ``out``.

    Args:
        checkpoint: a folder written by :func:`mcdist.checkpoint.save_model`; read here (vocabulary, digest) and
            by every rank, so with Ray on several machines it must be on a filesystem they share.
        prompts_path: JSON lines ``{"id", "prompt_ids" | "prompt", [max_new_tokens, temperature, top_k, top_p,
            stop_ids]}``.
        out: the results (JSON lines, appended); ``OUT.job.json`` beside it names the job.
        options: the job's defaults and batching (:class:`InferOptions`).
        replicas, sp: R data-parallel replicas of P sequence-parallel ranks each. R = P = 1 without Ray runs in
            this process; otherwise local processes (CPU, gloo) or, with ``ray``, Ray actors.
        tokenizer: ``byte`` or a tokenizer.json: encodes ``prompt`` lines, and results then carry ``text``.
        errors_path: the bad lines (default ``OUT`` with ``.errors.jsonl``).
        address, device, cpus_per_rank: with ``ray``, the cluster (as ``mcdist train --ray``), the device of each
            rank (``auto``: a GPU per rank when the cluster has them) and the CPUs of each.
        timeout_s: how long a collective of an sp group may wait for a peer.
        log: receives the progress lines (every ``progress_every_s`` seconds) and notices; default stderr.
        on_event: sees every message of the replicas, for monitoring: ``("started", replica, pids)``,
            ``("took", replica, batch)``, ``("done", replica, batch, results, seconds)``,
            ``("lost", replica, reason)``.

    Returns:
        The summary: prompts, new_tokens, seconds, tokens_per_s, per_replica, errors, lost_replicas, ...

    Raises:
        InferJobError: a bad option, a foreign or damaged ``out``, an unreadable prompts file.
        CheckpointError: the checkpoint is missing or corrupt. RuntimeError: every replica was lost.
    """
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    notify = on_event or (lambda event: None)
    options = options or InferOptions()
    for name, value in (("--replicas", replicas), ("--sp", sp), ("--workers-cpus", cpus_per_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InferJobError(f"{name} = {value!r} is invalid; expected a positive integer")
    if address is not None and not ray:
        raise InferJobError("--address needs --ray")
    checkpoint, prompts_path, out = (os.path.abspath(os.fspath(path)) for path in (checkpoint, prompts_path, out))
    errors_path, header_path = job_paths(out, errors_path and os.path.abspath(os.fspath(errors_path)))
    if len({out, errors_path, header_path, prompts_path}) < 4:
        raise InferJobError(f"--out {out!r}, the errors file {errors_path!r} and the prompts file must be four "
                            "different files")
    if os.path.isdir(out):
        raise InferJobError(f"--out {out!r} is a folder; expected a file name")
    config = load_config(checkpoint)
    options.check(config.vocab_size)
    text_tokenizer = None
    if tokenizer is not None:
        try:
            text_tokenizer = load_tokenizer(tokenizer)
        except (ImportError, OSError, ValueError) as error:
            raise InferJobError(str(error)) from None
    prompts, errors, prompts_sha = read_prompts(prompts_path, vocab_size=config.vocab_size, tokenizer=text_tokenizer,
                                                options=options)
    header = {"format": JOB_FORMAT, "checkpoint_sha256": checkpoint_digest(checkpoint), "prompts_sha256": prompts_sha,
              **options.identity(), "tokenizer": text_tokenizer.describe() if text_tokenizer else None}
    _claim_output(out, header_path, header)
    done = read_results(out, say)
    write_text_atomic(errors_path, "".join(json.dumps(error, ensure_ascii=False) + "\n" for error in errors))
    pending = [prompt for prompt in prompts if prompt.key not in done]
    unit = (2 * sp if options.layout == "zigzag" else sp) * config.segment_len
    threshold = options.sp_min_tokens or unit
    batches = {batch["id"]: batch for batch in _batches(pending, sp=sp, threshold=threshold,
                                                        batch_size=options.batch_size)}
    if errors:
        say(f"infer: {len(errors)} bad line(s) in {prompts_path} (first: line {errors[0]['line']}: "
            f"{errors[0]['reason']}); see {errors_path}")
    if len(done):
        say(f"infer: resuming {out}: {len(done)} result(s) there, {len(pending)} prompt(s) to go")
    start = time.monotonic()
    per_replica: Dict[int, dict] = {}
    lost_replicas, retried = [], 0
    written = new_tokens = 0
    results_file, errors_file = _LineFile(out), _LineFile(errors_path)
    backend = None
    decode_seconds = 0.0
    try:
        if batches:
            if ray:
                from mcdist.runners.ray import RaySession, require_ray_train

                require_ray_train("mcdist infer --ray")
                session = RaySession(address or "", replicas * sp * cpus_per_rank, say)
            else:
                session = None
            try:
                if ray:
                    backend = _RayReplicas(checkpoint, replicas, sp, options, device=device,
                                           cpus_per_rank=cpus_per_rank, timeout_s=timeout_s, log=say)
                elif replicas * sp == 1:
                    backend = _InProcess(checkpoint, device, options)
                else:
                    backend = _LocalProcesses(checkpoint, replicas, sp, options, timeout_s=timeout_s)
                for replica, pids in backend.pids.items():
                    notify(("started", replica, pids))
                    per_replica[replica] = {"replica": replica, "prompts": 0, "new_tokens": 0, "busy_s": 0.0}
                say(f"infer: {len(pending)} prompt(s) in {len(batches)} batch(es) on {len(backend.alive)} replica(s) "
                    f"× sp {sp} ({'Ray actors' if ray else 'this process' if replicas * sp == 1 else 'local processes'})")
                for batch in batches.values():
                    backend.put(_task(batch))
                decode_start = None  # the first batch taken: the replicas' start-up is not decoding
                remaining = set(batches)
                in_flight: Dict[int, int] = {}
                attempts = {batch_id: 1 for batch_id in batches}
                progress = _Progress(len(pending), say, progress_every_s)
                stalled_since = None
                failures: List[dict] = []
                while remaining:
                    for event in backend.events(POLL_S):
                        notify(event)
                        if event[0] == "took":
                            in_flight[event[2]] = event[1]
                            if decode_start is None:
                                decode_start = progress.start = time.monotonic()
                        elif event[0] == "failed":
                            failures.append(event[2])
                        elif event[0] == "done":
                            _, replica, batch_id, results, seconds = event
                            in_flight.pop(batch_id, None)
                            if batch_id not in remaining:
                                continue  # a retried batch whose first run came back after all
                            remaining.discard(batch_id)
                            by_key = {prompt.key: prompt for prompt in batches[batch_id]["prompts"]}
                            count = tokens = 0
                            for key, new_ids, finish_reason in results:
                                if key in done:
                                    continue
                                prompt = by_key[key]
                                record = {"id": prompt.id, "new_ids": list(new_ids)}
                                if text_tokenizer is not None:
                                    record["text"] = decode_text(text_tokenizer, new_ids)
                                record.update(finish_reason=finish_reason,
                                              prompt_tokens=len(prompt.request.prompt_ids),
                                              seconds=round(seconds, 4))
                                results_file.append(record)
                                done[key] = record
                                count, tokens = count + 1, tokens + len(new_ids)
                            stats = per_replica[replica]
                            stats["prompts"] += count
                            stats["new_tokens"] += tokens
                            stats["busy_s"] += seconds
                            written, new_tokens = written + count, new_tokens + tokens
                            progress.add(count, tokens, len(errors))
                    progress.add(0, 0, len(errors), started=decode_start is not None)
                    for replica, reason in backend.lost():
                        said = [failure for failure in failures if failure.get("replica") == replica]
                        if said:  # what the replica said before it went
                            reason = f"{said[0]['type']}: {said[0]['message']}"
                        lost_replicas.append({"replica": replica, "reason": reason})
                        notify(("lost", replica, reason))
                        held = [batch_id for batch_id, owner in in_flight.items() if owner == replica]
                        say(f"infer: replica {replica} was lost ({reason}); "
                            f"{len(held)} batch(es) it held go back to the queue")
                        for batch_id in held:
                            del in_flight[batch_id]
                            retried += _retry(batch_id, batches, attempts, remaining, backend, errors,
                                              errors_file, reason)
                    if remaining and not backend.alive:
                        failures += [event[2] for event in backend.events(1.0) if event[0] == "failed"]
                        if failures:
                            _raise_problem(failures[0], "every replica failed")
                        raise RuntimeError(f"every replica was lost ({lost_replicas[-1]['reason']}) with "
                                           f"{len(remaining)} batch(es) left; {written} result(s) were written to "
                                           f"{out}: run the same command again to finish the job")
                    # a replica lost between taking a batch and saying so leaves a batch nobody holds
                    if lost_replicas and remaining and not in_flight and backend.queued() == 0:
                        stalled_since = stalled_since or time.monotonic()
                        if time.monotonic() - stalled_since > STALL_S:
                            for batch_id in sorted(remaining):
                                retried += _retry(batch_id, batches, attempts, remaining, backend, errors,
                                                  errors_file, "its replica was lost as it took the batch")
                            stalled_since = None
                    else:
                        stalled_since = None
                decode_seconds = time.monotonic() - (decode_start or time.monotonic())
            finally:
                if backend is not None:
                    backend.stop()
                if session is not None:
                    session.close()
    finally:
        results_file.close()
        errors_file.close()
    seconds = time.monotonic() - start
    rate = 1.0 / max(decode_seconds, 1e-9)
    summary = {"out": out, "prompts": len(prompts), "skipped": len(prompts) - len(pending), "written": written,
               "sp_prompts": sum(len(batch["prompts"]) for batch in batches.values() if batch["kind"] == "long"),
               "new_tokens": new_tokens, "seconds": round(seconds, 3), "decode_seconds": round(decode_seconds, 3),
               "tokens_per_s": round(new_tokens * rate, 2),
               "per_replica": [{**stats, "busy_s": round(stats["busy_s"], 3),
                                "tokens_per_s": round(stats["new_tokens"] * rate, 2)}
                               for stats in per_replica.values()],
               "errors": len(errors), "errors_path": errors_path, "lost_replicas": lost_replicas,
               "retried_batches": retried}
    replica_rates = ", ".join(f"r{stats['replica']} {stats['tokens_per_s']:.1f}" for stats in summary["per_replica"])
    say(f"infer: done: {written} prompt(s) written ({summary['skipped']} already there), {new_tokens} new tokens in "
        f"{decode_seconds:.1f} s of decoding, {seconds:.1f} s in all ({summary['tokens_per_s']:.1f} tokens/s; per "
        f"replica: {replica_rates or 'none ran'}); "
        f"{len(errors)} error(s){f' in {errors_path}' if errors else ''}"
        f"{f'; {len(lost_replicas)} replica(s) lost, {retried} batch(es) retried' if lost_replicas else ''}")
    return summary


def _task(batch: dict) -> dict:
    """What a replica gets of a batch: its kind and ``(key, request)`` pairs."""
    return {"id": batch["id"], "kind": batch["kind"],
            "items": [(prompt.key, prompt.request) for prompt in batch["prompts"]]}


def _retry(batch_id: int, batches: dict, attempts: dict, remaining: set, backend, errors: list, errors_file,
           reason: str) -> int:
    """Queue a lost batch again (1), or, after :data:`MAX_ATTEMPTS`, report its prompts as errors (0)."""
    if attempts[batch_id] >= MAX_ATTEMPTS:
        remaining.discard(batch_id)
        for prompt in batches[batch_id]["prompts"]:
            error = {"line": prompt.line, "id": prompt.id, "reason": f"given up: {MAX_ATTEMPTS} replicas were lost "
                                                                       f"while decoding its batch (last: {reason})"}
            errors.append(error)
            errors_file.append(error)
        return 0
    attempts[batch_id] += 1
    backend.put(_task(batches[batch_id]))
    return 1
