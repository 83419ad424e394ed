"""Long-context evaluation of a saved model: loss and accuracy by length, by position, by passkey depth.

What people who train long-context models look at first: does the loss keep falling as the context grows (the
loss of the tokens at positions ``[64K, 128K)`` against those at ``[0, 8K)``), does the model still retrieve at
lengths beyond those it trained on, and at every depth. One call scores the model on the run's evaluation data
(the batches the trainer scores: :meth:`mcdist.train.data.RankData.eval_batches`) at each of ``seq_lens``,
for the passkey task at each of ``depths``, with the label positions split into ``buckets`` position buckets
that double in width (:func:`position_edges`).

The model runs as it trains: in one process, or over a dp × sp mesh of ranks (``run_config.parallel``), each
sp rank holding only its pieces of every sequence (a rank's data and activation memory are O(L / sp)), the ranks
of a dp group scoring different rows. Sums over buckets are all-reduced once per length, so every layout gives
the same numbers up to float rounding (tested).

* :func:`evaluate_on_data`: one rank's evaluation batches (:class:`~mcdist.train.data.RankData`), scored.
* :func:`evaluate_model`: every rank of an initialised process group, or one process (the model already on its
  device and, under sp, parallelized).
* :func:`evaluate_checkpoint`: load the saved model in this process and score it.
* :func:`evaluate_local`: ``dp · sp`` new local processes (gloo, CPU).
* :func:`evaluate_with_ray`: ``dp · sp`` Ray Train workers (one GPU each on a GPU cluster).
* :func:`evaluate_under_torchrun`: this process is one of the ``dp · sp`` ranks of a ``torchrun`` job.

Long documents (``mcdist eval --data FILE``): the loss by position over whole documents of a token file, each
run alone from its first token (batch 1, so no document reads another), the first ``seq_len`` positions of every
document that holds ``seq_len + 1`` tokens at least, so that every position bucket averages over the same
documents (the figure long-context papers show, typically several times the training length):

* :func:`check_documents`: the documents to score, after checking every argument.
* :func:`evaluate_documents`: every rank of an initialised sp group, or one process (the model already built).
* :func:`evaluate_documents_checkpoint`: load the saved model in this process and score it.
* :func:`evaluate_documents_local`: ``sp`` new local processes (gloo, CPU), each holding its pieces of every
  document.
"""

from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mcdist.checkpoint import CheckpointError, load_config, load_model
from mcdist.config import ConfigError, ParallelConfig, RunConfig
from mcdist.data.mqar import IGNORE_INDEX
from mcdist.data.tokens import TokenFile, TokenFileError
from mcdist.device import autocast_for, resolve_device
from mcdist.layer import at_least_float32
from mcdist.packing import labels_at
from mcdist.parallel.layout import check_sequence_length, rank_pieces
from mcdist.parallel.mesh import Mesh, build_mesh
from mcdist.parallel.model import parallelize
from mcdist.runners.problems import first_problem, problem
from mcdist.runners.ray import run_on_ray, unique_run_name
from mcdist.runners.spawned import run_spawned
from mcdist.runners.torchrun import run_under_torchrun, world_size_from_environment
from mcdist.train.checks import check_run, length_run
from mcdist.train.data import RankData

__all__ = ["DOCUMENT_BUCKETS", "DOCUMENT_LENGTH_FACTOR", "check_documents", "check_evaluation",
           "evaluate_checkpoint", "evaluate_documents", "evaluate_documents_checkpoint", "evaluate_documents_local",
           "evaluate_local", "evaluate_model", "evaluate_on_data", "evaluate_under_torchrun", "evaluate_with_ray",
           "format_document_table", "format_table", "position_edges"]

DOCUMENT_LENGTH_FACTOR = 4  # long documents are scored to this many times train.seq_len unless told otherwise
DOCUMENT_BUCKETS = 4  # ... in this many doubling position buckets (fewer when the length allows fewer)


def position_edges(seq_len: int, buckets: int) -> List[int]:
    """Bucket boundaries ``[0, L / 2^(K-1), ..., L / 4, L / 2, L]`` (integer division): K buckets, each twice as
    wide as the one before, the first ``[0, L / 2^(K-1))``. ``buckets = 1``: ``[0, L]``.

    Raises:
        ValueError: ``buckets`` is not a positive integer, or ``seq_len / 2^(buckets-1) < 1`` (empty buckets).
    """
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets = {buckets!r} is invalid; expected a positive integer")
    if seq_len >> (buckets - 1) < 1:
        raise ValueError(f"buckets = {buckets} is too many for seq_len = {seq_len}; expected at most "
                         f"{seq_len.bit_length()} (the first bucket is seq_len / 2^(buckets - 1) positions wide)")
    return [0] + [seq_len >> shift for shift in range(buckets - 1, 0, -1)] + [seq_len]


