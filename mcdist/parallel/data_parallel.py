"""Data parallelism over every rank of the dp × sp mesh, by torch's own tools: DDP, or FSDP2 ``fully_shard``.

Each rank's loss is its share ``Σ local cross-entropy / labelled tokens of the whole world`` (dp rows and sp
pieces alike), so the exact gradient of the mean loss is the plain *sum* of the ranks' gradients; sp ranks hold
the same weights as their dp peers and their gradients are summed too. As torchtitan does with context
parallelism, the flattened (dp, sp) ranks are one data-parallel group for this (``Mesh.dp_sp_mesh``, a process
group of its own, so its asynchronous all-reduces never mix with the ring's sends and all-gathers on the sp
group). docs/distributed.md, "Data parallelism and FSDP".

* DDP (default): the model's ``loss_sum`` runs as the forward of a DDP-wrapped module (:class:`LossSum`), whose
  bucketed all-reduces overlap the backward; a communication hook sums (DDP itself averages).
* FSDP2 (``parallel.fsdp``): ``fully_shard`` of every block, then of the whole model, over the same ranks:
  weights, gradients and optimizer state are sharded (1/world each); the reduce-scatter sums (divide factor 1).
  Checkpoints still hold the full weights and the AdamW state in ``optimizer.state_dict()``'s own form (gathered
  on rank 0), so they resume sharded or not, under any layout.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from mcdist.model import IGNORE_INDEX, MCLanguageModel
from mcdist.parallel.mesh import Mesh

_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."  # what checkpoint_wrapper inserts into parameter names


def global_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Labelled tokens over every rank of the world (dp × sp)."""
    count = (labels != IGNORE_INDEX).sum().to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(count)
    return count


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``value`` summed over every rank of the world."""
    value = value.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
    return value



def _no_buffer_sync() -> dict:
    """DDP's keyword for "do not re-broadcast buffers at each forward": ``forward_sync_buffers`` since torch 2.13,
    ``broadcast_buffers`` before it (the project supports torch >= 2.11; the GPU machines run 2.11)."""
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}

class LossSum(nn.Module):
    """``model.loss_sum`` as a module's forward: DDP reduces gradients of what runs through its forward only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **options) -> torch.Tensor:
        return self.model.loss_sum(input_ids, labels, **options)


