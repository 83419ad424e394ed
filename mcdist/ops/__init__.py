"""The core operations of an MC layer, one folder per op (token loop ``naive``, batched PyTorch ``chunked`` and
the dispatching function side by side; the Triton kernels live in ``mcdist.kernels``). Callers use
``from mcdist import ops`` and ``ops.<name>``.

``impl`` (every dispatching op): 'reference' (token loops), 'chunked' (batched PyTorch, the CPU path), 'triton'
(the kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), 'auto' (Triton for CUDA tensors where the op has a
kernel, else chunked). A kernel that fails to import or compile raises under 'triton' and warns once under
'auto' (``mcdist.ops.dispatch``). Kernel variants are arguments: ``linear_memory(..., walk=)``,
``cached_read(..., ssc_read=)``, ``select_top_k(..., select=)`` (docs/kernels.md).
"""

from mcdist.ops.cached_read import (SSC_READS, cached_read, cached_read_backward, cached_read_backward_chunked,
                                    cached_read_chunked, cached_read_one_token, cached_read_reference,
                                    residual_read, residual_read_chunked)
from mcdist.ops.contexts import online_scores, segment_contexts
from mcdist.ops.deep_memory import (DeepMemoryPass, DeepState, apply_minibatch_weights, deep_memory,
                                    deep_memory_chunked, deep_memory_reference, deep_online_read, deep_state_of,
                                    mlp_read)
from mcdist.ops.dispatch import KernelUnavailable, kernel_module, resolve_impl, triton_available
from mcdist.ops.dtypes import state_dtype
from mcdist.ops.linear_memory import (WALKS, LinearMemoryPass, linear_memory, linear_memory_chunked,
                                      linear_memory_reference)
from mcdist.ops.merge import masked_softmax, merge_all, merge_partials
from mcdist.ops.select_top_k import SELECTS, select_top_k, select_top_k_chunked, select_top_k_reference

__all__ = [
    "linear_memory", "linear_memory_chunked", "linear_memory_reference", "LinearMemoryPass", "WALKS", "state_dtype",
    "deep_memory", "deep_memory_chunked", "deep_memory_reference", "DeepMemoryPass", "DeepState", "deep_state_of",
    "deep_online_read", "apply_minibatch_weights", "mlp_read",
    "cached_read", "cached_read_backward", "cached_read_one_token", "residual_read", "cached_read_chunked",
    "cached_read_backward_chunked", "cached_read_reference", "residual_read_chunked", "SSC_READS",
    "select_top_k", "select_top_k_chunked", "select_top_k_reference", "SELECTS",
    "segment_contexts", "online_scores", "masked_softmax", "merge_partials", "merge_all",
    "resolve_impl", "triton_available", "kernel_module", "KernelUnavailable",
]