def check_evaluation(run_config: RunConfig, *, seq_lens: Optional[Sequence[int]] = None,
                     depths: Optional[Sequence[float]] = None, buckets: int = 1,
                     num_batches: Optional[int] = None, seed: Optional[int] = None) -> List[int]:
    """The lengths to score, after checking every argument against the run (its model, task and parallel layout).

    Args:
        run_config: the run whose task, data, batch size and seed define the evaluation batches; its ``model``
            section must be the saved model's and its ``parallel`` section the mesh the evaluation runs on.
        seq_lens: lengths to score (default ``[train.seq_len]``); under sp each must fit the layout
            (``2 · sp · segment_len`` divides it for zigzag, ``sp · segment_len`` for contiguous).
        depths: passkey depths in [0, 1] (passkey only); default: the uniform depth of the training data.
        buckets: position buckets (:func:`position_edges`).
        num_batches: batches per length and depth (default ``train.eval_batches``).
        seed: the synthetic tasks' evaluation seed (default ``train.seed + EVAL_SEED_OFFSET`` of
            :mod:`mcdist.train.data`, what the trainer scores).

    Raises:
        ConfigError (a ValueError): naming the value and what was expected.
    """
    task = run_config.train.task
    lengths = [run_config.train.seq_len] if seq_lens is None else list(seq_lens)
    if not lengths:
        raise ConfigError("seq_lens = [] is invalid; expected at least one length")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ConfigError(f"seq_len = {length!r} is invalid; expected an integer >= 2")
        check_run(length_run(run_config, length))
        try:
            position_edges(length, buckets)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    if depths is not None:
        if task != "passkey":
            raise ConfigError(f"depths apply to the passkey task; this run's task is {task!r}")
        if len(depths) == 0:
            raise ConfigError("depths = [] is invalid; expected at least one depth in [0, 1]")
        for depth in depths:
            if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
                raise ConfigError(f"depth = {depth!r} is invalid; expected a number in [0, 1]")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ConfigError(f"num_batches = {num_batches!r} is invalid; expected a positive integer")
    if seed is not None:
        if task == "tokens":
            raise ConfigError("seed applies to the synthetic tasks (mqar, passkey); this run reads a token file, "
                              "whose evaluation windows are fixed by train.seed and train.val_data_path")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed = {seed!r} is invalid; expected an integer")
    return lengths


@torch.no_grad()
def evaluate_on_data(model: torch.nn.Module, data: RankData, *, num_batches: int, device: torch.device, autocast,
                     edges: Optional[Sequence[int]] = None, depth: Optional[float] = None,
                     seed: Optional[int] = None, impl: Optional[str] = None) -> dict:
    """Mean loss and accuracy (arg-max = label, over labelled positions) on ``data``'s evaluation batches, every
    rank of the mesh ``data`` belongs to (a collective when there are several).

    Args:
        autocast: what the forward runs under (:func:`mcdist.device.autocast_for`).
        edges: position bucket boundaries ``0 = e_0 < e_1 < ... < e_K = seq_len``: the result then also holds
            ``by_position``, one ``{"start", "end", "eval_loss", "eval_accuracy", "labelled"}`` per bucket of
            label positions ``[e_i, e_i+1)`` (global positions, whatever the sp layout).
        depth, seed: as :meth:`~mcdist.train.data.RankData.eval_batches`.
        impl: which implementation computes the layers (``train.impl``); ``None``: the model's default.

    Returns:
        ``{"eval_loss", "eval_accuracy", "labelled"}`` (+ ``by_position``), the same on every rank.
    """
    bounds = [0, data.seq_len] if edges is None else list(edges)
    bucket = _position_buckets(data.pieces, bounds, device)
    if data.packed:  # packed rows are whole on every rank of an sp group (RankData.eval_batches)
        bucket = _position_buckets([(0, data.seq_len)], bounds, device)
    sums = torch.zeros(len(bounds) - 1, 3, dtype=torch.float64, device=device)  # per bucket: loss, correct, count
    was_training = model.training
    model.eval()
    try:
        for input_ids, labels, documents in data.eval_batches(num_batches, depth=depth, seed=seed, documents=True):
            _score_batch(model, input_ids.to(device), labels.to(device), bucket, sums, autocast=autocast,
                         chunk_tokens=data.config.train.loss_chunk, impl=impl, cu_seqlens=documents)
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    result = _scores(sums.sum(dim=0))
    if edges is not None:
        result["by_position"] = [{"start": bounds[i], "end": bounds[i + 1], **_scores(sums[i])}
                                 for i in range(len(bounds) - 1)]
    return result


