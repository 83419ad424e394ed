"""ssc's top-k selection of closed segments (docs/math.md §6): token loop, PyTorch path and the fused Triton kernel
(``mcdist.kernels.select_topk``) behind one dispatching function."""

from __future__ import annotations

from mcdist.ops.dispatch import check_choice, kernel_module, resolve_impl, run_kernel
from mcdist.ops.select_top_k.chunked import select_top_k_chunked
from mcdist.ops.select_top_k.naive import select_top_k_reference

__all__ = ["select_top_k", "select_top_k_chunked", "select_top_k_reference", "SELECTS"]

# Where impl resolves to 'triton': 'sort' (the PyTorch path: scores in memory, torch.topk) or 'fused' (the Triton
# kernel, one pass with no scores in memory). 'sort' stays the default until 'fused' is measured on a GPU
# (docs/kernels.md, "ssc fused selection").
SELECTS = ("sort", "fused")


def select_top_k(u, contexts, *, segment_len, top_k, gate_scale, query_offset=0, token_block=4096, impl="chunked",
                 select="sort"):
    """Each token's top-k closed segments by gate score (docs/math.md §6, ssc); ties go to the lower index.

    Args:
        u: [B, T, H, D]; contexts: [B, N, H, D] of *all* segments from global index 0.
        segment_len: C; top_k: K; gate_scale: τ; query_offset: global position of token 0.
        token_block: tokens the PyTorch path scores at a time.
        impl: 'auto', 'chunked', 'reference' (the token loop) or 'triton' (mcdist.ops.dispatch).
        select: where impl resolves to 'triton', 'sort' (the PyTorch path) or 'fused' (the Triton kernel).
    Returns:
        [B, T, H, top_k] int64 global segment indices in descending score order (equal scores: ascending index),
        −1 where fewer than top_k segments precede the token.
    """
    check_choice("select", select, SELECTS)
    requested = impl
    resolved = resolve_impl(impl, u, kernels=("select_topk",) if select == "fused" else ())
    args = dict(segment_len=segment_len, top_k=top_k, gate_scale=gate_scale, query_offset=query_offset)
    if resolved == "reference":
        return select_top_k_reference(u, contexts, **args)
    if resolved == "triton" and select == "fused":
        return run_kernel(requested, "select_topk",
                          lambda: kernel_module("select_topk").select_top_k_triton(u, contexts, **args),
                          lambda: select_top_k_chunked(u, contexts, token_block=token_block, **args))
    return select_top_k_chunked(u, contexts, token_block=token_block, **args)
