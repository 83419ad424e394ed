"""Generate from a saved model: in this process, on local processes under sequence parallelism, or through Ray.

Prompts decode together ``batch_size`` at a time (:func:`mcdist.infer.complete`, docs/inference.md "Batching"):
each is prefilled, then ``max_new_tokens`` tokens are decoded (fewer when ``eos_id`` comes, which is then the
last new id). Each prompt samples with its own generator seeded by ``seed``, so a prompt's continuation does not
depend on the prompts beside it. Greedy decoding (``temperature = 0``) is deterministic.

* :func:`generate_from_checkpoint`: one process, or every rank of an initialised process group (pass the
  group's :class:`~mcdist.parallel.comm.SPGroup`; every rank returns the same ids).
* :func:`generate_local`: ``nprocs`` gloo processes on this machine's CPUs
  (:func:`mcdist.runners.spawned.run_spawned`).
* :func:`generate_with_ray`: one Ray Train worker per rank (Ray sets up the process group: gloo on CPUs, NCCL on
  GPUs), connected as ``mcdist train --ray`` connects (:func:`mcdist.runners.ray.run_on_ray`).
* :func:`generate_under_torchrun`: this process is one rank of a ``torchrun`` job
  (:func:`mcdist.runners.torchrun.run_under_torchrun`).

Every rank loads the model from ``model_dir`` itself, so the folder must be readable at the same path on every
machine that runs a rank (one machine, or a shared filesystem). A rank that cannot load it reports the error to
the others, and the driver raises it, naming the rank's node.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from mcdist.checkpoint import CheckpointError, load_config, load_model
from mcdist.device import resolve_device
from mcdist.infer import Request, complete
from mcdist.parallel.comm import SPGroup
from mcdist.runners.problems import first_problem, problem
from mcdist.runners.ray import run_on_ray, unique_run_name
from mcdist.runners.spawned import run_spawned
from mcdist.runners.torchrun import run_under_torchrun

__all__ = ["check_request", "generate_from_checkpoint", "generate_local", "generate_under_torchrun",
           "generate_with_ray", "generate_with_model"]

LAYOUTS = ("zigzag", "contiguous")
# what check_request takes
REQUEST_KEYS = ("max_new_tokens", "temperature", "top_k", "seed", "eos_id", "layout", "batch_size")


def check_request(prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None, layout: str = "zigzag",
                  batch_size: int = 8, vocab_size: Optional[int] = None) -> List[List[int]]:
    """The prompts as lists of ints, after checking the request; ``vocab_size`` (the model's) also bounds the ids.

    Raises:
        ValueError: naming the offending value (an empty prompt, an id outside ``[0, vocab_size)``, a negative
            ``max_new_tokens`` ...).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r} is invalid; expected an integer >= 0")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature!r} is invalid; expected a finite number >= 0 (0 = greedy)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k = {top_k!r} is invalid; expected an integer >= 0 (0 = every token)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed = {seed!r} is invalid; expected an integer")
    if layout not in LAYOUTS:
        raise ValueError(f"layout = {layout!r} is invalid; expected 'zigzag' or 'contiguous'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} is invalid; expected a positive integer")
    bound = "" if vocab_size is None else f" [0, {vocab_size}) (the model's vocabulary)"
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0 or (
            vocab_size is not None and eos_id >= vocab_size)):
        raise ValueError(f"eos_id = {eos_id!r} is invalid; expected a token id in{bound or ' [0, vocab)'}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts = {prompts!r} is invalid; expected a non-empty list of token id lists")
    checked = []
    for number, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__") or len(prompt) == 0:
            raise ValueError(f"prompt {number} = {prompt!r} is invalid; expected a non-empty list of token ids")
        ids = []
        for position, value in enumerate(prompt):
            try:
                token = -1 if isinstance(value, bool) else operator.index(value)
            except TypeError:
                token = -1
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                raise ValueError(f"prompt {number}: token id {value!r} at position {position} is invalid; expected "
                                 f"an integer in{bound or ' [0, vocab)'}")
            ids.append(token)
        checked.append(ids)
    return checked


def _resolve_device(device: str, sp) -> torch.device:
    if device == "auto" and sp is not None and sp.size > 1:  # the tensors the collectives take
        device = "cuda" if dist.get_backend(sp.group) == "nccl" else "cpu"
    return resolve_device(device)


