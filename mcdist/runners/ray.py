"""Run a rank function on Ray Train workers, one per rank (gloo on CPUs, NCCL on GPUs); return rank 0's result.

:func:`run_on_ray` connects to Ray (:class:`RaySession`), runs a ``TorchTrainer`` whose workers each call the
rank function (Ray Train creates the process group before it runs; ``init_distributed`` sees it initialised
and leaves it alone) and reads the result file rank 0 writes into the run's storage folder (Ray keeps only the
metrics reported with a checkpoint). Training (:func:`mcdist.train.ray_job.train_with_ray`), evaluation and
generation all go through it.

Choices this module makes:

* ``address``: ``""`` joins the Ray that ``RAY_ADDRESS`` or the last ``ray start`` on this machine names when it
  answers, else starts a local Ray sized for the job (``workers × cpus_per_worker`` CPUs, a small object store,
  Ray's headless API server on 127.0.0.1) and stops it afterwards; ``"auto"`` must find a running one;
  ``host:port`` or ``ray://host:port`` is probed with a TCP connection first, so an unreachable cluster fails in
  seconds with an error naming the address (``ray.init`` alone would retry for minutes). The driver presents
  Ray's auth token (``~/.ray/auth_token``) when there is one.
* GPUs (:func:`wants_gpu`): one per worker when ``use_gpu`` is true or ``device`` is ``cuda`` (refused at once
  when the cluster has fewer), or when ``device`` is ``auto`` and the cluster has at least one GPU per worker;
  never when ``device`` is ``cpu``.
* User errors (the types of :data:`mcdist.runners.spawned.RAISED_AS_THEIR_TYPE`: a damaged checkpoint, a bad
  value) are not Ray's to retry: a worker they stop records its error beside the result file and, once every
  rank has ended, returns without raising; the driver raises the first rank's own error as its type. A worker
  alone with its error raises after :data:`USER_ERROR_WAIT_S` (its peers may wait in a collective), and Ray's
  restart returns at once. The driver drops Ray's notice that token authentication is on
  (:data:`SKIPPED_DRIVER_NOTICE`) and the harmless worker lines of :data:`SKIPPED_WORKER_LINES`
  (docs/reliability.md).
* Worker output: ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` (each line printed once) and ``TQDM_DISABLE=1`` (a progress
  bar cannot redraw through Ray's log forwarding); Ray Train's own logs at WARNING. Ray prefixes each
  forwarded line with ``(RayTrainWorker pid=...)``.

Ray is an optional dependency: it is imported when a function here needs it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from typing import Callable, Optional
from urllib.parse import urlsplit

from mcdist.config import ConfigError
from mcdist.runners.problems import check_count, unpack
from mcdist.runners.spawned import RAISED_AS_THEIR_TYPE, rank_error

__all__ = ["RayConnectionError", "RayRun", "RaySession", "check_reachable", "host_port", "json_safe",
           "require_ray_train", "run_on_ray", "unique_run_name", "wants_gpu"]

CONNECT_TIMEOUT_S = 5.0
OBJECT_STORE_BYTES = 256 * 1024 * 1024
RESULT_NAME = "mcdist_result.json"
SKIPPED_DRIVER_NOTICE = "Token authentication is enabled for this Ray cluster"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
ERROR_PREFIX = "mcdist_error-"  # + rank + .json: a user error that stopped that worker
ENDED_KEY = "mcdist/ray/ended"
USER_ERROR_WAIT_S = 10.0  # how long a worker stopped by a user error waits for its peers to stop too
# lines of the workers' (and Ray Train controller's) output the driver does not print: harmless notices that
# read as errors (see _skip_harmless_lines)
SKIPPED_WORKER_LINES = (r"Failed to query Ray Train Controller actor state"
                        r"|core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*constructor arguments "
                        r"in the object store")
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TQDM_DISABLE": "1"}


class RayConnectionError(ConnectionError):
    """The Ray cluster named by ``ray.address`` cannot be reached (the message names the address)."""


def json_safe(value):
    """Metrics as plain Python (Ray refuses tensors): numbers, strings, None, and dicts/lists of them."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# -- files in the run's storage (a local path or a pyarrow URI: s3://, gs://) ------------------------------------


