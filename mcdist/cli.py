"""The ``mcdist`` command: ``train``, ``eval``, ``generate``, ``infer``, ``compare``, ``bench``, ``data prepare``
and ``export``.

``python -m mcdist.cli ...`` is the same as ``mcdist ...``. A run is described by a RunConfig file (JSON, or
TOML when the name ends in ``.toml``) plus ``--set section.key=value`` overrides, applied in order. Errors
in the input (bad config, missing checkpoint) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional

import torch

from mcdist import bench
from mcdist.checkpoint import CheckpointError, load_config
from mcdist.config import IMPLS, ConfigError, RunConfig, parse_size, write_text_atomic
from mcdist.data.prepare import decode_text, load_tokenizer, prepare_tokens
from mcdist.device import resolve_device
from mcdist.evaluation import (evaluate_checkpoint, evaluate_documents_checkpoint, evaluate_documents_local,
                               evaluate_local, evaluate_under_torchrun, evaluate_with_ray, format_document_table,
                               format_table)
from mcdist.infer_job import (check_request, generate_from_checkpoint, generate_local, generate_under_torchrun,
                              generate_with_ray)
from mcdist.runners.ray import RayConnectionError
from mcdist.runners.torchrun import in_torchrun, world_size_from_environment
from mcdist.train.compare import compare_models, parse_model_names
from mcdist.train.ray_job import train_with_ray
from mcdist.train.state import export_checkpoint
from mcdist.train.trainer import launch_local, train_under_torchrun

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

    def add_job_args(sub: argparse.ArgumentParser, ray_help: str) -> None:
        """The flags of the jobs that print JSON lines from ranks (eval, generate): Ray and the output file."""
        sub.add_argument("--ray", action="store_true", help=ray_help)
        sub.add_argument("--address", default=None, metavar="ADDR",
                         help="with --ray: the Ray cluster (host:port, ray://host:port or auto); default: the Ray "
                              "of this machine if one runs, else a local one started for the run")
        sub.add_argument("--workers-cpus", type=int, default=None, metavar="N",
                         help="with --ray: CPUs per Ray worker (default 1)")
        sub.add_argument("--out", default=None, metavar="FILE.jsonl",
                         help="also write the JSON lines to FILE (atomically)")

    train = commands.add_parser("train", help="train (resuming from out_dir/checkpoints) and save out_dir/checkpoint")
    add_config_args(train, "RunConfig file (.json or .toml); defaults when omitted")
    train.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    train.add_argument("--nprocs", type=int, default=None,
                       help="local processes (default parallel.dp * parallel.sp; must equal it when given)")
    train.add_argument("--ray", action="store_true", help="run through Ray Train (one Ray worker per rank)")
    train.add_argument("--address", default=None, metavar="ADDR",
                       help="with --ray: the Ray cluster (host:port, ray://host:port or auto); default: the Ray "
                            "of this machine if one runs, else a local one started for the run (ray.address)")
    train.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --ray: Ray workers = ranks; parallel.dp becomes N / sp (ray.workers)")
    train.add_argument("--sp", type=int, default=None, metavar="P",
                       help="sequence-parallel ranks per sequence (parallel.sp)")

    evaluate = commands.add_parser("eval", help="score a saved model on its run's task: by length, position, depth")
    evaluate.add_argument("--checkpoint", required=True, metavar="DIR", help="folder written by `mcdist train`")
    add_config_args(evaluate, "RunConfig for the task sizes; default: run_config.json beside the checkpoint")
    evaluate.add_argument("--batches", type=int, default=None,
                          help="batches per length and depth (default train.eval_batches)")
    evaluate.add_argument("--seed", type=int, default=None,
                          help="evaluation seed of the synthetic tasks (default: the training run's)")
    evaluate.add_argument("--seq-lens", default=None, metavar="L1,L2,...",
                          help="lengths to score, e.g. 4096,16384,65536 (default train.seq_len)")
    evaluate.add_argument("--buckets", type=int, default=None, metavar="K",
                          help="split label positions into K buckets, each twice as wide as the one before "
                               "(default 1; with --data 4)")
    evaluate.add_argument("--depths", default=None, metavar="D1,D2,...",
                          help="passkey: depths in [0, 1] to place the passkey at, e.g. 0,0.25,0.5,0.75,1")
    evaluate.add_argument("--sp", type=int, default=None, metavar="P",
                          help="sequence-parallel ranks per sequence: local processes, Ray workers with --ray "
                               "(default 1), under torchrun its processes over --dp")
    evaluate.add_argument("--dp", type=int, default=1, metavar="D", help="data-parallel groups (default 1)")
    evaluate.add_argument("--data", default=None, metavar="FILE",
                          help="long documents: the loss by position over whole documents of this token file, each "
                               "run alone from its first token (instead of the run's task)")
    evaluate.add_argument("--seq-len", type=int, default=None, metavar="L",
                          help="with --data: score the first L positions of every document of at least L + 1 "
                               "tokens (default 4 · train.seq_len)")
    evaluate.add_argument("--documents", type=int, default=None, metavar="N",
                          help="with --data: score the first N such documents (default all)")
    add_job_args(evaluate, "run the dp·sp ranks as Ray Train workers")

    generate = commands.add_parser("generate", help="continue prompts with a saved model (prefill, then decode)")
    generate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="folder written by `mcdist train` (out_dir/checkpoint) or save_model")
    generate.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                          help='a prompt as token ids, "1,2,3" (repeatable)')
    generate.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                          help="a prompt as text, encoded by --tokenizer (repeatable)")
    generate.add_argument("--prompt-file", default=None, metavar="FILE",
                          help='one prompt per line: token ids ("1 2 3"), or text with --tokenizer')
    generate.add_argument("--tokenizer", default=None, metavar="byte|tokenizer.json",
                          help="encodes text prompts; the output then also holds the continuation as text")
    generate.add_argument("--max-new-tokens", type=int, required=True, metavar="N", help="tokens to add per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    generate.add_argument("--top-k", type=int, default=0, metavar="K",
                          help="sample among the K most likely tokens (default 0: all)")
    generate.add_argument("--seed", type=int, default=0, help="seed of each prompt's sampling (default 0)")
    generate.add_argument("--batch-size", type=int, default=8, metavar="B",
                          help="prompts of equal length decoded together, at most B at a time (default 8)")
    generate.add_argument("--eos-id", type=int, default=None, metavar="I",
                          help="end a prompt's continuation at this id (kept as its last id)")
    generate.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    generate.add_argument("--sp", type=int, default=None, metavar="P",
                          help="sequence-parallel ranks per prompt: P local processes (gloo, CPU), or P Ray "
                               "workers with --ray (default 1; under torchrun, all its processes)")
    generate.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag",
                          help="how a prompt is sharded over the ranks (default zigzag)")
    generate.add_argument("--impl", choices=IMPLS, default="auto",
                          help="which implementation computes the layers, as train.impl (default auto: Triton on "
                               "CUDA, chunked PyTorch on the CPU)")
    add_job_args(generate, "run the ranks as Ray Train workers")

    infer = commands.add_parser("infer", help="a resumable batch-inference job: a JSON-lines prompts file in, "
                                              "one result line per prompt out, on replicas × sp ranks")
    infer.add_argument("--checkpoint", required=True, metavar="DIR", help="folder written by `mcdist train` or "
                                                                          "save_model")
    infer.add_argument("--prompts", required=True, metavar="IN.jsonl",
                       help='one prompt per line: {"id": ..., "prompt_ids": [...]} or {"id": ..., "prompt": "text"}')
    infer.add_argument("--out", required=True, metavar="OUT.jsonl",
                       help="results, appended as they come; a rerun resumes it (OUT.job.json names the job)")
    infer.add_argument("--errors", default=None, metavar="ERR.jsonl",
                       help="the bad input lines with their line numbers (default OUT.errors.jsonl)")
    infer.add_argument("--ray", action="store_true", help="run the replicas' ranks as Ray actors")
    infer.add_argument("--address", default=None, metavar="ADDR",
                       help="with --ray: the Ray cluster (host:port, ray://host:port or auto); default: the Ray of "
                            "this machine if one runs, else a local one started for the job")
    infer.add_argument("--workers-cpus", type=int, default=1, metavar="N",
                       help="with --ray: CPUs per rank (default 1)")
    infer.add_argument("--replicas", type=int, default=1, metavar="R", help="data-parallel replicas (default 1)")
    infer.add_argument("--sp", type=int, default=1, metavar="P",
                       help="sequence-parallel ranks per replica (default 1)")
    infer.add_argument("--sp-min-tokens", type=int, default=None, metavar="N",
                       help="prompts of at least N tokens decode over the sp group; shorter ones are shared out "
                            "among its ranks (default: one sharding unit, 2·P·segment_len for zigzag)")
    infer.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                       help="tokens to add per prompt, unless its line says (default 64)")
    infer.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    infer.add_argument("--top-k", type=int, default=0, metavar="K", help="default 0: every token")
    infer.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1: off)")
    infer.add_argument("--seed", type=int, default=0,
                       help="seeds each prompt's sampling together with its id (default 0)")
    infer.add_argument("--tokenizer", default=None, metavar="byte|tokenizer.json",
                       help="encodes \"prompt\" lines; results then also carry \"text\"")
    infer.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default=None,
                       help="dtype of the cached segment states (default: the model's)")
    infer.add_argument("--batch-size", type=int, default=16, metavar="B",
                       help="prompts decoded together on one rank (default 16)")
    infer.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag",
                       help="how a long prompt is sharded over the sp ranks (default zigzag)")
    infer.add_argument("--impl", choices=IMPLS, default="auto", help="which implementation computes the layers")
    infer.add_argument("--device", default="auto",
                       help="in this process or, with --ray, each rank (auto: a GPU each when there are enough); "
                            "local processes run on the CPU")

    compare = commands.add_parser("compare", help="train one model per name (attention or an aggregation) on the "
                                                  "same task")
    add_config_args(compare, "RunConfig file shared by every run")
    compare.add_argument("--models", default=None,
                         help="comma-separated models: attention (model.mixer = attention) and model.aggregation "
                              "values, e.g. attention,grm,none (default grm,none)")
    compare.add_argument("--aggregations", default=None,
                         help="comma-separated model.aggregation values (as --models without attention)")
    compare.add_argument("--set-for", dest="set_for", action="append", default=[], metavar="MODEL:SECTION.KEY=VALUE",
                         help="an override of one model only, e.g. none:model.state_init=checkpoint (repeatable)")
    compare.add_argument("--quiet", action="store_true", help="print only the summary")
    compare.add_argument("--ray", action="store_true",
                         help="train through Ray Train (ray.* and parallel.* of the config; default: "
                              "parallel.dp · parallel.sp local processes), then reload and score each saved model "
                              "(make run)")

    bench = commands.add_parser("bench", help="run the benchmarks (arguments go to mcdist.bench)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m mcdist.bench")

    data = commands.add_parser("data", help="prepare training data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    prepare = data_commands.add_parser("prepare", help="tokenize text, .jsonl, .json or .parquet files into a token "
                                                       "file with its document boundaries")
    prepare.add_argument("inputs", nargs="*", metavar="INPUT",
                         help="text files (one document each), .jsonl / .json / .parquet files (one document per "
                              "record) or folders of them")
    prepare.add_argument("--demo", choices=["stdlib"], default=None,
                         help="instead of INPUTs: the demo corpus, Python's standard library sources (one document "
                              "per .py file, sorted)")
    prepare.add_argument("--loader", choices=["auto", "builtin", "datasets"], default="auto",
                         help="who reads the inputs: auto (default: built in for text and .jsonl, Hugging Face "
                              "datasets for .json and .parquet), builtin, or datasets for every kind")
    prepare.add_argument("--workers", type=int, default=1, metavar="N",
                         help="processes that tokenize (default 1: this one; a tokenizer.json uses its own thread "
                              "pool there)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.add_argument("--output", required=True, metavar="FILE",
                         help="token file to write (its document boundaries go to FILE.docs, its header to "
                              "FILE.json)")
    prepare.add_argument("--tokenizer", default="byte", metavar="byte|tokenizer.json",
                         help="built-in byte-level tokenizer (default) or a Hugging Face tokenizer.json")
    prepare.add_argument("--eos-token", default=None, help="end-of-document token of a tokenizer.json")
    prepare.add_argument("--dtype", choices=["uint16", "uint32"], default=None,
                         help="token id type (default: the smallest that fits the vocabulary)")
    prepare.add_argument("--val-fraction", type=float, default=0.0,
                         help="share of documents (the last ones) written to <output stem>.val.bin")
    prepare.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")

    export = commands.add_parser("export", help="write the weights-only checkpoint of a training checkpoint")
    export.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoints/step-N folder, a checkpoints folder or a run's out_dir (latest)")
    export.add_argument("--output", required=True, metavar="DIR", help="folder for model.safetensors + config.json")
    export.add_argument("--max-shard-size", default=None, metavar="SIZE",
                        help="write shards of at most SIZE (e.g. 2GB) + model.safetensors.index.json "
                             "(default: keep the checkpoint's layout)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                        help="convert the weights (default: keep)")
    return parser


def _load_run_config(path: str | None, overrides: list[str], fallback: str | None = None) -> RunConfig:
    source = path or (fallback if fallback and os.path.isfile(fallback) else None)
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    run_config = RunConfig.load(source) if source else RunConfig()
    return run_config.with_overrides(overrides)


def _apply_ray_flags(args, run_config: RunConfig) -> RunConfig:
    """``--sp``, ``--workers`` and ``--address`` on top of the config (one Ray worker per rank).

    ``--workers N`` sets dp = N / sp; ``--sp P`` alone sets the workers to dp · P; neither leaves the config's
    ``ray.workers``, which must then equal dp · sp (train_with_ray checks it)."""
    for flag in ("workers", "sp"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag} = {value} is invalid; expected a positive integer")
    if not args.ray and (args.workers is not None or args.address is not None):
        raise UsageError("--workers and --address need --ray (without Ray, parallel.dp · parallel.sp local "
                         "processes run)")
    overrides = []
    sp = run_config.parallel.sp if args.sp is None else args.sp
    if args.sp is not None:
        overrides.append(f"parallel.sp={sp}")
    if args.ray:
        if args.workers is not None:
            if args.workers % sp != 0:
                raise UsageError(f"--workers = {args.workers} is not a multiple of sp = {sp}; expected "
                                 "workers = dp · sp")
            overrides += [f"parallel.dp={args.workers // sp}", f"ray.workers={args.workers}"]
        elif args.sp is not None:
            overrides.append(f"ray.workers={run_config.parallel.dp * sp}")
        if args.address is not None:
            overrides.append(f"ray.address={args.address}")
    return run_config.with_overrides(overrides) if overrides else run_config


def _cmd_train(args) -> int:
    run_config = _apply_ray_flags(args, _load_run_config(args.config, args.overrides))
    changes = {}
    if args.device != "auto":
        changes["device"] = args.device
    if args.quiet:
        changes["progress"] = False
    if changes:
        run_config = run_config.replace(train=run_config.train.replace(**changes))
    if args.nprocs is not None and args.nprocs <= 0:
        raise UsageError(f"--nprocs = {args.nprocs} is invalid; expected a positive integer")
    if args.ray and args.nprocs is not None:
        raise UsageError("--nprocs is for local processes; with --ray use --workers")
    try:
        if args.ray:
            try:
                result = train_with_ray(run_config, log=None if args.quiet else print)
            except (RayConnectionError, ImportError) as error:
                raise UsageError(str(error)) from error
        elif in_torchrun():  # one of torchrun's processes: it made RANK, WORLD_SIZE, MASTER_*
            result = train_under_torchrun(run_config)
        else:
            result = launch_local(run_config, args.nprocs)
    except ValueError as error:  # a user error a rank found (ConfigError and CheckpointError are ValueErrors)
        raise UsageError(str(error)) from error
    if args.ray or _speaks():
        print(json.dumps(result, sort_keys=True))
    return 0


def _parse_list(text: Optional[str], flag: str, kind: type) -> Optional[list]:
    if text is None:
        return None
    try:
        return [kind(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is invalid; expected comma-separated {kind.__name__} values") from None


def _torchrun_ranks(args, command: str) -> Optional[int]:
    """Under torchrun: its world size, after refusing --ray; else None."""
    if not in_torchrun():
        return None
    if args.ray:
        raise UsageError(f"{command} --ray under torchrun: torchrun already started the ranks; drop --ray")
    return world_size_from_environment()


def _speaks() -> bool:
    """Whether this process prints results: always, except on ranks other than 0 under torchrun."""
    return not in_torchrun() or os.environ.get("RANK", "0") == "0"


def _emit(records: list[str], out: Optional[str]) -> None:
    """Print the JSON lines (and write them to ``out``): rank 0's job under torchrun, where every rank has them."""
    if not _speaks():
        return
    if out is not None:
        write_text_atomic(out, "".join(records))
    sys.stdout.write("".join(records))


