"""Run :func:`mcdist.train.trainer.run_training` through Ray Train: workers, restarts and checkpoints by Ray.

:func:`train_with_ray` connects to Ray (or starts a local instance), then runs a ``TorchTrainer`` whose
``ray.workers`` workers each call ``run_training`` on one rank of the ``dp × sp`` mesh. Ray Train creates the
process group (gloo on CPUs, NCCL on GPUs) before the trainer runs; ``init_distributed`` sees it initialised
and leaves it alone. The plumbing (connecting: ``_RaySession``; ``wants_gpu``, ``scaling_config``,
``ray_run_config``, ``run_workers`` and the result file, ``write_text``) also serves
:func:`mcdist.infer_job.generate_with_ray`.

What Ray sees of a run (:class:`RayCallbacks`, called on every rank because ``ray.train.report`` is a barrier
across the workers):

* every metrics record of the trainer (``{"kind": "train" | "eval", "step", ...}``) is a ``ray.train.report``;
* every training checkpoint, once it is complete on disk (``<out_dir>/checkpoints/step-N``, renamed into place),
  is reported from rank 0 with ``Checkpoint.from_directory``: Ray copies it to
  ``<storage_path>/<name>/step-N`` and keeps the last ``train.keep_last``;
* when a worker dies, Ray restarts the whole group (up to ``ray.max_failures`` times) and each worker's
  :meth:`RayCallbacks.resume_from` returns the latest reported checkpoint, so the run continues from it (the
  trainer verifies it and refuses a corrupt or incompatible one).

Choices this module makes:

* ``ray.address``: ``""`` joins the Ray that ``RAY_ADDRESS`` or the last ``ray start`` on this machine names when
  it answers, else starts a local Ray sized for the job (``ray.workers × ray.cpus_per_worker`` CPUs, a small
  object store, Ray's headless API server on 127.0.0.1) and stops it afterwards; ``"auto"`` must find a running
  one; ``host:port`` or ``ray://host:port`` is probed with a TCP connection first, so an unreachable cluster
  fails in seconds with an error naming the address (``ray.init`` alone would retry for minutes). The driver
  presents Ray's auth token (``~/.ray/auth_token``) when there is one.
* GPUs: one per worker when ``ray.use_gpu`` is true or ``train.device`` is ``cuda``, or when ``train.device`` is
  ``auto`` and the cluster has at least one GPU per worker; never when ``train.device`` is ``cpu``.
* Paths: Ray Train runs workers in a folder of its own, so a relative ``train.out_dir`` is taken relative to the
  driver's working directory when that folder exists on the worker's machine (always, on one machine), else
  relative to the worker's working directory (a ``ray job submit --working-dir`` copy). A relative
  ``ray.storage_path`` is made absolute on the driver; ``""`` means ``<train.out_dir>/ray``. On a cluster of
  several machines the storage path must be shared (NFS, ``s3://``, ``gs://``) for restarts on another node.
* The Ray run is named after ``train.out_dir``. With ``train.resume = auto`` the name is fixed, so a new
  ``mcdist train --ray`` continues from the run's last reported checkpoint; with ``never`` or a path, the name
  gets a timestamp and only restarts within this job resume from Ray's checkpoints.
* Worker output: ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` (each line printed once) and ``TQDM_DISABLE=1`` (a
  progress bar cannot redraw through Ray's log forwarding; rank 0 prints a line per training record instead);
  Ray Train's own logs at WARNING. Ray prefixes each forwarded line with ``(RayTrainWorker pid=...)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import inspect
import json
import os
import socket
import time
from typing import Callable, Iterator, Optional
from urllib.parse import urlsplit

from mcdist.config import ConfigError, RunConfig
from mcdist.train.trainer import TrainCallbacks, check_run

CONNECT_TIMEOUT_S = 5.0
OBJECT_STORE_BYTES = 256 * 1024 * 1024
RESULT_NAME = "mcdist_result.json"
SKIPPED_WORKER_LINES = r"Failed to query Ray Train Controller actor state"
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TQDM_DISABLE": "1"}


class RayConnectionError(ConnectionError):
    """The Ray cluster named by ``ray.address`` cannot be reached (the message names the address)."""


# -- callbacks -------------------------------------------------------------------------------------------------


def _json_safe(value):
    """Metrics as plain Python (Ray refuses tensors): numbers, strings, None, and dicts/lists of them."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class RayCallbacks(TrainCallbacks):
    """The trainer's hooks inside a Ray Train worker: report metrics and checkpoints, resume after a restart.

    Args:
        extra: more callbacks, called after this one's (``all_ranks`` is true here, so they run on every rank
            too and must check the rank themselves when it matters).
        restore_dir: where a checkpoint held on remote storage (``s3://`` ...) is downloaded to resume from it.
        step_lines_of: print a line per training record on rank 0 (``step N/step_lines_of  loss ...``), for
            workers whose progress bar is off (``TQDM_DISABLE``), in which case the trainer prints none.
    """

    all_ranks = True

    def __init__(self, extra: Optional[TrainCallbacks] = None, *, restore_dir: Optional[str] = None,
                 step_lines_of: Optional[int] = None):
        self.extra = extra
        self.restore_dir = restore_dir
        self.step_lines_of = step_lines_of

    @staticmethod
    def _rank() -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def on_metrics(self, metrics: dict) -> None:
        import ray.train

        if self.step_lines_of and metrics.get("kind") == "train" and self._rank() == 0:
            print(f"step {metrics['step']:>6}/{self.step_lines_of}  loss {metrics['loss']:.4f}  lr "
                  f"{metrics['lr']:.2e}  gnorm {metrics['grad_norm']:.3f}  {metrics['tokens_per_s']:,.0f} tok/s",
                  flush=True)
        ray.train.report(_json_safe(metrics))
        if self.extra is not None:
            self.extra.on_metrics(metrics)

    def on_checkpoint(self, step: int, path: str, metrics: dict) -> None:
        import ray.train

        checkpoint = None
        if self._rank() == 0:  # the trainer renamed it into place: it is complete on disk
            checkpoint = ray.train.Checkpoint.from_directory(os.path.abspath(path))
        options = {}
        if "checkpoint_dir_name" in inspect.signature(ray.train.report).parameters:  # Ray Train V2 only
            options["checkpoint_dir_name"] = os.path.basename(os.path.normpath(path))
        ray.train.report(_json_safe({"kind": "checkpoint", "step": step, **metrics}), checkpoint=checkpoint,
                         **options)
        if self.extra is not None:
            self.extra.on_checkpoint(step, path, metrics)

    def resume_from(self) -> Optional[str]:
        """The latest checkpoint Ray holds for this run (after a restart), downloaded when it is remote."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return self.extra.resume_from() if self.extra is not None else None
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
            return checkpoint.path
        import tempfile

        folder = self.restore_dir or tempfile.mkdtemp(prefix="mcdist-ray-restore-")
        return checkpoint.to_directory(os.path.join(folder, os.path.basename(checkpoint.path.rstrip("/"))))

    def should_stop(self, step: int) -> bool:
        return self.extra.should_stop(step) if self.extra is not None else False


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO on the console through a logger named after its file, which its
    LoggingConfig does not reach; one line per metrics record would drown the trainer's own lines."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as report_module
    except ImportError:  # another Ray layout: leave its logging as it is
        return
    for name in (report_module.__name__, getattr(report_module, "__file__", None)):
        if name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _train_loop_per_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs: one rank of ``run_training``, then a final report."""
    import ray
    import ray.train

    _quiet_report_log()
    context = ray.train.get_context()
    print(f"ray: worker rank {context.get_world_rank()}/{context.get_world_size()} on node "
          f"{ray.get_runtime_context().get_node_id()[:12]} (pid {os.getpid()})", flush=True)
    config = RunConfig.from_dict(loop_config["config"])
    driver_cwd = loop_config.get("driver_cwd")
    out_dir = config.train.out_dir
    if not os.path.isabs(out_dir) and driver_cwd and os.path.isdir(driver_cwd):
        config = config.replace(train=config.train.replace(out_dir=os.path.join(driver_cwd, out_dir)))
    from mcdist.train.trainer import run_training

    bar_is_off = config.train.progress and importlib.util.find_spec("tqdm") is not None  # TQDM_DISABLE=1
    callbacks = RayCallbacks(loop_config.get("callbacks"),
                             restore_dir=os.path.join(config.train.out_dir, "ray_restored"),
                             step_lines_of=config.train.steps if bar_is_off else None)
    result = _json_safe(run_training(config, callbacks=callbacks))
    if ray.train.get_context().get_world_rank() == 0 and loop_config.get("result_uri"):
        write_text(loop_config["result_uri"], json.dumps(result, sort_keys=True))
    ray.train.report({"kind": "result", **result})


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to a local path or a pyarrow filesystem URI (s3://, gs://) in the Ray storage path."""
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


def _host_port(address: str) -> Optional[tuple[str, int]]:
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
    target = _host_port(address)
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


def _skip_state_api_warnings() -> None:
    """Drop one warning from the driver's copy of the workers' output: Ray Train's placement-group cleaner asks
    the state API, which needs the dashboard packages of ``ray[default]``, about the controller every second
    and, without them, says it could not, every second. Ray reads the skip pattern when it is imported."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", SKIPPED_WORKER_LINES)
    try:  # Ray imported already (tests): its deduplicators hold the pattern they read then
        import re

        from ray._private import ray_logging

        for deduplicator in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            if getattr(deduplicator, "skip_re", True) is None:
                deduplicator.skip_re = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    except (ImportError, AttributeError):
        pass


class _RaySession:
    """``ray.init`` as ``address`` says (``ray.address``: ``""``, ``"auto"``, ``host:port``, ``ray://host:port``); a
    local Ray started here gets ``num_cpus``. ``close`` shuts down only what this session started or joined."""

    def __init__(self, address: str, num_cpus: int, log: Callable[[str], None]):
        _skip_state_api_warnings()
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
            if existing and _host_port(existing) and _answers(existing):
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


def _session_for(config: RunConfig, log: Callable[[str], None]) -> _RaySession:
    return _RaySession(config.ray.address, config.ray.workers * config.ray.cpus_per_worker, log)


@contextlib.contextmanager
def ray_session(config: RunConfig, log: Optional[Callable[[str], None]] = print) -> Iterator[str]:
    """Connect to (or start) Ray as ``config.ray`` says for the ``with`` block; yields a description of it.

    Runs of :func:`train_with_ray` inside the block reuse this Ray (a local one is started once, not per run).
    """
    session = _session_for(config, log or (lambda line: None))
    try:
        yield session.description
    finally:
        session.close()


def _answers(address: str) -> bool:
    try:
        check_reachable(address, timeout_s=2.0)
        return True
    except (RayConnectionError, ConfigError):
        return False


# -- the job ---------------------------------------------------------------------------------------------------


def check_workers(config: RunConfig) -> None:
    """Refuse a Ray run whose worker count is not the mesh size ``parallel.dp · parallel.sp``."""
    world = config.parallel.world_size
    if config.ray.workers != world:
        raise ConfigError(f"ray.workers = {config.ray.workers} does not equal parallel.dp · parallel.sp = "
                          f"{config.parallel.dp} · {config.parallel.sp} = {world}; expected them equal (one Ray "
                          "worker per rank: `--workers N --sp P` sets dp = N / P)")


def _storage_path(config: RunConfig) -> str:
    path = config.ray.storage_path or os.path.join(config.train.out_dir, "ray")
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def run_name(config: RunConfig) -> str:
    """The Ray run's name: fixed per ``out_dir`` when ``train.resume = auto``, else with a timestamp."""
    base = "mcdist-" + (os.path.basename(os.path.normpath(config.train.out_dir)) or "run")
    if config.train.resume == "auto":
        return base
    return base + datetime.datetime.now().strftime("-%Y%m%d-%H%M%S")


def wants_gpu(use_gpu: bool, device: str, workers: int) -> bool:
    """One GPU per worker when ``use_gpu`` is true or ``device`` is ``cuda...``, or when ``device`` is ``auto`` and the
    cluster has at least one GPU per worker; never when ``device`` is ``cpu`` (and ``use_gpu`` false). Needs Ray
    connected."""
    if use_gpu or device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) >= workers


def _supported(cls, **kwargs) -> dict:
    """The keyword arguments ``cls`` (a Ray config dataclass) knows: older Rays lack some."""
    if dataclasses.is_dataclass(cls):
        known = {field.name for field in dataclasses.fields(cls)}
        return {key: value for key, value in kwargs.items() if key in known}
    return kwargs


def require_ray_train(command: str) -> None:
    """Raise an ImportError naming ``command`` and how to install Ray Train when it cannot be imported."""
    try:
        importlib.import_module("ray.train.torch")
    except ImportError as error:
        raise ImportError(f"{command} needs Ray Train ({error}); install it with "
                          "`pip install 'mcdist[ray]'` (make setup does)") from error


def scaling_config(workers: int, use_gpu: bool, cpus_per_worker: int):
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


def ray_run_config(storage_path: str, name: str, max_failures: int, keep_last: Optional[int] = None):
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


def run_workers(loop: Callable[[dict], None], loop_config: dict, *, workers: int, use_gpu: bool,
                cpus_per_worker: int, backend: str, timeout_s: float, storage_path: str, name: str,
                max_failures: int, keep_last: Optional[int] = None,
                failures_label: Optional[str] = None) -> tuple[object, Optional[str]]:
    """Run ``loop(loop_config)`` on ``workers`` Ray Train workers, one per rank of a process group (``backend``,
    collectives time out after ``timeout_s``), and wait for it. Ray must be connected.

    ``loop_config["result_uri"]`` is set to ``<storage_path>/<name>/mcdist_result.json`` (a previous job's is
    deleted first): rank 0 writes its result there with :func:`write_text`, since Ray keeps only the metrics
    reported with a checkpoint. ``failures_label`` names the setting behind ``max_failures`` in the error.

    Returns:
        ``(result, text)``: Ray's Result and the text of the result file (``None`` when nothing wrote it).

    Raises:
        RuntimeError: the run failed (after up to ``max_failures`` restarts); the message carries the workers' error.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    result_uri = f"{storage_path.rstrip('/')}/{name}/{RESULT_NAME}"
    _delete(result_uri)  # a previous job's, under the same name
    trainer = TorchTrainer(loop, train_loop_config={**loop_config, "result_uri": result_uri},
                           scaling_config=scaling_config(workers, use_gpu, cpus_per_worker),
                           run_config=ray_run_config(storage_path, name, max_failures, keep_last),
                           torch_config=TorchConfig(backend=backend, timeout_s=int(timeout_s)))
    try:
        result = trainer.fit()
    except Exception as error:  # TrainingFailedError: the workers' error is in the message
        after = f" (after up to {failures_label} = {max_failures} restarts)" if failures_label else ""
        raise RuntimeError(f"the Ray run {name!r} failed{after}: {error}") from error
    if getattr(result, "error", None) is not None:  # older Rays return the error instead of raising it
        raise RuntimeError(f"the Ray run {name!r} failed: {result.error}")
    return result, _read_text(result_uri)


def train_with_ray(
    config: RunConfig,
    *,
    callbacks: Optional[TrainCallbacks] = None,
    log: Optional[Callable[[str], None]] = print,
) -> dict:
    """Train ``config`` on ``ray.workers`` Ray Train workers (one per rank of the dp × sp mesh).

    Args:
        config: the run; ``ray.workers`` must equal ``parallel.dp · parallel.sp``.
        callbacks: extra callbacks for every worker (pickled; see :class:`RayCallbacks`), e.g. to stop early.
        log: receives the driver's few lines (which Ray, where the run is stored); ``None`` is silent.

    Returns:
        The trainer's final metrics (as ``run_training`` returns them), plus ``ray_run_dir`` (the run's folder in
        the storage path), ``ray_checkpoint`` (Ray's copy of the last checkpoint, or ``None``) and
        ``ray_seconds`` (wall-clock time of the whole Ray job, connection included).

    Raises:
        ConfigError: the config cannot run (checked before Ray starts). RayConnectionError: ``ray.address``
            cannot be reached. ImportError: Ray Train is not installed. RuntimeError: the run failed more than
            ``ray.max_failures`` times (the message carries the workers' error).
    """
    say = log or (lambda line: None)
    check_workers(config)
    check_run(config)
    require_ray_train("mcdist train --ray")

    start = time.perf_counter()
    session = _session_for(config, say)
    try:
        use_gpu = wants_gpu(config.ray.use_gpu, config.train.device, config.ray.workers)
        backend = config.parallel.backend
        if backend == "auto":
            backend = "nccl" if use_gpu else "gloo"
        storage_path, name = _storage_path(config), run_name(config)
        loop_config = {"config": config.to_dict(), "driver_cwd": os.getcwd(), "callbacks": callbacks}
        say(f"ray: {config.ray.workers} worker(s) (dp {config.parallel.dp} × sp {config.parallel.sp}), "
            f"{'1 GPU' if use_gpu else 'no GPU'} + {config.ray.cpus_per_worker} CPU each, {backend}; run "
            f"{os.path.join(storage_path, name)}")
        result, text = run_workers(_train_loop_per_worker, loop_config, workers=config.ray.workers,
                                   use_gpu=use_gpu, cpus_per_worker=config.ray.cpus_per_worker, backend=backend,
                                   timeout_s=config.parallel.timeout_s, storage_path=storage_path, name=name,
                                   max_failures=config.ray.max_failures, keep_last=config.train.keep_last,
                                   failures_label="ray.max_failures")
    finally:
        session.close()
    metrics = json.loads(text) if text else dict(result.metrics or {})
    metrics.pop("kind", None)
    metrics["ray_run_dir"] = result.path
    metrics["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    metrics["ray_seconds"] = time.perf_counter() - start
    return metrics


# -- the main job: grm beside the base RNN ---------------------------------------------------------------------


def compare_with_ray(base: RunConfig, aggregations: list[str], *,
                     log: Optional[Callable[[str], None]] = print) -> dict:
    """Train one model per aggregation through Ray (one Ray for all), reload each saved model and score it.

    Args:
        base: the shared run; each aggregation trains into ``<train.out_dir>/<aggregation>``.
        aggregations: ``model.aggregation`` values, e.g. ``["grm", "none"]``.
        log: receives progress lines; ``None`` is silent.

    Returns:
        ``{aggregation: {"eval_accuracy", "eval_loss"  (of the reloaded checkpoint, on the evaluation batches the
        trainer scores: the numbers of ``mcdist eval``), "accuracy_at", "eval_loss_at" ({"<length>": value} at 2× and
        4× the training length: the same task with more filler between keys and queries), "train_eval_accuracy"
        (the trainer's last evaluation), "final_model", "train_seconds", "ray_seconds", "tokens_per_s"}}``.
    """
    from mcdist.evaluation import evaluate_checkpoint

    if base.train.task != "mqar":
        raise ConfigError(f"train.task = {base.train.task!r}: the comparison scores MQAR recall; expected 'mqar'")
    runs = {name: base.with_overrides([f"model.aggregation={name}",
                                       f"train.out_dir={os.path.join(base.train.out_dir, name)}"])
            for name in aggregations}
    for run in runs.values():  # every config is checked before Ray starts
        check_workers(run)
        check_run(run)
    say = log or (lambda line: None)
    results = {}
    with ray_session(base, log):
        for name, run in runs.items():
            say(f"== {name}: training through Ray ==")
            started = time.perf_counter()
            trained = train_with_ray(run, log=log)
            seconds = time.perf_counter() - started
            if not trained.get("final_model"):
                raise RuntimeError(f"the {name} run ended at step {trained.get('step')} before train.steps = "
                                   f"{run.train.steps} and saved no final model")
            # one load of the saved model, scored at the training length, then at 2× and 4× it
            scored, *longer = evaluate_checkpoint(trained["final_model"], run,
                                                  seq_lens=[length * run.train.seq_len for length in (1, 2, 4)])
            say(f"== {name}: reloaded {trained['final_model']}: accuracy {scored['eval_accuracy']:.4f}, loss "
                f"{scored['eval_loss']:.4f} ==")
            results[name] = {"eval_accuracy": scored["eval_accuracy"], "eval_loss": scored["eval_loss"],
                             "accuracy_at": {str(e["seq_len"]): e["eval_accuracy"] for e in longer},
                             "eval_loss_at": {str(e["seq_len"]): e["eval_loss"] for e in longer},
                             "train_eval_accuracy": trained.get("eval_accuracy"),
                             "final_model": trained["final_model"], "train_seconds": trained.get("elapsed_s"),
                             "ray_seconds": seconds, "tokens_per_s": trained.get("tokens_per_s")}
    return results
