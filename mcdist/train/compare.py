"""``mcdist compare``: train one model per aggregation on the same MQAR task, reload each saved model and score
it at the training length and at 2× and 4× it.

Every aggregation trains with the real trainer (:func:`mcdist.train.trainer.run_training`) on the same data
stream, locally (:func:`~mcdist.train.trainer.launch_local`: ``parallel.dp · parallel.sp`` processes) or through
Ray (:func:`~mcdist.train.ray_job.train_with_ray`, one Ray for all the runs), so the two give the same numbers for
the same config and seed. The scores are those of ``mcdist eval`` on the saved model
(:func:`mcdist.evaluation.evaluate_checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Optional, Sequence

from mcdist.config import ConfigError, RunConfig
from mcdist.evaluation import evaluate_checkpoint
from mcdist.train.checks import check_run
from mcdist.train.ray_job import check_workers, ray_session, train_with_ray
from mcdist.train.trainer import launch_local

__all__ = ["LENGTH_FACTORS", "compare_aggregations"]

LENGTH_FACTORS = (1, 2, 4)  # each saved model is scored at these multiples of train.seq_len


def compare_aggregations(base: RunConfig, aggregations: Sequence[str], *, ray: bool = False,
                         log: Optional[Callable[[str], None]] = print) -> dict:
    """Train one model per aggregation (locally, or through Ray with ``ray``), reload each and score it.

    Args:
        base: the shared run; each aggregation trains into ``<train.out_dir>/<aggregation>``.
        aggregations: ``model.aggregation`` values, e.g. ``["grm", "none"]``.
        ray: train through Ray Train (``ray.*`` and ``parallel.*`` of ``base``); else on local processes.
        log: receives progress lines; ``None`` is silent.

    Returns:
        ``{aggregation: {"eval_accuracy", "eval_loss" (of the reloaded model, on the evaluation batches the
        trainer scores), "accuracy_at", "eval_loss_at" ({"<length>": value} at 2× and 4× the training length:
        the same task with more filler between keys and queries), "train_loss" (the last step's),
        "train_eval_accuracy" (the trainer's last evaluation), "final_model", "train_seconds", "seconds" (the
        whole run, Ray included), "tokens_per_s"}}``.

    Raises:
        ConfigError: ``train.task`` is not mqar, or a run cannot start (every run is checked before any trains).
        RuntimeError: a run ended before ``train.steps``.
    """
    if base.train.task != "mqar":
        raise ConfigError(f"train.task = {base.train.task!r}: the comparison scores MQAR recall; expected 'mqar'")
    runs = {name: base.with_overrides([f"model.aggregation={name}",
                                       f"train.out_dir={os.path.join(base.train.out_dir, name)}"])
            for name in aggregations}
    for run in runs.values():
        if ray:
            check_workers(run)
        check_run(run)
    say = log or (lambda line: None)
    results = {}
    with ray_session(base, log) if ray else contextlib.nullcontext():
        for name, run in runs.items():
            say(f"== {name}: training {'through Ray' if ray else 'locally'} ==")
            started = time.perf_counter()
            trained = train_with_ray(run, log=log) if ray else launch_local(run)
            seconds = time.perf_counter() - started
            if not trained.get("final_model"):
                raise RuntimeError(f"the {name} run ended at step {trained.get('step')} before train.steps = "
                                   f"{run.train.steps} and saved no final model")
            scored, *longer = evaluate_checkpoint(trained["final_model"], run, device=run.train.device,
                                                  seq_lens=[factor * run.train.seq_len for factor in LENGTH_FACTORS])
            say(f"== {name}: reloaded {trained['final_model']}: accuracy {scored['eval_accuracy']:.4f}, loss "
                f"{scored['eval_loss']:.4f} ==")
            results[name] = {"eval_accuracy": scored["eval_accuracy"], "eval_loss": scored["eval_loss"],
                             "accuracy_at": {str(e["seq_len"]): e["eval_accuracy"] for e in longer},
                             "eval_loss_at": {str(e["seq_len"]): e["eval_loss"] for e in longer},
                             "train_loss": trained["loss"], "train_eval_accuracy": trained.get("eval_accuracy"),
                             "final_model": trained["final_model"], "train_seconds": trained.get("elapsed_s"),
                             "seconds": seconds, "tokens_per_s": trained.get("tokens_per_s")}
    return results