def _check_ray_flags(args, local_ranks: int) -> None:
    """The flags shared by eval and generate: Ray's need --ray; local processes run on the CPU."""
    if args.workers_cpus is not None and args.workers_cpus < 1:
        raise UsageError(f"--workers-cpus = {args.workers_cpus} is invalid; expected a positive integer")
    if not args.ray and (args.address is not None or args.workers_cpus is not None):
        raise UsageError("--address and --workers-cpus need --ray")
    if local_ranks > 1 and not args.ray and args.device not in ("auto", "cpu"):
        raise UsageError(f"--device {args.device} with {local_ranks} ranks: the local processes run on the CPU "
                         "(gloo); use --ray for GPUs")
    if args.out is not None and os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} is a folder; expected a file name")


def _cmd_eval(args) -> int:
    model_overrides = [item for item in args.overrides if item.strip().startswith("model.")]
    if model_overrides:
        raise UsageError(f"--set {model_overrides[0]}: eval takes the model section from the checkpoint's "
                         "config.json; expected only train.* overrides (task sizes, seed)")
    for flag, value in (("--sp", args.sp), ("--dp", args.dp)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} = {value} is invalid; expected a positive integer")
    torchrun = _torchrun_ranks(args, "eval")
    sp = args.sp or 1
    _check_ray_flags(args, 1 if torchrun else sp * args.dp)
    checkpoint = os.fspath(args.checkpoint)
    fallback = os.path.join(checkpoint, "run_config.json")  # inside a training checkpoint (checkpoints/step-N)
    if not os.path.isfile(fallback):
        fallback = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "run_config.json")
    run_config = _load_run_config(args.config, args.overrides, fallback=fallback)
    if args.data is not None:
        return _eval_documents(args, checkpoint, run_config, torchrun,
                               found_config=args.config is not None or os.path.isfile(fallback))
    for flag, value in (("--seq-len", args.seq_len), ("--documents", args.documents)):
        if value is not None:
            raise UsageError(f"{flag} applies to --data FILE (long documents); expected --seq-lens or --batches "
                             "for the run's task")
    options = dict(seq_lens=_parse_list(args.seq_lens, "--seq-lens", int),
                   buckets=1 if args.buckets is None else args.buckets,
                   depths=_parse_list(args.depths, "--depths", float), num_batches=args.batches, seed=args.seed)
    try:
        if torchrun:
            results = evaluate_under_torchrun(checkpoint, run_config, sp=args.sp, dp=args.dp, device=args.device,
                                              **options)
        elif args.ray:
            try:
                results = evaluate_with_ray(checkpoint, run_config, sp=sp, dp=args.dp, address=args.address,
                                            device=args.device, cpus_per_worker=args.workers_cpus or 1,
                                            log=lambda line: print(line, file=sys.stderr), **options)
            except (RayConnectionError, ImportError) as error:
                raise UsageError(str(error)) from error
        elif sp * args.dp > 1:
            results = evaluate_local(checkpoint, run_config, sp=sp, dp=args.dp, **options)
        else:
            results = evaluate_checkpoint(checkpoint, run_config, device=args.device, **options)
    except ValueError as error:  # a bad value, a missing or corrupt checkpoint (CheckpointError is a ValueError)
        raise UsageError(str(error)) from error
    task = run_config.train
    common = {"checkpoint": checkpoint, "task": task.task}
    if task.task == "mqar":
        common["num_kv_pairs"] = task.num_kv_pairs
    records = [json.dumps({**common, **entry}, sort_keys=True) + "\n" for entry in results]
    if (len(results) > 1 or options["buckets"] > 1) and _speaks():
        print(format_table(results), file=sys.stderr)
    _emit(records, args.out)
    return 0


