"""Deep memory: a 2-layer MLP M(z) = z + W2 φ(W1 z) trained online by mini-batch gradient descent (docs/math.md
§3.2): the token loop (``naive``), the batched PyTorch path (``chunked``) and the reads, behind one dispatching
function. There is no Triton kernel for deep memory."""

from __future__ import annotations

from mcdist.ops.deep_memory.chunked import deep_memory_chunked, gelu_derivative
from mcdist.ops.deep_memory.contract import (PASS_DOC, DeepMemoryPass, DeepState, check_deep_memory_args,
                                             deep_state_of)
from mcdist.ops.deep_memory.naive import deep_memory_reference
from mcdist.ops.deep_memory.read import apply_minibatch_weights, deep_online_read, mlp_read
from mcdist.ops.dispatch import check_impl

__all__ = ["deep_memory", "deep_memory_chunked", "deep_memory_reference", "DeepMemoryPass", "DeepState",
           "check_deep_memory_args", "deep_state_of", "apply_minibatch_weights", "deep_online_read", "mlp_read",
           "gelu_derivative"]


def deep_memory(k, v, theta, *, kind, segment_len, minibatch_len, state_init, inner_lr, init_weights,
                momentum=None, decay=None, initial_state=None, impl="auto") -> DeepMemoryPass:
    kwargs = dict(kind=kind, segment_len=segment_len, minibatch_len=minibatch_len, state_init=state_init,
                  inner_lr=inner_lr, init_weights=init_weights, momentum=momentum, decay=decay,
                  initial_state=initial_state)
    check_impl(impl, ("auto", "chunked", "reference"), op="deep_memory (no Triton kernel)")
    if impl == "reference":
        return deep_memory_reference(k, v, theta, **kwargs)
    return deep_memory_chunked(k, v, theta, **kwargs)


deep_memory.__doc__ = ("The deep memory pass. impl: 'reference' (the token loop), 'chunked' or 'auto' (both the "
                       "chunked path); 'triton' raises ValueError (no kernel)." + PASS_DOC)