def generate_with_model(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None, impl: Optional[str] = None,
                        sp=None, layout: str = "zigzag", batch_size: int = 8) -> List[List[int]]:
    """The new ids of each prompt from ``model`` (an MCLanguageModel, on the device the ids should go to), through
    :func:`mcdist.infer.complete`: prompts decode together ``batch_size`` at a time (docs/inference.md,
    "Batching"), every one with its own generator seeded by ``seed``, so a prompt continues as it would alone; a
    continuation ends after ``eos_id`` when it comes. Arguments as :func:`generate_from_checkpoint`."""
    prompts = check_request(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            seed=seed, eos_id=eos_id, layout=layout, batch_size=batch_size,
                            vocab_size=model.config.vocab_size)
    stops = [[eos_id]] if eos_id is not None else []
    requests = [Request(prompt, max_new_tokens, temperature=temperature, top_k=top_k, stop_ids=stops, seed=seed)
                for prompt in prompts]
    return [completion.new_ids for completion in complete(model, requests, sp=sp, layout=layout, impl=impl,
                                                          max_batch=batch_size)]


def generate_from_checkpoint(model_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                             temperature: float = 0.0, top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None,
                             device: str = "auto", impl: Optional[str] = None, sp=None,
                             layout: str = "zigzag", batch_size: int = 8) -> List[List[int]]:
    """Load the model saved in ``model_dir`` and continue each prompt.

    Args:
        model_dir: a folder written by :func:`mcdist.checkpoint.save_model` (``mcdist train``'s ``out_dir/checkpoint``).
        prompts: token id lists, each non-empty, ids in ``[0, vocab_size)``; lengths may differ.
        max_new_tokens: tokens to decode per prompt (>= 0).
        temperature, top_k: sampling (``temperature = 0``: greedy; ``top_k = 0``: every token).
        seed: seeds each prompt's sampling generator.
        eos_id: stop a prompt's continuation after this id (kept as its last new id).
        device: ``auto`` (CUDA when available; under ``sp``, CUDA with an NCCL group, else CPU), ``cpu``, ``cuda:N``.
        impl: which implementation computes the layers (``auto``, ``chunked``, ``triton``, ``reference``: as
            ``train.impl``); ``None``: ``auto``.
        sp: the :class:`~mcdist.parallel.comm.SPGroup` of an initialised process group to spread each prompt over;
            every rank calls with the same arguments and gets the same result. ``None``: this process alone.
        layout: how a prompt is sharded under ``sp`` (``zigzag`` or ``contiguous``).
        batch_size: prompts of equal length decoded together (at most this many per batch).

    Returns:
        The new ids of each prompt, in order.

    Raises:
        ValueError: a bad request (naming the value). CheckpointError: ``model_dir`` is missing or corrupt (naming
            the path).
    """
    model_dir = os.fspath(model_dir)
    check_request(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                  eos_id=eos_id, layout=layout, batch_size=batch_size)  # before the load: the cheap checks first
    model, _ = load_model(model_dir, map_location=_resolve_device(device, sp))
    return generate_with_model(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               seed=seed, eos_id=eos_id, impl=impl, sp=sp, layout=layout, batch_size=batch_size)


# -- every rank of a process group -------------------------------------------------------------------------------


def _generate_on_rank(rank: int, world_size: int, device: str, where: str, model_dir: str, prompts,
                      options: dict) -> dict:
    """This rank's part of a distributed generation (a :mod:`mcdist.runners` rank function): ``{"new_ids": ...}``,
    or the problem of a rank (any) that cannot load the model or finds the request invalid for it."""
    sp = SPGroup(dist.group.WORLD, rank, world_size, tuple(range(world_size)))
    model, mine = None, None
    try:
        model, _ = load_model(model_dir, map_location=_resolve_device(device, sp))
        check_request(prompts, vocab_size=model.config.vocab_size, **{key: options[key] for key in REQUEST_KEYS})
    except (CheckpointError, ValueError) as error:
        mine = problem(error, where)
    found = first_problem(mine, sp.group)
    if found is not None:
        return found
    return {"new_ids": generate_with_model(model, prompts, sp=sp, **options)}