def _sum_buckets(group, bucket):
    """DDP communication hook: all-reduce a gradient bucket by sum (not DDP's average)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _full(value):
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


class DataParallel:
    """One rank's model under data parallelism: the step's forward, gradient sync, clipping, full state dicts.

    Args:
        model: the language model (``MCLanguageModel``), already sequence-parallel when sp > 1 and
            activation-checkpointed if asked; under FSDP it is sharded in place (and its class becomes FSDP's).
        mesh: this rank's mesh (:func:`mcdist.parallel.mesh.build_mesh`).
        fsdp: shard with FSDP2 instead of replicating with DDP.

    In one process (or a world of one) nothing is wrapped: :meth:`loss_sum` is ``model.loss_sum``.
    ``self.model`` is what evaluation and parameter counts use (never the DDP wrapper).
    """

    def __init__(self, model: nn.Module, mesh: Mesh, *, fsdp: bool = False):
        self.model = model
        self.mesh = mesh
        self.world = mesh.dp * mesh.sp
        self.ddp = None
        self.fsdp = fsdp and self.world > 1
        if self.world == 1:
            return
        if mesh.dp_sp_mesh is None:
            raise RuntimeError(f"data parallelism over dp·sp = {self.world} ranks needs a mesh from build_mesh on "
                               "an initialised process group; got a mesh without one")
        if self.fsdp:
            self._shard()
        else:
            from torch.nn.parallel import DistributedDataParallel

            group = mesh.dp_sp_mesh.get_group()
            device = next(model.parameters()).device
            self.ddp = DistributedDataParallel(LossSum(model), process_group=group, **_no_buffer_sync(),
                                               device_ids=[device] if device.type == "cuda" else None)
            self.ddp.register_comm_hook(group, _sum_buckets)

    def _shard(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        mesh = self.mesh.dp_sp_mesh
        for block in self.model.blocks:  # one unit per block: its weights are gathered only while it runs
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)  # the embedding, final norm and head
        # the trainer and evaluation call these, not forward; the root keeps its weights gathered until the
        # backward (FSDP's default for the root), so the head may run after hidden_states returns
        register_fsdp_forward_method(self.model, "hidden_states")
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum: each rank's loss is already its share of the mean
                module.set_force_sum_reduction_for_comms(True)  # SUM then ÷1 (gloo has no PREMUL_SUM)

    # -- the step ------------------------------------------------------------------------------------------------

    def loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor, **options) -> torch.Tensor:
        """``model.loss_sum(input_ids, labels, **options)``, through DDP's forward when replicated."""
        if self.ddp is not None:
            return self.ddp(input_ids, labels, **options)
        return self.model.loss_sum(input_ids, labels, **options)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool):
        """Run a micro-batch's forward and backward inside: ``enabled = False`` only accumulates this rank's
        gradients (DDP ``no_sync``; FSDP keeps them unsharded), ``True`` reduces what was accumulated."""
        if self.ddp is not None and not enabled:
            with self.ddp.no_sync():
                yield
            return
        if self.fsdp:
            self.model.set_requires_gradient_sync(enabled)
        yield

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the (reduced) gradients to ``max_norm`` in total 2-norm (``inf``: no clipping); return the norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(_full(norm))

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def model_to_save(self) -> Optional[nn.Module]:
        """A module holding the full weights, with the model's state-dict names: the model itself when it is
        not sharded; under FSDP (collective: every rank calls it) an unsharded CPU copy on rank 0, ``None``
        elsewhere."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        for alias, name in self._tied_names().items():  # gathered once per name: tie them again
            full[alias] = full[name]
        with torch.device("meta"):
            copy = MCLanguageModel(self.model.config)
        copy.load_state_dict(full, assign=True)
        return copy

    def _tied_names(self) -> dict:
        """``{alias: name}`` for parameters registered under two names (tied embeddings)."""
        first, aliases = {}, {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            name = name.replace(_CHECKPOINT_PREFIX, "")
            if param in first:
                aliases[name] = first[param]
            else:
                first[param] = name
        return aliases

    def load_model_state_dict(self, full: dict) -> None:
        """Fill the model from full (unsharded) tensors, converted to the model's dtypes; under FSDP each rank
        keeps its own shard of them (no communication)."""
        target = self.model.state_dict()
        missing = sorted(set(target) - set(full))
        if missing:
            raise ValueError(f"the weights to load lack {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        self.model.load_state_dict({name: _like(full[name], tensor) for name, tensor in target.items()})

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> Optional[dict]:
        """``optimizer.state_dict()`` of the unsharded AdamW (parameters by index, full tensors) on rank 0,
        ``None`` elsewhere; collective when the state is sharded (FSDP, or ``ZeroRedundancyOptimizer``, which is
        consolidated on rank 0), so every rank calls it."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if not self.fsdp:
            if hasattr(optimizer, "consolidate_state_dict"):
                optimizer.consolidate_state_dict(to=0)
            return optimizer.state_dict() if rank == 0 else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        order = [name for group in full["param_groups"] for name in group["params"]]  # the optimizer's order
        index = {name: number for number, name in enumerate(order)}
        groups, first = [], 0
        for group in full["param_groups"]:
            groups.append({**group, "params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        return {"state": {index[name]: state for name, state in full["state"].items()}, "param_groups": groups}

    def local_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """This rank's form of an unsharded AdamW state dict (what :meth:`optimizer_state_dict` returns), for
        ``optimizer.load_state_dict``: ``state`` itself, or under FSDP with every state tensor replaced by this
        rank's shard of it (sliced locally, no communication)."""
        if not self.fsdp:
            return state
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if set(state.get("state", {})) - set(range(len(params))):
            raise ValueError(f"the optimizer state holds parameters {sorted(state['state'])[:4]}...; this "
                             f"optimizer has {len(params)}")
        return {**state, "state": {
            number: {key: _like(value, params[number]) if torch.is_tensor(value) and value.dim() > 0 else value
                     for key, value in values.items()}
            for number, values in state["state"].items()}}

def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` in ``target``'s dtype and device; for a DTensor target, this rank's shard of it as a DTensor
    placed like ``target`` (sliced locally: every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if full.shape != target.shape:
        raise ValueError(f"a tensor of shape {tuple(full.shape)} does not fit one of shape {tuple(target.shape)}")
    if isinstance(target, DTensor):
        return distribute_tensor(full.to(dtype=target.dtype, device=target.device), target.device_mesh,
                                 target.placements, src_data_rank=None)
    return full.to(dtype=target.dtype, device=target.device)