def _position_buckets(pieces: Sequence[tuple], bounds: Sequence[int], device: torch.device) -> torch.Tensor:
    """The bucket of each local position (pieces: ``(global_start, length)``), by its global position."""
    positions = torch.cat([torch.arange(start, start + length) for start, length in pieces])  # [t] global
    return torch.bucketize(positions, torch.tensor(bounds[1:-1], dtype=torch.int64), right=True).to(device)


def _score_batch(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, bucket: torch.Tensor,
                 sums: torch.Tensor, *, autocast, chunk_tokens: int, impl: Optional[str], cu_seqlens=None) -> None:
    """Add the loss, correct arg-maxes and labelled count of each bucket of one batch ``[b, t]`` to ``sums``
    ``[K, 3]`` (float64); the logits are made ``chunk_tokens / b`` positions at a time (``train.loss_chunk``).
    ``cu_seqlens``: the documents of the rows laid end to end (packed runs: docs/packing.md), each computed alone."""
    if cu_seqlens is not None:
        _score_documents(model, input_ids, labels, bucket, sums, autocast=autocast, chunk_tokens=chunk_tokens,
                         impl=impl, cu_seqlens=cu_seqlens)
        return
    positions = max(1, chunk_tokens // input_ids.shape[0]) if chunk_tokens else 0
    chunks = model.logit_chunks(input_ids, chunk_tokens=positions, impl=impl)  # made lazily, under the autocast
    with autocast():
        for first, logits in chunks:  # [b, n, V]
            part = labels[:, first:first + logits.shape[1]]  # [b, n]
            _add_scores(sums, logits, part, bucket[first:first + logits.shape[1]].expand_as(part))


def _add_scores(sums: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> None:
    """Add the loss, correct arg-max and labelled count of the positions of ``logits`` [..., V] (labels and
    their buckets ``where``: [...]) to ``sums`` [K, 3]; unlabelled positions (−100) add nothing."""
    logits, labels, where = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), where.reshape(-1)
    losses = F.cross_entropy(at_least_float32(logits), labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & mask
    for column, values in enumerate((losses, correct, mask)):
        sums[:, column].index_add_(0, where, values.double())


def _score_documents(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, bucket: torch.Tensor,
                     sums: torch.Tensor, *, autocast, chunk_tokens: int, impl: Optional[str], cu_seqlens) -> None:
    """:func:`_score_batch` of packed rows [b, t] (whole on every rank of an sp group): each rank scores its share
    of the positions (MCLanguageModel.document_share), each position's bucket by its place in its row."""
    with autocast():
        hidden, index = model.document_share(input_ids.reshape(1, -1), cu_seqlens, impl=impl)
    targets = labels_at(labels.reshape(-1), index)  # [N], ignored at padding
    where = bucket[index.clamp(min=0) % input_ids.shape[1]]  # [N]
    step = chunk_tokens if chunk_tokens > 0 else max(1, hidden.shape[0])
    with autocast():
        for first in range(0, hidden.shape[0], step):
            _add_scores(sums, model.lm_head(hidden[first:first + step]), targets[first:first + step],
                        where[first:first + step])


def _scores(row: torch.Tensor) -> dict:
    count = float(row[2])
    return {"eval_loss": float(row[0]) / max(count, 1.0), "eval_accuracy": float(row[1]) / max(count, 1.0),
            "labelled": int(count)}


def evaluate_model(model: torch.nn.Module, run_config: RunConfig, *, mesh=None, device: torch.device | str = "cpu",
                   seq_lens: Optional[Sequence[int]] = None, depths: Optional[Sequence[float]] = None,
                   buckets: int = 1, num_batches: Optional[int] = None, seed: Optional[int] = None) -> List[dict]:
    """Score ``model`` on every rank of ``mesh`` (default: this one process) with ``train.impl``; arguments as
    :func:`check_evaluation`. The trainer's evaluations are this call.

    Returns:
        One result per length (and depth), the same on every rank: ``{"seq_len", "depth" (passkey sweeps),
        "eval_loss", "eval_accuracy", "labelled" (labelled tokens scored), "by_position" (``buckets > 1``: one
        ``{"start", "end", "eval_loss", "eval_accuracy", "labelled"}`` per bucket)}``. Loss and accuracy are means
        over labelled positions (MQAR values, passkey digits, every next token of a token file); a bucket with no
        labelled position reports 0 for both and ``labelled = 0``.
    """
    mesh = mesh or Mesh.single()
    if mesh.dp * mesh.sp != run_config.parallel.world_size:
        raise ConfigError(f"the mesh is dp {mesh.dp} × sp {mesh.sp}; run_config.parallel says dp "
                          f"{run_config.parallel.dp} × sp {run_config.parallel.sp}")
    lengths = check_evaluation(run_config, seq_lens=seq_lens, depths=depths, buckets=buckets,
                               num_batches=num_batches, seed=seed)
    device = torch.device(device)
    autocast = autocast_for(run_config.train.dtype, device)
    results = []
    for length in lengths:
        data = RankData(length_run(run_config, length), mesh)
        edges = position_edges(length, buckets) if buckets > 1 else None
        for depth in (depths if depths is not None else [None]):
            scored = evaluate_on_data(model, data, num_batches=num_batches or run_config.train.eval_batches,
                                      device=device, autocast=autocast, edges=edges, depth=depth, seed=seed,
                                      impl=run_config.train.impl)
            results.append({"seq_len": length, **({} if depth is None else {"depth": float(depth)}), **scored})
    return results


def _with_model_config(run_config: RunConfig, model_dir: str, parallel: ParallelConfig) -> RunConfig:
    return run_config.replace(model=load_config(model_dir), parallel=parallel)


def evaluate_checkpoint(model_dir: str | os.PathLike, run_config: RunConfig, *, device: str = "auto",
                        seq_lens: Optional[Sequence[int]] = None, depths: Optional[Sequence[float]] = None,
                        buckets: int = 1, num_batches: Optional[int] = None,
                        seed: Optional[int] = None) -> List[dict]:
    """Load the model saved in ``model_dir`` and score it in this process (its ``parallel`` section is ignored).

    ``run_config``'s model section is replaced by the saved model's; the other arguments as
    :func:`check_evaluation`; returns as :func:`evaluate_model`. Raises CheckpointError (a missing or corrupt
    ``model_dir``, naming it) or ConfigError.
    """
    model_dir = os.fspath(model_dir)
    run_config = _with_model_config(run_config, model_dir, ParallelConfig())
    check_evaluation(run_config, seq_lens=seq_lens, depths=depths, buckets=buckets, num_batches=num_batches,
                     seed=seed)  # before loading the weights: the cheap checks first
    device = resolve_device(device)
    model, _ = load_model(model_dir, map_location=device)
    return evaluate_model(model, run_config, device=device, seq_lens=seq_lens, depths=depths, buckets=buckets,
                          num_batches=num_batches, seed=seed)


# -- every rank of a process group -------------------------------------------------------------------------------


def _evaluate_on_rank(rank: int, world_size: int, device: str, where: str, model_dir: str, config: dict,
                      options: dict) -> dict:
    """One rank's part (a :mod:`mcdist.runners` rank function): ``{"results": [...]}`` or the first rank's
    problem."""
    loaded = _load_on_rank(config, model_dir, device, where, lambda run: check_evaluation(run, **options))
    if "error" in loaded:  # a rank's problem (mcdist.runners.problems.problem)
        return loaded
    model, run_config, mesh = loaded["model"], loaded["run_config"], loaded["mesh"]
    return {"results": evaluate_model(model, run_config, mesh=mesh, device=device, **options)}


def _load_on_rank(config: dict, model_dir: str, device: str, where: str, check) -> dict:
    """Every rank: the run config with the saved model's fields, ``check``-ed, and the model loaded and
    parallelized over the run's mesh: ``{"model", "run_config", "mesh"}``, or the first rank's problem (every rank
    stops alike)."""
    run_config = RunConfig.from_dict(config)
    model, mine = None, None
    try:
        run_config = _with_model_config(run_config, model_dir, run_config.parallel)
        check(run_config)
        model, _ = load_model(model_dir, map_location=torch.device(device))
    except (CheckpointError, ValueError) as error:
        mine = problem(error, where)
    found = first_problem(mine)
    if found is not None:
        return found
    mesh = build_mesh(run_config.parallel)
    parallelize(model, mesh, run_config.parallel.layout)
    return {"model": model, "run_config": run_config, "mesh": mesh}


def _parallel_for(run_config: RunConfig, dp: int, sp: int) -> RunConfig:
    for name, value in (("dp", dp), ("sp", sp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} = {value!r} is invalid; expected a positive integer")
    return run_config.replace(parallel=run_config.parallel.replace(dp=dp, sp=sp))


def evaluate_local(model_dir: str | os.PathLike, run_config: RunConfig, *, sp: int = 1, dp: int = 1,
                   seq_lens: Optional[Sequence[int]] = None, depths: Optional[Sequence[float]] = None,
                   buckets: int = 1, num_batches: Optional[int] = None, seed: Optional[int] = None,
                   timeout_s: float = 600.0) -> List[dict]:
    """:func:`evaluate_checkpoint` on ``dp · sp`` new local processes (gloo, CPU): each sequence spread over ``sp``
    ranks laid out as ``run_config.parallel.layout``, the batch's rows over ``dp`` groups (``train.batch_size``
    must be a multiple of ``dp``). ``dp = sp = 1`` runs in this process on the CPU. The whole run is bounded by
    ``timeout_s``."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    run_config = _parallel_for(run_config, dp, sp)
    options = dict(seq_lens=seq_lens, depths=depths, buckets=buckets, num_batches=num_batches, seed=seed)
    check_evaluation(_with_model_config(run_config, model_dir, run_config.parallel), **options)
    if dp * sp == 1:
        return evaluate_checkpoint(model_dir, run_config, device="cpu", **options)
    return run_spawned(_evaluate_on_rank, dp * sp, model_dir, run_config.to_dict(), options, what="evaluation",
                       timeout_s=timeout_s)["results"]


def evaluate_under_torchrun(model_dir: str | os.PathLike, run_config: RunConfig, *, sp: Optional[int] = None,
                            dp: int = 1, seq_lens: Optional[Sequence[int]] = None,
                            depths: Optional[Sequence[float]] = None, buckets: int = 1,
                            num_batches: Optional[int] = None, seed: Optional[int] = None, device: str = "auto",
                            timeout_s: float = 600.0) -> List[dict]:
    """:func:`evaluate_local` as this process's rank of a torchrun job of ``dp · sp`` processes (``sp`` default:
    the world size over ``dp``); NCCL and one GPU per rank when CUDA is there and ``device`` is not ``cpu``, else
    gloo. Every rank returns the results."""
    world = world_size_from_environment()
    if sp is None:
        if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or world % dp:
            raise ConfigError(f"dp = {dp!r} is invalid; expected a positive divisor of torchrun's world size {world}")
        sp = world // dp
    run_config = _parallel_for(run_config, dp, sp)
    if dp * sp != world:
        raise ConfigError(f"dp {dp} × sp {sp} = {dp * sp} does not equal torchrun's world size {world}; expected "
                          "dp · sp = nproc-per-node · nnodes")
    options = dict(seq_lens=seq_lens, depths=depths, buckets=buckets, num_batches=num_batches, seed=seed)
    return run_under_torchrun(_evaluate_on_rank, os.path.abspath(os.fspath(model_dir)), run_config.to_dict(),
                              options, what="evaluation", device=device, timeout_s=timeout_s)["results"]


def evaluate_with_ray(model_dir: str | os.PathLike, run_config: RunConfig, *, sp: int = 1, dp: int = 1,
                      seq_lens: Optional[Sequence[int]] = None, depths: Optional[Sequence[float]] = None,
                      buckets: int = 1, num_batches: Optional[int] = None, seed: Optional[int] = None,
                      address: Optional[str] = None, use_gpu: bool = False, device: str = "auto",
                      cpus_per_worker: int = 1, storage_path: Optional[str] = None, timeout_s: float = 600.0,
                      log: Optional[Callable[[str], None]] = print) -> List[dict]:
    """:func:`evaluate_local` on ``dp · sp`` Ray Train workers (one GPU each when the cluster has them, NCCL).

    Every worker loads ``model_dir`` (made absolute here) and reads the run's data files at their paths, so both
    must be on the workers' machines (this one, or a shared filesystem); when the model is not on this machine
    the workers' check is the only one. The Ray arguments as :func:`mcdist.runners.ray.run_on_ray`.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    run_config = _parallel_for(run_config, dp, sp)
    options = dict(seq_lens=seq_lens, depths=depths, buckets=buckets, num_batches=num_batches, seed=seed)
    if os.path.isdir(model_dir):
        check_evaluation(_with_model_config(run_config, model_dir, run_config.parallel), **options)
    lengths = ", ".join(str(length) for length in (seq_lens or [run_config.train.seq_len]))
    run = run_on_ray(_evaluate_on_rank, model_dir, run_config.to_dict(), options, workers=dp * sp,
                     what="evaluation through Ray", name=unique_run_name("mcdist-eval"), address=address,
                     use_gpu=use_gpu, device=device, cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                     timeout_s=timeout_s, log=log, describe=f"{run_config.train.task} at L = {lengths}, dp {dp} × "
                                                            f"sp {sp} ({run_config.parallel.layout}), model {model_dir}")
    return run.result["results"]


def format_table(results: Sequence[dict]) -> str:
    """The results as aligned text lines: one per length (and depth), one per position bucket below it; with
    passkey depths, then the accuracy grid (a row per length, a column per depth: the needle-in-a-haystack view)."""
    lines = []
    for entry in results:
        depth = f"  depth {entry['depth']:.2f}" if "depth" in entry else ""
        lines.append(f"seq_len {entry['seq_len']:>9,}{depth}  accuracy {entry['eval_accuracy']:.4f}  loss "
                     f"{entry['eval_loss']:.4f}  ({entry['labelled']:,} labelled)")
        for bucket in entry.get("by_position", []):
            perplexity = math.exp(min(bucket["eval_loss"], 700.0))
            lines.append(f"    [{bucket['start']:>9,}, {bucket['end']:>9,})  accuracy {bucket['eval_accuracy']:.4f}  "
                         f"loss {bucket['eval_loss']:.4f}  ppl {perplexity:10.3f}  ({bucket['labelled']:,})")
    depths = sorted({entry["depth"] for entry in results if "depth" in entry})
    if depths:
        grid = {(entry["seq_len"], entry["depth"]): entry["eval_accuracy"] for entry in results if "depth" in entry}
        lines.append("accuracy by length (rows) and passkey depth (columns):")
        lines.append(" " * 11 + "".join(f"{depth:>8.2f}" for depth in depths))
        for length in sorted({length for length, _ in grid}):
            lines.append(f"{length:>11,}" + "".join(f"{grid[(length, depth)]:>8.3f}" if (length, depth) in grid
                                                   else " " * 8 for depth in depths))
    return "\n".join(lines)


# -- long documents: the loss by position over whole documents of a token file ----------------------------------


def _document_starts(file: TokenFile, seq_len: int, documents: Optional[int]) -> tuple[List[int], int, int]:
    """(first token of each document scored, how many documents the file holds, the longest one's length)."""
    ends = np.asarray(file.boundaries(), dtype=np.int64)  # [n + 1]
    lengths = np.diff(ends)  # [n]
    starts = ends[:-1][lengths >= seq_len + 1]  # seq_len inputs and the label of the last one, inside the document
    if documents is not None:
        starts = starts[:documents]
    return [int(start) for start in starts], int(lengths.size), int(lengths.max(initial=0))


def check_documents(run_config: RunConfig, data_path: str, *, seq_len: Optional[int] = None,
                    buckets: Optional[int] = None, documents: Optional[int] = None) -> dict:
    """The plan of a long-document evaluation, after checking every argument against the run and the file.

    Args:
        run_config: its ``model`` section the saved model's, ``parallel`` the sp group it runs on (``dp = 1``),
            ``train.seq_len`` the training length, ``train.impl``, ``train.dtype`` and ``train.loss_chunk`` how
            the forward runs.
        data_path: a token file with document boundaries (``mcdist data prepare``), or EOS ids.
        seq_len: positions scored per document, L (default ``DOCUMENT_LENGTH_FACTOR · train.seq_len``); a
            document is scored when it holds at least ``L + 1`` tokens (its EOS included), on its first L.
        buckets: doubling position buckets (:func:`position_edges`); default ``DOCUMENT_BUCKETS``, or as many as
            L allows when fewer.
        documents: score at most this many (the first in the file that are long enough); default all of them.

    Returns:
        ``{"seq_len", "buckets", "edges", "starts" (each document's first token), "documents_in_file",
        "boundaries" (``"file"``: the ``.docs`` file; ``"eos"``: an older file, split at its EOS ids)}``.

    Raises:
        ConfigError: naming the value and what was expected.
    """
    train_len = run_config.train.seq_len
    length = DOCUMENT_LENGTH_FACTOR * train_len if seq_len is None else seq_len
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ConfigError(f"seq_len = {length!r} is invalid; expected an integer >= 2")
    parallel = run_config.parallel
    if parallel.dp != 1:
        raise ConfigError(f"parallel.dp = {parallel.dp}: long documents run one at a time over the sp ranks; "
                          "expected dp = 1")
    if parallel.sp > 1:
        try:
            check_sequence_length(length, parallel.sp, run_config.model.segment_len, parallel.layout)
        except ValueError as error:
            raise ConfigError(f"seq_len = {length} does not fit sp = {parallel.sp}: {error}") from error
    if buckets is None:
        buckets = min(DOCUMENT_BUCKETS, length.bit_length())
    try:
        edges = position_edges(length, buckets)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if documents is not None and (isinstance(documents, bool) or not isinstance(documents, int) or documents < 1):
        raise ConfigError(f"documents = {documents!r} is invalid; expected a positive integer")
    try:
        file = TokenFile(data_path)
        starts, in_file, longest = _document_starts(file, length, documents)
    except TokenFileError as error:
        raise ConfigError(f"--data: {error}") from error
    if file.vocab_size > run_config.model.vocab_size:
        raise ConfigError(f"--data {data_path!r} holds ids of a vocabulary of {file.vocab_size}; the model's "
                          f"vocab_size = {run_config.model.vocab_size} expected at least that")
    if not starts:
        raise ConfigError(f"--data {data_path!r}: none of its {in_file:,} documents holds seq_len + 1 = "
                          f"{length + 1:,} tokens (the longest holds {longest:,}); expected a smaller seq_len or "
                          "longer documents")
    return {"seq_len": length, "buckets": buckets, "edges": edges, "starts": starts, "documents_in_file": in_file,
            "boundaries": file.boundaries_source}


@torch.no_grad()
def evaluate_documents(model: torch.nn.Module, run_config: RunConfig, data_path: str, *, mesh=None,
                       device: torch.device | str = "cpu", seq_len: Optional[int] = None,
                       buckets: Optional[int] = None, documents: Optional[int] = None) -> dict:
    """Score ``model`` on the long documents of ``data_path`` on every rank of ``mesh`` (default: this one
    process; under sp the model already parallelized), with ``train.impl``; arguments as :func:`check_documents`.

    Each document runs alone (batch 1) from its first token; an sp rank reads and runs only its pieces of it
    (``parallel.layout``). Loss, correct arg-maxes and counts are summed per bucket in float64, then over the
    ranks (one all-reduce).

    Returns:
        ``{"seq_len", "train_seq_len", "documents" (scored), "documents_in_file", "boundaries" (where the
        documents come from, as :func:`check_documents`), "eval_loss", "eval_accuracy",
        "perplexity", "labelled", "by_position": [{"start", "end", "eval_loss", "eval_accuracy", "perplexity",
        "labelled"}, ...]}``, the same on every rank; ``perplexity = exp(eval_loss)``.
    """
    mesh = mesh or Mesh.single()
    if mesh.dp * mesh.sp != run_config.parallel.world_size:
        raise ConfigError(f"the mesh is dp {mesh.dp} × sp {mesh.sp}; run_config.parallel says dp "
                          f"{run_config.parallel.dp} × sp {run_config.parallel.sp}")
    plan = check_documents(run_config, data_path, seq_len=seq_len, buckets=buckets, documents=documents)
    length, edges = plan["seq_len"], plan["edges"]
    device = torch.device(device)
    layout = run_config.parallel.layout
    pieces = rank_pieces(length, mesh.sp, mesh.sp_rank, layout) if mesh.sp > 1 else [(0, length)]
    bucket = _position_buckets(pieces, edges, device)
    sums = torch.zeros(len(edges) - 1, 3, dtype=torch.float64, device=device)  # per bucket: loss, correct, count
    file = TokenFile(data_path)
    autocast = autocast_for(run_config.train.dtype, device)
    was_training = model.training
    model.eval()
    try:
        for start in plan["starts"]:
            input_ids, labels = file.read_sequence(start, length, pieces)  # [t] each: this rank's pieces only
            _score_batch(model, input_ids[None].to(device), labels[None].to(device), bucket, sums,
                         autocast=autocast, chunk_tokens=run_config.train.loss_chunk, impl=run_config.train.impl)
    finally:
        model.train(was_training)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)

    def with_perplexity(scores: dict) -> dict:
        return {**scores, "perplexity": math.exp(min(scores["eval_loss"], 700.0))}

    return {"seq_len": length, "train_seq_len": run_config.train.seq_len, "documents": len(plan["starts"]),
            "documents_in_file": plan["documents_in_file"], "boundaries": plan["boundaries"],
            **with_perplexity(_scores(sums.sum(dim=0))),
            "by_position": [{"start": edges[i], "end": edges[i + 1], **with_perplexity(_scores(sums[i]))}
                            for i in range(len(edges) - 1)]}


def evaluate_documents_checkpoint(model_dir: str | os.PathLike, run_config: RunConfig, data_path: str, *,
                                  device: str = "auto", seq_len: Optional[int] = None, buckets: Optional[int] = None,
                                  documents: Optional[int] = None) -> dict:
    """Load the model saved in ``model_dir`` and score it on the long documents of ``data_path`` in this process
    (``run_config``'s ``parallel`` section is ignored, its model section replaced by the saved model's); the
    other arguments as :func:`check_documents`, returns as :func:`evaluate_documents`."""
    model_dir = os.fspath(model_dir)
    run_config = _with_model_config(run_config, model_dir, ParallelConfig())
    options = dict(seq_len=seq_len, buckets=buckets, documents=documents)
    check_documents(run_config, data_path, **options)  # before loading the weights: the cheap checks first
    device = resolve_device(device)
    model, _ = load_model(model_dir, map_location=device)
    return evaluate_documents(model, run_config, data_path, device=device, **options)


def _evaluate_documents_on_rank(rank: int, world_size: int, device: str, where: str, model_dir: str, config: dict,
                                data_path: str, options: dict) -> dict:
    """One sp rank's part (a :mod:`mcdist.runners` rank function): ``{"result": {...}}`` or the first rank's
    problem."""
    loaded = _load_on_rank(config, model_dir, device, where,
                           lambda run: check_documents(run, data_path, **options))
    if "error" in loaded:  # a rank's problem (mcdist.runners.problems.problem)
        return loaded
    model, run_config, mesh = loaded["model"], loaded["run_config"], loaded["mesh"]
    return {"result": evaluate_documents(model, run_config, data_path, mesh=mesh, device=device, **options)}


def evaluate_documents_local(model_dir: str | os.PathLike, run_config: RunConfig, data_path: str, *, sp: int = 1,
                             seq_len: Optional[int] = None, buckets: Optional[int] = None,
                             documents: Optional[int] = None, timeout_s: float = 600.0) -> dict:
    """:func:`evaluate_documents_checkpoint` on ``sp`` new local processes (gloo, CPU), each document spread over
    them as ``run_config.parallel.layout`` lays it out (``seq_len`` must fit it); ``sp = 1`` runs in this process
    on the CPU. The whole run is bounded by ``timeout_s``."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    data_path = os.path.abspath(os.fspath(data_path))
    run_config = _parallel_for(run_config, 1, sp)
    options = dict(seq_len=seq_len, buckets=buckets, documents=documents)
    check_documents(_with_model_config(run_config, model_dir, run_config.parallel), data_path, **options)
    if sp == 1:
        return evaluate_documents_checkpoint(model_dir, run_config, data_path, device="cpu", **options)
    return run_spawned(_evaluate_documents_on_rank, sp, model_dir, run_config.to_dict(), data_path, options,
                       what="long-document evaluation", timeout_s=timeout_s)["result"]


def format_document_table(result: dict) -> str:
    """A long-document result as aligned text lines: the documents scored, then one line per position bucket;
    buckets at or beyond the training length (``train_seq_len``, when known) are marked ``*``."""
    train_len = result["train_seq_len"]
    trained = "training length unknown" if train_len is None else f"trained at {train_len:,}; * = beyond it"
    lines = [f"{result['documents']:,} of {result['documents_in_file']:,} documents, first {result['seq_len']:,} "
             f"positions each ({trained})  loss {result['eval_loss']:.4f}  ppl {result['perplexity']:.3f}  "
             f"accuracy {result['eval_accuracy']:.4f}  ({result['labelled']:,} labelled)"]
    for bucket in result["by_position"]:
        mark = "*" if train_len is not None and bucket["start"] >= train_len else " "
        lines.append(f"  {mark} [{bucket['start']:>9,}, {bucket['end']:>9,})  loss {bucket['eval_loss']:.4f}  ppl "
                     f"{bucket['perplexity']:10.3f}  accuracy {bucket['eval_accuracy']:.4f}  ({bucket['labelled']:,})")
    return "\n".join(lines)