def _eval_documents(args, checkpoint: str, run_config: RunConfig, torchrun: Optional[int], *,
                    found_config: bool) -> int:
    """``mcdist eval --data FILE``: the loss by position over the file's long documents (one process or --sp)."""
    given = [flag for flag, value in (("--seq-lens", args.seq_lens), ("--depths", args.depths), ("--seed", args.seed),
                                      ("--batches", args.batches), ("--ray", args.ray or None),
                                      ("--dp", None if args.dp == 1 else args.dp)) if value is not None]
    if given:
        raise UsageError(f"{given[0]} does not apply to --data (each long document runs alone, in one process or "
                         "over --sp P local processes); expected --seq-len, --buckets, --documents, --sp")
    if torchrun:
        raise UsageError("eval --data under torchrun is not supported; run it in one process or with --sp P local "
                         "processes")
    if args.seq_len is None and not found_config:
        raise UsageError(f"--data needs --seq-len L here: no run_config.json inside or beside {checkpoint!r} (nor "
                         "--config) tells the training length the default 4 · train.seq_len comes from")
    options = dict(seq_len=args.seq_len, buckets=args.buckets, documents=args.documents)
    sp = args.sp or 1
    try:
        if sp > 1:
            result = evaluate_documents_local(checkpoint, run_config, args.data, sp=sp, **options)
        else:
            result = evaluate_documents_checkpoint(checkpoint, run_config, args.data, device=args.device, **options)
    except ValueError as error:  # a bad value, a missing or corrupt checkpoint or token file
        raise UsageError(str(error)) from error
    if not found_config:
        result["train_seq_len"] = None  # no run config: the training length is unknown, not the default's
    print(format_document_table(result), file=sys.stderr)
    _emit([json.dumps({"checkpoint": checkpoint, "task": "documents", "data": args.data, **result},
                      sort_keys=True) + "\n"], args.out)
    return 0


