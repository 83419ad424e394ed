"""The ``mcdist`` command: ``train``, ``eval``, ``compare`` and ``bench``.

``python -m mcdist.cli ...`` is the same as ``mcdist ...``. A run is described by a RunConfig file (JSON, or
TOML when the name ends in ``.toml``) plus ``--set section.key=value`` overrides, applied in order. Errors
in the input (bad config, missing checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mcdist.config import ConfigError, RunConfig

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcdist", description="Recurrent models with Memory Caching.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config_args(sub: argparse.ArgumentParser, config_help: str) -> None:
        sub.add_argument("--config", metavar="FILE", help=config_help)
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config field (repeatable; values are JSON, else strings)")
        sub.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")

    train = commands.add_parser("train", help="train a model on MQAR and save out_dir/checkpoint")
    add_config_args(train, "RunConfig file (.json or .toml); defaults when omitted")
    train.add_argument("--quiet", action="store_true", help="print only the final JSON line")

    evaluate = commands.add_parser("eval", help="report MQAR accuracy of a saved checkpoint")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="folder written by `mcdist train`")
    add_config_args(evaluate, "RunConfig for the task sizes; default: run_config.json beside the checkpoint")
    evaluate.add_argument("--batches", type=int, default=None, help="batches to score (default train.eval_batches)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="data seed (default: the training run's evaluation seed)")

    compare = commands.add_parser("compare", help="train one model per aggregation on the same task")
    add_config_args(compare, "RunConfig file shared by every run")
    compare.add_argument("--aggregations", default="grm,none",
                         help="comma-separated model.aggregation values (default grm,none)")
    compare.add_argument("--quiet", action="store_true", help="print only the summary")

    bench = commands.add_parser("bench", help="run the benchmarks (arguments go to mcdist.bench)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m mcdist.bench")
    return parser


def _load_run_config(path: str | None, overrides: list[str], fallback: str | None = None) -> RunConfig:
    source = path or (fallback if fallback and os.path.isfile(fallback) else None)
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    run_config = RunConfig.load(source) if source else RunConfig()
    return run_config.with_overrides(overrides)


def _cmd_train(args) -> int:
    from mcdist.train import train

    run_config = _load_run_config(args.config, args.overrides)
    result = train(run_config, device=args.device, log=None if args.quiet else print)
    print(json.dumps(result, sort_keys=True))
    return 0


def _cmd_eval(args) -> int:
    import torch

    from mcdist.checkpoint import load_model
    from mcdist.train.simple import EVAL_SEED_OFFSET, check_task, evaluate_mqar, resolve_device

    model_overrides = [item for item in args.overrides if item.strip().startswith("model.")]
    if model_overrides:
        raise UsageError(f"--set {model_overrides[0]}: eval takes the model section from the checkpoint's "
                         "config.json; expected only train.* overrides (task sizes, seed)")
    checkpoint = os.fspath(args.checkpoint)
    fallback = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "run_config.json")
    run_config = _load_run_config(args.config, args.overrides, fallback=fallback)
    device = resolve_device(args.device)
    model, model_config = load_model(checkpoint, map_location=device)
    run_config = run_config.replace(model=model_config)
    check_task(run_config)
    train_cfg = run_config.train
    if args.batches is not None and args.batches <= 0:
        raise UsageError(f"--batches = {args.batches} is invalid; expected a positive integer")
    seed = train_cfg.seed + EVAL_SEED_OFFSET if args.seed is None else args.seed
    with torch.no_grad():
        result = evaluate_mqar(model, batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
                               num_kv_pairs=train_cfg.num_kv_pairs, vocab_size=model_config.vocab_size,
                               num_batches=args.batches or train_cfg.eval_batches, seed=seed, device=device,
                               dtype=train_cfg.dtype)
    print(json.dumps({"checkpoint": checkpoint, "seq_len": train_cfg.seq_len,
                      "num_kv_pairs": train_cfg.num_kv_pairs, **result}, sort_keys=True))
    return 0


def _cmd_compare(args) -> int:
    from mcdist.train import train

    aggregations = [name.strip() for name in args.aggregations.split(",") if name.strip()]
    if not aggregations:
        raise UsageError("--aggregations is empty; expected a comma-separated list such as grm,none")
    base = _load_run_config(args.config, args.overrides)
    results = {}
    for aggregation in aggregations:
        out_dir = os.path.join(base.train.out_dir, aggregation)
        run_config = base.with_overrides([f"model.aggregation={aggregation}", f"train.out_dir={out_dir}"])
        if not args.quiet:
            print(f"== {aggregation} ==")
        results[aggregation] = train(run_config, device=args.device, log=None if args.quiet else print)
    print(f"MQAR: seq_len {base.train.seq_len}, {base.train.num_kv_pairs} key-value pairs, "
          f"memory {base.model.memory}, segment_len {base.model.segment_len}")
    for aggregation, result in results.items():
        print(f"  {aggregation:<9} accuracy {result['eval_accuracy']:.3f}  eval loss {result['eval_loss']:.3f}  "
              f"({result['elapsed_s']:.0f} s)")
    print(json.dumps({name: {"eval_accuracy": r["eval_accuracy"], "eval_loss": r["eval_loss"]}
                      for name, r in results.items()}, sort_keys=True))
    return 0


def _cmd_bench(args) -> int:
    try:
        from mcdist import bench
    except ImportError as error:
        raise UsageError(f"the benchmarks are not available: {error}") from error

    bench_args = list(args.bench_args)
    if bench_args and bench_args[0] == "--":
        bench_args = bench_args[1:]
    result = bench.main(bench_args)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    from mcdist.checkpoint import CheckpointError

    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse already printed its message
        return int(stop.code or 0)
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "compare": _cmd_compare, "bench": _cmd_bench}
    try:
        return handlers[args.command](args)
    except (ConfigError, CheckpointError, UsageError, FileNotFoundError) as error:
        print(f"mcdist {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as error:
        print(f"mcdist {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"mcdist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