def _write_text(uri: str, text: str) -> None:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(os.path.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def _read_text(uri: str) -> Optional[str]:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def _delete(uri: str) -> None:
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.File:
        filesystem.delete_file(path)


# -- connecting ------------------------------------------------------------------------------------------------


def host_port(address: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` of ``host:port``, ``ray://host:port`` or ``http://host:port``; ``None`` if it has no port."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the Ray head at ``address``.

    Raises:
        RayConnectionError: nothing answers at ``address`` within ``timeout_s`` (naming the address).
        ConfigError: ``address`` has no ``host:port``.
    """
    target = host_port(address)
    if target is None:
        raise ConfigError(f"ray.address = {address!r} is invalid; expected '' (local), 'auto', host:port or "
                          "ray://host:port")
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as error:
        raise RayConnectionError(
            f"cannot reach the Ray cluster at ray.address = {address!r} ({error}); expected a running Ray head "
            "there (`ray start --head`, `ray up launch/cluster.yaml`), or leave --address out to start a local "
            "Ray") from error


def _answers(address: str) -> bool:
    try:
        check_reachable(address, timeout_s=2.0)
        return True
    except (RayConnectionError, ConfigError):
        return False


def _local_cluster_address() -> Optional[str]:
    """The address of the Ray that ``RAY_ADDRESS`` or the last ``ray start`` on this machine names, if any."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        return address
    try:
        from ray._private.utils import read_ray_address  # the file `ray start` writes

        return read_ray_address() or None
    except Exception:  # a Ray without the helper: start a fresh local instance
        return None


def _use_auth_token() -> None:
    """Present the Ray auth token when there is one: `ray start --head` turns token authentication on (Ray
    2.60 does), but a driver sends the token only with RAY_AUTH_MODE=token (a cluster without auth accepts it too)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


def _connect(address: str, common: dict) -> None:
    """``ray.init(address)`` for a running cluster; its failures name the address."""
    import ray

    _use_auth_token()
    try:
        ray.init(address=address, **common)
    except ConnectionError as error:
        hint = ("start one with `ray start --head`" if address == "auto" else
                "is its Ray running, the same Ray version as here, and (with token authentication) is its token "
                "in ~/.ray/auth_token or RAY_AUTH_TOKEN?")
        raise RayConnectionError(f"cannot connect to the Ray cluster at ray.address = {address!r} ({error}); "
                                 f"{hint}") from error


def _skip_harmless_lines() -> None:
    """Drop two harmless notices from the driver's copy of the workers' output (:data:`SKIPPED_WORKER_LINES`):

    * Ray Train's placement-group cleaner asks the state API, which needs the dashboard packages of
      ``ray[default]``, about the controller every second and, without them, says it could not, every second;
    * Ray Train 2.60's controller starts a ``PreemptionWatcher`` actor and Ray core logs, at level E, that its
      constructor arguments live in the object store (the actor is restartable; nothing failed).

    Only these lines are dropped (every other line of every level still reaches the terminal). Ray reads the
    skip pattern (``RAY_DEDUP_LOGS_SKIP_REGEX``; one set by the user wins) when it is imported."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", SKIPPED_WORKER_LINES)
    try:  # Ray imported already (tests): its deduplicators hold the pattern they read then
        from ray._private import ray_logging

        for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            if getattr(deduplicator, "skip_re", True) is None:
                deduplicator.skip_re = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    except (ImportError, AttributeError):
        pass


class _DropTokenAuthNotice(logging.Filter):
    """Drops Ray's warning that token authentication is on (:data:`SKIPPED_DRIVER_NOTICE`), and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(SKIPPED_DRIVER_NOTICE)


def _quiet_token_auth_notice() -> None:
    """Ray 2.60 turns token authentication on for every local Ray it starts and, with ``RAY_AUTH_MODE`` unset,
    warns on the driver's terminal that it did, every time: a notice, not a problem (the secure default). Setting
    the variable instead would skip Ray's refresh of its cached settings in a process that imported Ray already
    (its GCS would then refuse this driver), so the one message is filtered from Ray's logger."""
    target = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(item, _DropTokenAuthNotice) for item in target.filters):
        target.addFilter(_DropTokenAuthNotice())


class RaySession:
    """``ray.init`` as ``address`` says (``ray.address``: ``""``, ``"auto"``, ``host:port``, ``ray://host:port``); a
    local Ray started here gets ``num_cpus``. ``close`` shuts down only what this session started or joined;
    ``description`` says which Ray it is."""

    def __init__(self, address: str, num_cpus: int, log: Callable[[str], None]):
        _skip_harmless_lines()
        _quiet_token_auth_notice()
        import ray

        self.owned = False
        self.description = "the Ray already initialised in this process"
        if ray.is_initialized():
            if address not in ("", "auto"):
                check_reachable(address)  # a named cluster that does not answer fails as it does without Ray
            return
        common = dict(logging_level="WARNING", log_to_driver=True)
        if address == "":
            existing = _local_cluster_address()
            if existing and host_port(existing) and _answers(existing):
                _connect(existing, common)
                self.description = f"the running Ray at {existing}"
            else:
                # include_dashboard left to Ray: its default is a headless API server on 127.0.0.1 (no web
                # UI without the dashboard's extra packages); with False, Ray Train's placement-group cleaner
                # cannot query actor states and logs a warning every second
                ray.init(address="local", num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES, **common)
                self.description = f"a local Ray with {num_cpus} CPU(s), started for this run"
        elif address == "auto":
            _connect("auto", common)
            self.description = "the running Ray found by address 'auto'"
        else:
            check_reachable(address)
            _connect(address, common)
            self.description = f"the Ray cluster at {address}"
        self.owned = True
        log(f"ray: using {self.description}")

    def close(self) -> None:
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()


# -- the workers -----------------------------------------------------------------------------------------------


def require_ray_train(command: str) -> None:
    """Raise an ImportError naming ``command`` and how to install Ray Train when it cannot be imported."""
    try:
        importlib.import_module("ray.train.torch")
    except ImportError as error:
        raise ImportError(f"{command} needs Ray Train ({error}); install it with "
                          "`pip install 'mcdist[ray]'` (make setup does)") from error


def wants_gpu(use_gpu: bool, device: str, workers: int) -> bool:
    """One GPU per worker when ``use_gpu`` is true or ``device`` is ``cuda...``, or when ``device`` is ``auto`` and the
    cluster has at least one GPU per worker; never when ``device`` is ``cpu`` (and ``use_gpu`` false). Needs Ray
    connected.

    Raises:
        ConfigError: GPUs are asked for but the cluster has fewer than one per worker (naming both).
    """
    import ray

    if use_gpu or device.startswith("cuda"):
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < workers:  # Ray would wait for them forever, asking every minute
            asked = "ray.use_gpu = true" if use_gpu else f"device = {device!r}"
            raise ConfigError(f"{asked} asks for one GPU per worker ({workers}) but the Ray cluster has {gpus:g} "
                              "GPU(s); expected device auto or cpu, or a cluster with the GPUs (an autoscaling "
                              "one: start its GPU nodes first)")
        return True
    if device != "auto":
        return False
    return ray.cluster_resources().get("GPU", 0) >= workers


def _supported(cls, **kwargs) -> dict:
    """The keyword arguments ``cls`` (a Ray config dataclass) knows: older Rays lack some."""
    if dataclasses.is_dataclass(cls):
        known = {field.name for field in dataclasses.fields(cls)}
        return {key: value for key, value in kwargs.items() if key in known}
    return kwargs


def _scaling_config(workers: int, use_gpu: bool, cpus_per_worker: int):
    """Ray Train's ScalingConfig for ``workers`` workers of ``cpus_per_worker`` CPUs (+ 1 GPU each with ``use_gpu``),
    in the form this Ray takes."""
    import ray.train

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    try:  # Ray Train V1 gives its coordinator actor 1 CPU by default: a 2-CPU machine then never fits 2 workers
        return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                       trainer_resources={"CPU": 0})
    except DeprecationWarning:  # Ray Train V2 refuses the field: its controller takes no CPU
        return ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)


def _ray_run_config(storage_path: str, name: str, max_failures: int, keep_last: Optional[int]):
    """Ray Train's RunConfig: the run ``<storage_path>/<name>``, ``max_failures`` restarts, the last ``keep_last``
    reported checkpoints kept (``None``: Ray's default), the workers' environment (:data:`WORKER_ENV`) and Ray
    Train's logs at WARNING; fields this Ray lacks are left out."""
    import ray.train

    logging_config = None
    if hasattr(ray.train, "LoggingConfig"):
        logging_config = ray.train.LoggingConfig(log_level="WARNING")
    options = dict(storage_path=storage_path, name=name,
                   failure_config=ray.train.FailureConfig(max_failures=max_failures),
                   worker_runtime_env={"env_vars": dict(WORKER_ENV)}, logging_config=logging_config)
    if keep_last is not None:
        options["checkpoint_config"] = ray.train.CheckpointConfig(num_to_keep=keep_last)
    return ray.train.RunConfig(**_supported(ray.train.RunConfig, **options))


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO on the console through a logger named after its file, which its
    LoggingConfig does not reach; one line per metrics record would drown the trainer's own lines."""
    try:
        from ray.train.v2._internal.execution import context as report_module
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    for name in (report_module.__name__, getattr(report_module, "__file__", None)):
        if name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _rank_entry(loop_config: dict) -> None:
    """What every Ray Train worker runs: its rank of the job; rank 0 writes the result file."""
    import ray
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = str(ray.train.torch.get_device()) if loop_config["use_gpu"] else "cpu"  # the GPU Ray gave it
    where = f" (on the Ray worker of rank {rank}, node {ray.util.get_node_ip_address()})"
    result_uri = loop_config["result_uri"]
    if any(_read_text(_error_uri(result_uri, other)) is not None for other in range(world_size)):
        return  # a restart after a user error of this job: trying again cannot help; the driver raises it
    try:
        payload = json_safe(loop_config["rank_fn"](rank, world_size, device, where, *loop_config["args"]))
    except tuple(RAISED_AS_THEIR_TYPE.values()) as error:  # the request does not fit: not Ray's to retry
        _write_text(_error_uri(result_uri, rank), json.dumps({"type": type(error).__name__, "message": str(error)}))
        if not _all_ranks_ended(world_size, USER_ERROR_WAIT_S):
            raise  # a peer still works (or waits in a collective): Ray stops the group; its restart returns at once
        return
    _all_ranks_ended(world_size, 0.0)
    if rank == 0:
        _write_text(result_uri, json.dumps(payload, sort_keys=True))


def _error_uri(result_uri: str, rank: int) -> str:
    """Where the worker of ``rank`` records the user error that stopped it, beside the result file."""
    return f"{result_uri.rsplit('/', 1)[0]}/{ERROR_PREFIX}{rank}.json"


def _all_ranks_ended(world_size: int, timeout_s: float) -> bool:
    """Count this rank as ended (its function returned or raised a user error) in the process group's store, and
    wait up to ``timeout_s`` for every rank to have; whether they all have. ``False`` without a store."""
    from torch.distributed import distributed_c10d

    try:
        store = distributed_c10d._get_default_store()
        store.add(ENDED_KEY, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(ENDED_KEY, 0) < world_size:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
    except Exception:  # no process group, or a torch without the helper
        return False


def _rank_errors(result_uri: str, workers: int) -> Optional[Exception]:
    """The user error a worker recorded (:func:`mcdist.runners.spawned.rank_error` of their reports), if any."""
    reports = [json.loads(text) for text in (_read_text(_error_uri(result_uri, rank)) for rank in range(workers))
               if text is not None]
    return rank_error(reports)


def unique_run_name(prefix: str) -> str:
    """``prefix`` with a timestamp and a random suffix: a Ray run of its own."""
    return prefix + datetime.datetime.now().strftime("-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


@dataclasses.dataclass
class RayRun:
    """What :func:`run_on_ray` returns: rank 0's result, the run's folder in the storage path, and Ray's copy of
    the last checkpoint a worker reported (``None`` when none was)."""

    result: dict
    run_dir: str
    checkpoint: Optional[str]


def run_on_ray(rank_fn: Callable[..., dict], *args, workers: int, what: str, name: str, describe: str = "",
               address: Optional[str] = None, use_gpu: bool = False, device: str = "auto", cpus_per_worker: int = 1,
               backend: str = "auto", storage_path: Optional[str] = None, timeout_s: float = 600.0,
               max_failures: int = 0, failures_label: Optional[str] = None, keep_last: Optional[int] = None,
               log: Optional[Callable[[str], None]] = print) -> RayRun:
    """``rank_fn`` on ``workers`` Ray Train workers (one per rank); rank 0's result.

    Args:
        rank_fn: a module-level rank function (:mod:`mcdist.runners`); ``args`` follow its first four arguments
            and travel by pickling.
        workers: Ray workers = ranks.
        what: names the job in errors; ``name``: the Ray run's name (:func:`unique_run_name` for a run of its
            own); ``describe``: what the driver's log line says the job is.
        address: the Ray cluster as ``ray.address`` takes it: ``None``/``""`` joins this machine's running Ray or
            starts a local one (``workers × cpus_per_worker`` CPUs, stopped afterwards), ``auto``, ``host:port``,
            ``ray://host:port`` (probed first: an unreachable one fails in seconds, naming it).
        use_gpu, device: one GPU per worker as :func:`wants_gpu` says; the ``device`` a rank function gets is
            then its GPU, else ``"cpu"``.
        backend: the process group's; ``auto``: NCCL with GPUs, else gloo.
        storage_path: Ray Train's storage folder (the run is ``<storage_path>/<name>``; rank 0's result file is
            written there); default a temporary folder here, removed afterwards. On a cluster of several machines
            it must be shared (NFS, ``s3://``).
        timeout_s: how long a collective may wait for another rank (a rank that died fails the run then).
        max_failures: restarts of the whole worker group Ray makes after a worker dies (``failures_label`` names
            the setting in the error); keep_last: the reported checkpoints Ray keeps (``None``: Ray's default).
        log: receives the driver's lines (which Ray, how many workers); ``None`` is silent.

    Raises:
        ValueError, CheckpointError: a rank reported one (the message names its node). RayConnectionError:
        ``address`` cannot be reached. ImportError: no Ray Train. RuntimeError: the run failed (after up to
        ``max_failures`` restarts; the message carries the workers' error).
    """
    say = log or (lambda line: None)
    check_count("workers", workers)
    check_count("cpus_per_worker", cpus_per_worker)
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise ValueError(f"device = {device!r} is invalid; expected auto, cpu or cuda (each worker takes the GPU "
                         "Ray gives it)")
    require_ray_train(what)
    session = RaySession(address or "", workers * cpus_per_worker, say)
    owned_storage = storage_path is None
    storage = tempfile.mkdtemp(prefix="mcdist-ray-") if owned_storage else storage_path
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    try:
        from ray.train.torch import TorchConfig, TorchTrainer

        gpus = wants_gpu(use_gpu, device, workers)
        if backend == "auto":
            backend = "nccl" if gpus else "gloo"
        say(f"ray: {describe or what} on {workers} worker(s), {'1 GPU' if gpus else 'no GPU'} + {cpus_per_worker} "
            f"CPU each, {backend}; run {storage.rstrip('/')}/{name}")
        result_uri = f"{storage.rstrip('/')}/{name}/{RESULT_NAME}"
        for uri in [result_uri] + [_error_uri(result_uri, rank) for rank in range(workers)]:
            _delete(uri)  # a previous job's, under the same name
        loop_config = {"rank_fn": rank_fn, "args": list(args), "use_gpu": gpus, "result_uri": result_uri}
        trainer = TorchTrainer(_rank_entry, train_loop_config=loop_config,
                               scaling_config=_scaling_config(workers, gpus, cpus_per_worker),
                               run_config=_ray_run_config(storage, name, max_failures, keep_last),
                               torch_config=TorchConfig(backend=backend, timeout_s=int(timeout_s)))
        try:
            result = trainer.fit()
        except Exception as error:  # TrainingFailedError: the workers' error is in the message
            user_error = _rank_errors(result_uri, workers)
            if user_error is not None:  # a rank found the request does not fit: its one line, as locally
                raise user_error from None
            after = f" (after up to {failures_label} = {max_failures} restarts)" if failures_label else ""
            raise RuntimeError(f"the Ray run {name!r} failed{after}: {error}") from error
        user_error = _rank_errors(result_uri, workers)
        if user_error is not None:
            raise user_error
        if getattr(result, "error", None) is not None:  # older Rays return the error instead of raising it
            raise RuntimeError(f"the Ray run {name!r} failed: {result.error}")
        text = _read_text(result_uri)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        run_dir = result.path
    finally:
        session.close()
        if owned_storage:
            shutil.rmtree(storage, ignore_errors=True)
    payload = unpack(json.loads(text) if text else None, f"{what} on {workers} Ray worker(s)")
    return RayRun(result=payload, run_dir=run_dir, checkpoint=checkpoint)