def _parse_ids(text: str, where: str) -> list[int]:
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    if not items:
        raise UsageError(f"{where} {text!r} holds no token ids; expected integers such as \"1,2,3\"")
    ids = []
    for item in items:
        try:
            ids.append(int(item))
        except ValueError:
            raise UsageError(f"{where} {text!r}: {item!r} is not a token id; expected integers such as "
                             "\"1,2,3\"") from None
    return ids


def _read_prompts(args, tokenizer) -> list[list[int]]:
    """The prompts of ``--prompt-ids``, ``--prompt`` or ``--prompt-file`` (exactly one of them) as token ids."""
    given = [flag for flag, value in (("--prompt-ids", args.prompt_ids), ("--prompt", args.prompt),
                                      ("--prompt-file", args.prompt_file)) if value]
    if len(given) != 1:
        raise UsageError(f"{' and '.join(given)} given together; expected one of them" if given else
                         "no prompt; expected --prompt-ids, --prompt or --prompt-file")
    if args.prompt_ids:
        return [_parse_ids(text, "--prompt-ids") for text in args.prompt_ids]
    if args.prompt:
        if tokenizer is None:
            raise UsageError("--prompt needs --tokenizer (byte or a tokenizer.json) to encode the text; give "
                             "token ids with --prompt-ids")
        return [tokenizer.encode(text).tolist() for text in args.prompt]
    path = args.prompt_file
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path!r} does not exist")
    prompts = []
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except UnicodeDecodeError as error:
        line = _line_of(path, error.start)
        raise UsageError(f"prompt file {path!r} is not UTF-8 text (byte {error.start}, line {line}: "
                         f"{error.reason}); expected one prompt per line in UTF-8") from None
    except OSError as error:
        raise UsageError(f"prompt file {path!r} cannot be read ({error.strerror or error})") from None
    for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        if not line.strip():
            continue
        prompts.append(tokenizer.encode(line).tolist() if tokenizer is not None else
                       _parse_ids(line, f"{path}:{number}:"))
    if not prompts:
        raise UsageError(f"prompt file {path!r} holds no prompt; expected one per line")
    return prompts