def _driver_checks(model_dir: str, prompts, options: dict, *, need_local: bool) -> List[List[int]]:
    vocab_size = None
    if need_local or os.path.isdir(model_dir):  # else the workers look for it (a Ray cluster's filesystem)
        vocab_size = load_config(model_dir).vocab_size
    return check_request(prompts, vocab_size=vocab_size, **{key: options[key] for key in REQUEST_KEYS})


def generate_local(model_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   nprocs: int, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                   eos_id: Optional[int] = None, impl: Optional[str] = None, layout: str = "zigzag",
                   batch_size: int = 8, timeout_s: float = 600.0) -> List[List[int]]:
    """:func:`generate_from_checkpoint` with each prompt spread over ``nprocs`` new local processes (gloo, CPU).

    ``nprocs = 1`` runs in this process on the CPU. The whole run is bounded by ``timeout_s`` (TimeoutError after
    every process is terminated). Returns rank 0's result (every rank holds the same).
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs = {nprocs!r} is invalid; expected a positive integer")
    model_dir = os.path.abspath(os.fspath(model_dir))
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id,
                   impl=impl, layout=layout, batch_size=batch_size)
    prompts = _driver_checks(model_dir, prompts, options, need_local=True)
    if nprocs == 1:
        return generate_from_checkpoint(model_dir, prompts, device="cpu", **options)
    return run_spawned(_generate_on_rank, nprocs, model_dir, prompts, options, what="generation",
                       timeout_s=timeout_s)["new_ids"]


def generate_under_torchrun(model_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                            temperature: float = 0.0, top_k: int = 0, seed: int = 0, eos_id: Optional[int] = None,
                            impl: Optional[str] = None, layout: str = "zigzag", batch_size: int = 8,
                            device: str = "auto", timeout_s: float = 600.0) -> List[List[int]]:
    """:func:`generate_from_checkpoint` as this process's rank of a torchrun job: each prompt spread over all of
    torchrun's processes (NCCL and one GPU each when CUDA is there and ``device`` is not ``cpu``, else gloo).
    Every rank returns the same ids (:func:`mcdist.runners.torchrun.run_under_torchrun`)."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id,
                   impl=impl, layout=layout, batch_size=batch_size)
    prompts = check_request(prompts, **{key: options[key] for key in REQUEST_KEYS})
    return run_under_torchrun(_generate_on_rank, model_dir, prompts, options, what="generation", device=device,
                              timeout_s=timeout_s)["new_ids"]


# -- Ray -----------------------------------------------------------------------------------------------------------


def generate_with_ray(model_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                      workers: int = 1, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                      eos_id: Optional[int] = None, impl: Optional[str] = None, layout: str = "zigzag",
                      batch_size: int = 8, address: Optional[str] = None, use_gpu: bool = False, device: str = "auto",
                      cpus_per_worker: int = 1, storage_path: Optional[str] = None, timeout_s: float = 600.0,
                      log: Optional[Callable[[str], None]] = print) -> List[List[int]]:
    """:func:`generate_from_checkpoint` on ``workers`` Ray Train workers, each prompt spread over all of them.

    Args:
        model_dir: the saved model; every worker loads it at this path (made absolute here), so it must be on
            the workers' machines: this one, or a filesystem they share. When it is not on this machine, the
            workers' check is the only one.
        workers: Ray workers = sequence-parallel ranks.
        address, use_gpu, device, cpus_per_worker, storage_path, timeout_s, log: as
            :func:`mcdist.runners.ray.run_on_ray`.
        The others: as :func:`generate_from_checkpoint`.

    Returns:
        Rank 0's result (every rank holds the same).

    Raises:
        ValueError, CheckpointError: as :func:`generate_from_checkpoint` (also when a worker finds them; the
            message then names its node). RayConnectionError: ``address`` cannot be reached. ImportError: no
            Ray Train. RuntimeError: a worker failed otherwise.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, eos_id=eos_id,
                   impl=impl, layout=layout, batch_size=batch_size)
    prompts = _driver_checks(model_dir, prompts, options, need_local=False)
    run = run_on_ray(_generate_on_rank, model_dir, prompts, options, workers=workers,
                     what="generation through Ray", name=unique_run_name("mcdist-generate"), address=address,
                     use_gpu=use_gpu, device=device, cpus_per_worker=cpus_per_worker, storage_path=storage_path,
                     timeout_s=timeout_s, log=log,
                     describe=f"{len(prompts)} prompt(s), sp {workers} ({layout}), model {model_dir}")
    return run.result["new_ids"]
