"""The read of cached states (docs/math.md §6; docs/architecture.md, "Cached read"): token loop, chunked PyTorch
and the Triton kernels (``mcdist.kernels.cached_read``, ``mcdist.kernels.ssc_read``) behind dispatching
functions, and the unweighted read of the `residual` aggregation."""

from __future__ import annotations

import torch

from mcdist.ops.cached_read.chunked import cached_read_backward_chunked, cached_read_chunked, residual_read_chunked
from mcdist.ops.cached_read.contract import States, check_read_args
from mcdist.ops.cached_read.naive import cached_read_reference
from mcdist.ops.cached_read.one_token import cached_read_one_token
from mcdist.ops.dispatch import check_choice, check_impl, kernel_module, resolve_impl, run_kernel

__all__ = ["cached_read", "cached_read_backward", "residual_read", "cached_read_one_token", "cached_read_chunked",
           "cached_read_backward_chunked", "cached_read_reference", "residual_read_chunked", "SSC_READS"]

# The Triton kernel for a read with ``selected`` (ssc): 'blocks' (mcdist.kernels.cached_read, loops over every
# state for a block of tokens) or 'gather' (mcdist.kernels.ssc_read, groups the selected pairs by state; work
# ∝ T·K) (docs/kernels.md, "ssc gather read").
SSC_READS = ("blocks", "gather")


def _no_kernel_for_deep_states(impl: str, op: str) -> None:
    if impl == "triton":
        raise ValueError(f"{op}: impl = 'triton' has no kernel for deep-memory states (W1, W2); expected 'auto', "
                         f"'chunked' or 'reference'")


def cached_read(z, u, states: States, contexts, *, segment_len, gate_scale, query_offset=0, segment_offset=0,
                selected=None, impl="auto", ssc_read="blocks"):
    """Partial read of a block of cached states (docs/architecture.md, "Cached read").

    Args:
        z, u, states, contexts, segment_len, gate_scale, query_offset, segment_offset, selected: see
            ``cached_read_chunked``.
        impl: 'auto', 'chunked', 'reference' (the token loops) or 'triton' (linear states only: there is no
            kernel for deep states, for which 'auto' runs the chunked path).
        ssc_read: the Triton kernel of a read with ``selected``, 'blocks' or 'gather' (where impl resolves to
            'triton').
    Returns:
        (out [B, T, H, Dout], lse [B, T, H]).
    """
    check_choice("ssc_read", ssc_read, SSC_READS)
    check_impl(impl)
    linear = isinstance(states, torch.Tensor)
    if not linear:
        _no_kernel_for_deep_states(impl, "cached_read")
    kwargs = dict(segment_len=segment_len, gate_scale=gate_scale, query_offset=query_offset,
                  segment_offset=segment_offset, selected=selected)
    module = "ssc_read" if selected is not None and ssc_read == "gather" else "cached_read"
    resolved = resolve_impl(impl, z, kernels=(module,)) if linear else ("chunked" if impl == "auto" else impl)
    if resolved == "reference":
        return cached_read_reference(z, u, states, contexts, **kwargs)
    if resolved == "chunked":
        return cached_read_chunked(z, u, states, contexts, **kwargs)
    function = "ssc_read_triton" if module == "ssc_read" else "cached_read_triton"
    return run_kernel(impl, module, lambda: getattr(kernel_module(module), function)(z, u, states, contexts, **kwargs),
                      lambda: cached_read_chunked(z, u, states, contexts, **kwargs))


def cached_read_backward(grad_out, grad_lse, z, u, states, contexts, out, lse, *, segment_len, gate_scale,
                         query_offset=0, segment_offset=0, selected=None, impl="auto"):
    """(dz, du, dstates, dcontexts) of a read of linear states, given the (out, lse) of the whole read it was merged
    into and their gradients: no recomputation of the forward (``cached_read_backward_chunked``).

    ``impl``: 'auto', 'chunked' or 'triton'; 'reference' has no direct backward (use autograd through
    :func:`cached_read`) and raises ValueError.
    """
    check_impl(impl, ("auto", "chunked", "triton"), op="cached_read_backward")
    resolved = resolve_impl(impl, z, kernels=("cached_read",))
    kwargs = dict(segment_len=segment_len, gate_scale=gate_scale, query_offset=query_offset,
                  segment_offset=segment_offset)

    def chunked():
        return cached_read_backward_chunked(grad_out, grad_lse, z, u, states, contexts, out, lse, selected=selected,
                                            **kwargs)

    if resolved == "chunked":
        return chunked()

    def kernel():
        module = kernel_module("cached_read")
        module.check_args(z, u, states, contexts, selected, segment_len, query_offset, segment_offset)
        return torch.ops.mcdist.cached_read_triton_backward(
            grad_out, grad_lse, z, u, states, contexts, selected, out.to(torch.float32), lse.to(torch.float32),
            int(segment_len), float(gate_scale), int(query_offset), int(segment_offset))

    return run_kernel(impl, "cached_read", kernel, chunked)


def residual_read(z, states: States, *, segment_len, query_offset=0, segment_offset=0, impl="auto"):
    """Σ over the visible cached states of M_j(z_t), unweighted (the `residual` aggregation, docs/math.md §6).

    Args:
        z: [B, T, H, Din]; states: [B, Nb, H, Dout, Din] or deep memory's (W1, W2); segment_len: C;
        query_offset, segment_offset: as for :func:`cached_read`.
        impl: 'auto' or 'chunked' (the one implementation); 'reference' and 'triton' raise ValueError.
    Returns:
        [B, T, H, Dout].
    """
    check_impl(impl, ("auto", "chunked"), op="residual_read")
    return residual_read_chunked(z, states, segment_len=segment_len, query_offset=query_offset,
                                 segment_offset=segment_offset)