def _line_of(path: str, offset: int) -> int:
    """The line number (from 1) holding byte ``offset`` of the file at ``path``."""
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def _cmd_generate(args) -> int:
    if args.sp is not None and args.sp < 1:
        raise UsageError(f"--sp = {args.sp} is invalid; expected a positive integer")
    torchrun = _torchrun_ranks(args, "generate")
    if torchrun and args.sp not in (None, torchrun):
        raise UsageError(f"--sp = {args.sp} under torchrun of {torchrun} processes: each prompt is spread over all "
                         "of them; drop --sp or start that many")
    sp = args.sp or 1
    _check_ray_flags(args, 1 if torchrun else sp)
    tokenizer = None
    if args.tokenizer is not None:
        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (ImportError, ValueError) as error:
            raise UsageError(str(error)) from error
    prompts = _read_prompts(args, tokenizer)
    checkpoint = os.fspath(args.checkpoint)
    request = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, eos_id=args.eos_id, layout=args.layout, batch_size=args.batch_size)
    kernels = dict(impl=args.impl)
    # with --ray the checkpoint may live only on the cluster's filesystem: the workers check it there
    vocab_size = load_config(checkpoint).vocab_size if not args.ray or os.path.isdir(checkpoint) else None
    try:
        prompts = check_request(prompts, vocab_size=vocab_size, **request)
        request.update(kernels)
        if torchrun:
            new_ids = generate_under_torchrun(checkpoint, prompts, device=args.device, **request)
        elif args.ray:
            try:
                new_ids = generate_with_ray(checkpoint, prompts, workers=sp, address=args.address,
                                            device=args.device, cpus_per_worker=args.workers_cpus or 1,
                                            log=lambda line: print(line, file=sys.stderr), **request)
            except (RayConnectionError, ImportError) as error:
                raise UsageError(str(error)) from error
        elif sp > 1:
            new_ids = generate_local(checkpoint, prompts, nprocs=sp, **request)
        else:
            new_ids = generate_from_checkpoint(checkpoint, prompts, device=args.device, **request)
    except ValueError as error:  # the request does not fit the model, or the model cannot be loaded
        raise UsageError(str(error)) from error
    records = []
    for prompt, new in zip(prompts, new_ids):
        record = {"prompt_ids": prompt, "new_ids": new}
        if tokenizer is not None:
            record["text"] = decode_text(tokenizer, new)
        records.append(json.dumps(record) + "\n")
    _emit(records, args.out)
    return 0


