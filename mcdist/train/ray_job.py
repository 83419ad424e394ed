"""Run :func:`mcdist.train.trainer.run_training` through Ray Train: workers, restarts and checkpoints by Ray.

:func:`train_with_ray` runs one rank of ``run_training`` on each of ``ray.workers`` Ray Train workers through
:func:`mcdist.runners.ray.run_on_ray` (connecting, GPUs, the process group and the result file are that
module's). What Ray sees of a run (:class:`RayCallbacks`, called on every rank because ``ray.train.report`` is a
barrier across the workers):

* every metrics record of the trainer (``{"kind": "train" | "eval", "step", ...}``) is a ``ray.train.report``;
* every training checkpoint, once it is complete on disk (``<out_dir>/checkpoints/step-N``, renamed into place),
  is reported from rank 0 with ``Checkpoint.from_directory``: Ray copies it to
  ``<storage_path>/<name>/step-N`` and keeps the last ``train.keep_last``;
* when a worker dies, Ray restarts the whole group (up to ``ray.max_failures`` times) and each worker's
  :meth:`RayCallbacks.resume_from` returns the latest reported checkpoint, so the run continues from it (the
  trainer verifies it and refuses a corrupt or incompatible one).

Choices this module makes:

* Paths: Ray Train runs workers in a folder of its own, so a relative ``train.out_dir`` is taken relative to the
  driver's working directory when that folder exists on the worker's machine (always, on one machine), else
  relative to the worker's working directory (a ``ray job submit --working-dir`` copy). A relative
  ``ray.storage_path`` is made absolute on the driver; ``""`` means ``<train.out_dir>/ray``. On a cluster of
  several machines the storage path must be shared (NFS, ``s3://``, ``gs://``) for restarts on another node.
* The Ray run is named after ``train.out_dir``. With ``train.resume = auto`` the name is fixed, so a new
  ``mcdist train --ray`` continues from the run's last reported checkpoint; with ``never`` or a path, the name
  gets a timestamp and only restarts within this job resume from Ray's checkpoints.
* Worker output: the progress bar is off on the workers (``TQDM_DISABLE``, :mod:`mcdist.runners.ray`); rank 0
  prints a line per training record instead.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import inspect
import os
import tempfile
import time
from typing import Callable, Iterator, Optional

from mcdist.config import ConfigError, RunConfig
from mcdist.runners.ray import RaySession, json_safe, run_on_ray
from mcdist.train.checks import check_run
from mcdist.train.trainer import TrainCallbacks, run_training

__all__ = ["RayCallbacks", "check_workers", "ray_session", "run_name", "train_with_ray"]


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
        ray.train.report(json_safe(metrics))
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
        ray.train.report(json_safe({"kind": "checkpoint", "step": step, **metrics}), checkpoint=checkpoint,
                         **options)
        if self.extra is not None:
            self.extra.on_checkpoint(step, path, metrics)

    def resume_from(self) -> Optional[str]:
        """The latest checkpoint Ray holds for this run (after a restart), downloaded when it is remote."""
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return self.extra.resume_from() if self.extra is not None else None
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem) and os.path.isdir(checkpoint.path):
            return checkpoint.path
        folder = self.restore_dir or tempfile.mkdtemp(prefix="mcdist-ray-restore-")
        return checkpoint.to_directory(os.path.join(folder, os.path.basename(checkpoint.path.rstrip("/"))))

    def should_stop(self, step: int) -> bool:
        return self.extra.should_stop(step) if self.extra is not None else False


def _train_on_ray_rank(rank: int, world_size: int, device: str, where: str, config_data: dict,
                       driver_cwd: str, callbacks: Optional[TrainCallbacks]) -> dict:
    """One Ray worker's rank of ``run_training`` (a :mod:`mcdist.runners` rank function; the trainer picks its
    device from ``train.device``, which is the GPU Ray gave the worker when it gave one)."""
    import ray

    print(f"ray: worker rank {rank}/{world_size} on node {ray.get_runtime_context().get_node_id()[:12]} "
          f"(pid {os.getpid()})", flush=True)
    config = RunConfig.from_dict(config_data)
    out_dir = config.train.out_dir
    if not os.path.isabs(out_dir) and driver_cwd and os.path.isdir(driver_cwd):
        config = config.replace(train=config.train.replace(out_dir=os.path.join(driver_cwd, out_dir)))
    bar_is_off = config.train.progress and importlib.util.find_spec("tqdm") is not None  # TQDM_DISABLE=1
    hooks = RayCallbacks(callbacks, restore_dir=os.path.join(config.train.out_dir, "ray_restored"),
                         step_lines_of=config.train.steps if bar_is_off else None)
    return run_training(config, callbacks=hooks)


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


@contextlib.contextmanager
def ray_session(config: RunConfig, log: Optional[Callable[[str], None]] = print) -> Iterator[str]:
    """Connect to (or start) Ray as ``config.ray`` says for the ``with`` block; yields a description of it.

    Runs of :func:`train_with_ray` inside the block reuse this Ray (a local one is started once, not per run).
    """
    session = RaySession(config.ray.address, config.ray.workers * config.ray.cpus_per_worker,
                         log or (lambda line: None))
    try:
        yield session.description
    finally:
        session.close()


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
    check_workers(config)
    check_run(config)
    start = time.perf_counter()
    parallel = config.parallel
    run = run_on_ray(_train_on_ray_rank, config.to_dict(), os.getcwd(), callbacks, workers=config.ray.workers,
                     what="mcdist train --ray", name=run_name(config),
                     describe=f"training (dp {parallel.dp} × sp {parallel.sp})", address=config.ray.address,
                     use_gpu=config.ray.use_gpu, device=config.train.device,
                     cpus_per_worker=config.ray.cpus_per_worker, backend=parallel.backend,
                     storage_path=_storage_path(config), timeout_s=parallel.timeout_s,
                     max_failures=config.ray.max_failures, failures_label="ray.max_failures",
                     keep_last=config.train.keep_last, log=log)
    return {**run.result, "ray_run_dir": run.run_dir, "ray_checkpoint": run.checkpoint,
            "ray_seconds": time.perf_counter() - start}
