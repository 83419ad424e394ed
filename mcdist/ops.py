"""Dispatch of the core operations to their implementations.

``impl``: 'reference' (token loops), 'chunked' (batched PyTorch, the CPU path), 'triton' (the kernels in
``mcdist.kernels``; on CUDA, or on CPU under ``TRITON_INTERPRET=1``), 'auto' (Triton for CUDA tensors when the
kernels import, else chunked).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from mcdist.aggregate import cached_read_backward_chunked, cached_read_chunked, cached_read_reference
from mcdist.memory.linear import LinearMemoryPass, linear_memory_chunked, linear_memory_reference

# Triton kernel for the ssc read (`selected` given, matrix states): 'blocks' (mcdist.kernels.cached_read, loops
# over every state for a block of tokens) or 'gather' (mcdist.kernels.ssc_read, groups the selected pairs by
# state; work ∝ T·K). Read at call time, so it can be changed after import (docs/kernels.md, "ssc gather read").
SSC_READ = os.environ.get("MCDIST_SSC_READ", "blocks")
_SSC_READS = ("blocks", "gather")

# ssc top-k selection where impl resolves to 'triton': 'sort' (the PyTorch path of mcdist.aggregate.select_top_k:
# scores in memory, torch.topk) or 'fused' (mcdist.kernels.select_topk, one pass with no scores in memory). Read at
# call time; the default stays 'sort' until 'fused' is measured on a GPU (docs/kernels.md, "ssc fused selection").
SSC_SELECT = os.environ.get("MCDIST_SSC_SELECT", "sort")
_SSC_SELECTS = ("sort", "fused")


@functools.lru_cache(maxsize=None)
def _triton_module(name: str):
    import importlib

    return importlib.import_module(f"mcdist.kernels.{name}")


def triton_available() -> bool:
    try:
        _triton_module("linear_memory")
        _triton_module("cached_read")
    except Exception:  # triton missing, or no backend on this machine
        return False
    return True


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    if impl not in ("auto", "chunked", "reference", "triton"):
        raise ValueError(f"impl = {impl!r}; expected 'auto', 'chunked', 'reference' or 'triton'")
    if impl != "auto":
        if impl == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("impl = 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                             "imported to run the kernels on the CPU")
        return impl
    if tensor.is_cuda and triton_available():
        return "triton"
    return "chunked"


def fused_select(impl: str, tensor: torch.Tensor) -> bool:
    """Whether ``mcdist.aggregate.select_top_k`` runs the fused Triton kernel: ``impl`` resolves to 'triton' and
    SSC_SELECT is 'fused'. Raises ValueError for an unknown SSC_SELECT or impl."""
    if SSC_SELECT not in _SSC_SELECTS:
        raise ValueError(f"MCDIST_SSC_SELECT (mcdist.ops.SSC_SELECT) = {SSC_SELECT!r}; expected 'sort' or 'fused'")
    return resolve_impl(impl, tensor) == "triton" and SSC_SELECT == "fused"


def linear_memory(q, k, v, log_decay=None, *, segment_len, chunk_len, state_init, initial_state=None,
                  impl="auto") -> LinearMemoryPass:
    """The linear memory pass (docs/architecture.md); see ``linear_memory_chunked`` for arguments."""
    impl = resolve_impl(impl, q)
    kwargs = dict(segment_len=segment_len, chunk_len=chunk_len, state_init=state_init, initial_state=initial_state)
    if impl == "reference":
        return linear_memory_reference(q, k, v, log_decay, **kwargs)
    if impl == "chunked":
        return linear_memory_chunked(q, k, v, log_decay, **kwargs)
    T = q.shape[1]
    pad = (-T) % chunk_len
    if pad:  # k = v = 0 and no decay on the padding: the states are unchanged (exact)
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        log_decay = F.pad(log_decay, (0, 0, 0, pad)) if log_decay is not None else None
    result = _triton_module("linear_memory").linear_memory_triton(q, k, v, log_decay, **kwargs)
    return LinearMemoryPass(result[0][:, :T], result[1], result[2])


def cached_read(z, u, states, contexts, *, segment_len, gate_scale, query_offset=0, segment_offset=0,
                selected=None, impl="auto"):
    """Partial read of a block of cached states (docs/architecture.md); see ``cached_read_chunked``."""
    impl = resolve_impl(impl, z)
    if SSC_READ not in _SSC_READS:
        raise ValueError(f"MCDIST_SSC_READ (mcdist.ops.SSC_READ) = {SSC_READ!r}; expected 'blocks' or 'gather'")
    kwargs = dict(segment_len=segment_len, gate_scale=gate_scale, query_offset=query_offset,
                  segment_offset=segment_offset, selected=selected)
    if impl == "reference":
        return cached_read_reference(z, u, states, contexts, **kwargs)
    if impl == "triton" and isinstance(states, torch.Tensor):
        if selected is not None and SSC_READ == "gather":
            return _triton_module("ssc_read").ssc_read_triton(z, u, states, contexts, **kwargs)
        return _triton_module("cached_read").cached_read_triton(z, u, states, contexts, **kwargs)
    return cached_read_chunked(z, u, states, contexts, **kwargs)


def cached_read_backward(grad_out, grad_lse, z, u, states, contexts, out, lse, *, segment_len, gate_scale,
                         query_offset=0, segment_offset=0, selected=None, impl="auto"):
    """(dz, du, dstates, dcontexts) of a read of linear states, given the (out, lse) of the whole read it was merged
    into and their gradients: no recomputation of the forward (``cached_read_backward_chunked``). ``impl`` as
    for :func:`cached_read`; 'reference' is not offered (use autograd through ``cached_read``)."""
    impl = resolve_impl(impl, z)
    kwargs = dict(segment_len=segment_len, gate_scale=gate_scale, query_offset=query_offset,
                  segment_offset=segment_offset)
    if impl == "triton":
        module = _triton_module("cached_read")
        module._check_args(z, u, states, contexts, selected, segment_len, query_offset, segment_offset)
        return torch.ops.mcdist.cached_read_triton_backward(
            grad_out, grad_lse, z, u, states, contexts, selected, out.to(torch.float32), lse.to(torch.float32),
            int(segment_len), float(gate_scale), int(query_offset), int(segment_offset))
    if impl == "reference":
        raise ValueError("cached_read_backward: impl = 'reference' has no direct backward; expected 'auto', "
                         "'chunked' or 'triton'")
    return cached_read_backward_chunked(grad_out, grad_lse, z, u, states, contexts, out, lse, selected=selected,
                                        **kwargs)