def _cmd_infer(args) -> int:
    from mcdist.infer_batch import InferOptions, run_infer_job

    if not args.ray and (args.address is not None or args.workers_cpus != 1):
        raise UsageError("--address and --workers-cpus need --ray")
    if not args.ray and args.replicas * args.sp > 1 and args.device not in ("auto", "cpu"):
        raise UsageError(f"--device {args.device} with {args.replicas * args.sp} local processes: they run on the "
                         "CPU (gloo); use --ray for GPUs, or one replica of one rank")
    if not os.path.isfile(args.prompts):
        raise UsageError(f"prompts file {args.prompts!r} does not exist")
    options = InferOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, cache_dtype=args.cache_dtype,
                           batch_size=args.batch_size, sp_min_tokens=args.sp_min_tokens, layout=args.layout,
                           impl=args.impl)
    try:
        summary = run_infer_job(args.checkpoint, args.prompts, args.out, options=options, replicas=args.replicas,
                                sp=args.sp, tokenizer=args.tokenizer, errors_path=args.errors, ray=args.ray,
                                address=args.address, device=args.device, cpus_per_rank=args.workers_cpus)
    except (ValueError, RayConnectionError, ImportError) as error:  # InferJobError, CheckpointError, a bad value
        raise UsageError(str(error)) from error
    except RuntimeError as error:  # every replica was lost: what is written stays, a rerun finishes the job
        print(f"mcdist infer: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(summary, sort_keys=True))
    return 0


def parse_set_for(items) -> dict:
    """``--set-for MODEL:section.key=value`` items as {model: [overrides]}; a model name may hold a colon
    (``titans:grm:train.lr=1e-3``: the split is at the last colon before the '=')."""
    overrides_for: dict = {}
    for item in items:
        head, equals, value = item.partition("=")
        name, colon, key = head.rpartition(":")
        if not colon or not name.strip() or not key.strip() or not equals:
            raise UsageError(f"--set-for {item!r} is invalid; expected MODEL:section.key=value, e.g. "
                             "none:model.state_init=checkpoint")
        overrides_for.setdefault(name.strip(), []).append((key + equals + value).strip())
    return overrides_for


def _cmd_compare(args) -> int:
    if args.models is not None and args.aggregations is not None:
        raise UsageError("--models and --aggregations were both given; expected one list (--models may name "
                         "attention beside aggregations)")
    if args.aggregations is not None:
        names = parse_model_names(args.aggregations, "--aggregations")
        if "attention" in names:
            raise UsageError("--aggregations names attention, which is a mixer; expected --models attention,...")
    else:
        names = parse_model_names("grm,none" if args.models is None else args.models, "--models")
    overrides_for = parse_set_for(args.set_for)
    base = _load_run_config(args.config, args.overrides)
    changes = {}
    if args.device != "auto":
        changes["device"] = args.device
    if args.quiet:
        changes["progress"] = False
    if changes:
        base = base.replace(train=base.train.replace(**changes))
    try:
        results = compare_models(base, names, ray=args.ray, overrides_for=overrides_for,
                                 log=None if args.quiet else print)
    except (RayConnectionError, ImportError) as error:
        raise UsageError(str(error)) from error
    model, parallel = base.model, base.parallel
    where = "through Ray" if args.ray else "on local processes"
    print(f"MQAR recall: seq_len {base.train.seq_len}, {base.train.num_kv_pairs} key-value pairs, memory "
          f"{model.memory}, segment_len {model.segment_len}, {base.train.steps} steps {where} (dp {parallel.dp} × "
          f"sp {parallel.sp} ranks); accuracy of each saved model, reloaded:")
    for aggregation, result in results.items():
        print(f"  {aggregation:<9} accuracy {result['eval_accuracy']:.3f}  eval loss {result['eval_loss']:.3f}  "
              f"(trained {result['train_seconds']:.0f} s, {result['seconds']:.0f} s in all; "
              f"{result['final_model']})")
    print("the same task at longer lengths (more filler between each key and its query; mcdist eval --seq-lens):")
    for aggregation, result in results.items():
        print(f"  {aggregation:<9} " + "  ".join(f"L {length}: accuracy {accuracy:.3f}"
                                               for length, accuracy in result["accuracy_at"].items()))
    print(json.dumps({name: {"eval_accuracy": r["eval_accuracy"], "eval_loss": r["eval_loss"],
                             "accuracy_at": r["accuracy_at"], "train_loss": r["train_loss"]}
                      for name, r in results.items()}, sort_keys=True))
    return 0


def _cmd_bench(args) -> int:
    bench_args = list(args.bench_args)
    if bench_args and bench_args[0] == "--":
        bench_args = bench_args[1:]
    result = bench.main(bench_args)
    return int(result or 0)


def _cmd_data(args) -> int:
    if args.workers < 1:
        raise UsageError(f"--workers = {args.workers} is invalid; expected a positive integer")
    if args.demo is None and not args.inputs:
        raise UsageError("no INPUT given; expected text, .jsonl, .json or .parquet files or folders, or --demo stdlib")
    if args.demo is not None and args.inputs:
        raise UsageError(f"--demo {args.demo} and INPUT files were given together; expected one of them")
    try:
        result = prepare_tokens(args.inputs, args.output, tokenizer=args.tokenizer, eos_token=args.eos_token,
                                dtype=args.dtype, val_fraction=args.val_fraction, text_key=args.text_key,
                                loader=args.loader, workers=args.workers, progress=not args.quiet, demo=args.demo)
    except (ImportError, ValueError) as error:
        raise UsageError(str(error)) from error
    for split in ("train", "val"):
        header = result[split]
        if header is not None:
            print(f"{split}: {result[split + '_path']}: {header['num_tokens']:,} tokens ({header['dtype']}) in "
                  f"{header['num_documents']} document{'' if header['num_documents'] == 1 else 's'}, vocabulary "
                  f"{header['vocab_size']}")
    if result["replaced_bytes"]:
        print(f"note: {result['replaced_bytes']} invalid UTF-8 sequences were replaced by U+FFFD")
    if result["replacement_characters"]:
        print(f"note: the text files read through datasets hold {result['replacement_characters']} U+FFFD "
              "characters (invalid UTF-8 is replaced by it; datasets does not tell which were)")
    print(json.dumps({"train_path": result["train_path"], "val_path": result["val_path"],
                      "num_tokens": result["train"]["num_tokens"]}, sort_keys=True))
    return 0


def _cmd_export(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.max_shard_size is not None:
        try:
            parse_size(args.max_shard_size)
        except ValueError as error:
            raise UsageError(f"--max-shard-size: {error}") from None
    path = export_checkpoint(args.checkpoint, args.output, dtype=dtype, max_shard_size=args.max_shard_size)
    print(json.dumps({"exported": path, "files": sorted(os.listdir(path))}, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # everything after `bench` belongs to mcdist.bench (REMAINDER drops --flags)
            args = argparse.Namespace(command="bench", bench_args=argv[1:])
        else:
            args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse already printed its message
        return int(stop.code or 0)
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "generate": _cmd_generate, "compare": _cmd_compare,
                "infer": _cmd_infer, "bench": _cmd_bench, "data": _cmd_data, "export": _cmd_export}
    try:
        if getattr(args, "device", None) is not None and not getattr(args, "ray", False):
            resolve_device(args.device)  # CUDA asked for but not here: refused before anything starts, naming why
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
