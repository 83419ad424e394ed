"""``mcdist compare``: train one model per name on the same MQAR task, reload each saved model and score it at the
training length and at 2× and 4× it.

A model name is ``attention`` (the softmax-attention baseline, ``model.mixer = "attention"``), an aggregation
(``model.mixer = "mc"`` with that ``model.aggregation`` over the config's ``model.memory``; ``none`` is the base
RNN), or ``<memory>:<aggregation>`` (e.g. ``titans:grm``, ``linear:none``), which also sets ``model.memory``.
Every model trains with the real trainer (:func:`mcdist.train.trainer.run_training`) on the same data stream, locally
(:func:`~mcdist.train.trainer.launch_local`: ``parallel.dp · parallel.sp`` processes) or through Ray
(:func:`~mcdist.train.ray_job.train_with_ray`, one Ray for all the runs), so the two give the same numbers for the
same config and seed. The scores are those of ``mcdist eval`` on the saved model
(:func:`mcdist.evaluation.evaluate_checkpoint`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Mapping, Optional, Sequence

from mcdist.config import AGGREGATIONS, MEMORY_KINDS, ConfigError, RunConfig
from mcdist.evaluation import evaluate_checkpoint
from mcdist.train.checks import check_run
from mcdist.train.ray_job import check_workers, ray_session, train_with_ray
from mcdist.train.trainer import launch_local

__all__ = ["LENGTH_FACTORS", "MODEL_NAMES", "compare_aggregations", "compare_models", "model_overrides",
           "parse_model_names"]

LENGTH_FACTORS = (1, 2, 4)  # each saved model is scored at these multiples of train.seq_len
MODEL_NAMES = ("attention",) + AGGREGATIONS  # and "<memory>:<aggregation>" for each of MEMORY_KINDS


def model_overrides(name: str) -> list[str]:
    """The ``--set`` overrides that make the shared run into model ``name`` (see :data:`MODEL_NAMES`)."""
    if name == "attention":
        return ["model.mixer=attention"]
    if name in AGGREGATIONS:
        return ["model.mixer=mc", f"model.aggregation={name}"]
    memory, _, aggregation = name.partition(":")
    if memory in MEMORY_KINDS and aggregation in AGGREGATIONS:
        return ["model.mixer=mc", f"model.memory={memory}", f"model.aggregation={aggregation}"]
    raise ConfigError(f"model {name!r} is unknown; expected one of {list(MODEL_NAMES)} or <memory>:<aggregation> "
                      f"with a memory of {list(MEMORY_KINDS)} (e.g. titans:grm)")


def parse_model_names(text: str, option: str = "--models") -> list[str]:
    """The model names of a comma-separated list such as ``"attention,grm,none"``, each checked, none twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{option} = {text!r} is empty; expected a comma-separated list such as attention,grm,none")
    for name in names:
        try:
            model_overrides(name)
        except ConfigError:
            raise ConfigError(f"{option}: model {name!r} is unknown; expected names from {list(MODEL_NAMES)} or "
                              f"<memory>:<aggregation> with a memory of {list(MEMORY_KINDS)} (e.g. titans:grm)") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{option} = {text!r} names {repeated} more than once; expected each model once")
    return names


def compare_models(base: RunConfig, names: Sequence[str], *, ray: bool = False,
                   overrides_for: Optional[Mapping[str, Sequence[str]]] = None,
                   log: Optional[Callable[[str], None]] = print) -> dict:
    """Train one model per name (locally, or through Ray with ``ray``), reload each and score it.

    Args:
        base: the shared run; each model trains into ``<train.out_dir>/<name>``.
        names: model names (:data:`MODEL_NAMES`), e.g. ``["attention", "grm", "none"]``.
        ray: train through Ray Train (``ray.*`` and ``parallel.*`` of ``base``); else on local processes.
        overrides_for: extra ``section.key=value`` overrides of one model, by name, applied after its own.
        log: receives progress lines; ``None`` is silent.

    Returns:
        ``{name: {"eval_accuracy", "eval_loss" (of the reloaded model, on the evaluation batches the trainer
        scores), "accuracy_at", "eval_loss_at" ({"<length>": value} at 2× and 4× the training length: the same
        task with more filler between keys and queries), "train_loss" (the last step's), "train_eval_accuracy"
        (the trainer's last evaluation), "final_model", "train_seconds", "seconds" (the whole run, Ray included),
        "tokens_per_s", "num_params"}}``.

    Raises:
        ConfigError: ``train.task`` is not mqar, a name is unknown or repeated, ``overrides_for`` names a model
            not compared, or a run cannot start (every run is checked before any trains).
        RuntimeError: a run ended before ``train.steps``.
    """
    if base.train.task != "mqar":
        raise ConfigError(f"train.task = {base.train.task!r}: the comparison scores MQAR recall; expected 'mqar'")
    names = parse_model_names(",".join(names), "models")
    overrides_for = dict(overrides_for or {})
    stray = sorted(set(overrides_for) - set(names))
    if stray:
        raise ConfigError(f"per-model overrides name {stray}, which are not compared; expected names from {names}")
    runs = {name: base.with_overrides(model_overrides(name) + list(overrides_for.get(name, ()))
                                      + [f"train.out_dir={os.path.join(base.train.out_dir, name)}"])
            for name in names}
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
                             "seconds": seconds, "tokens_per_s": trained.get("tokens_per_s"),
                             "num_params": trained.get("num_params")}
    return results


def compare_aggregations(base: RunConfig, aggregations: Sequence[str], *, ray: bool = False,
                         log: Optional[Callable[[str], None]] = print) -> dict:
    """:func:`compare_models` over aggregation names (the MC mixer with each ``model.aggregation``)."""
    for name in aggregations:
        if name not in AGGREGATIONS:
            raise ConfigError(f"aggregation {name!r} is unknown; expected one of {list(AGGREGATIONS)}")
    return compare_models(base, aggregations, ray=ray, log=log)
