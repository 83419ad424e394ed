"""Which implementation of an op runs: ``impl`` and the Triton kernel modules (docs/kernels.md, "Dispatch").

``impl``: 'reference' (the token loops), 'chunked' (batched PyTorch, the CPU path), 'triton' (the kernels in
``mcdist.kernels``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), 'auto' (Triton for CUDA tensors,
else chunked).

No silent fallback: a kernel module that fails to import (or a kernel that fails to compile) raises under
impl='triton'; under impl='auto' on CUDA it warns once, naming the error, and the chunked path runs.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

IMPLS = ("auto", "chunked", "reference", "triton")

# The kernel modules every op that has a kernel needs; 'auto' resolves to 'triton' only when they import.
CORE_KERNELS = ("linear_memory", "cached_read")

_loaded: dict = {}
_warned: set = set()
_broken: set = set()  # kernels that failed to compile under 'auto': later calls go straight to the chunked path


class KernelUnavailable(RuntimeError):
    """A Triton kernel module that failed to import, or a kernel that failed to compile; ``__cause__`` is why."""


def check_impl(impl: str, allowed=IMPLS, *, op: str = "") -> str:
    """``impl`` if it is one of ``allowed``, else ValueError naming the value (and the op that refuses it)."""
    if impl not in allowed:
        where = f"{op}: " if op else ""
        raise ValueError(f"{where}impl = {impl!r}; expected one of {', '.join(repr(a) for a in allowed)}")
    return impl


def check_choice(name: str, value: str, allowed) -> str:
    """``value`` if it is one of ``allowed``, else ValueError naming the argument and the value."""
    if value not in allowed:
        raise ValueError(f"{name} = {value!r}; expected one of {', '.join(repr(a) for a in allowed)}")
    return value


def kernel_module(name: str):
    """The module ``mcdist.kernels.<name>``; KernelUnavailable (the import error as its cause) if it fails."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"mcdist.kernels.{name}")
        except Exception as error:  # triton missing, no backend, a broken kernel file: re-raised, never hidden
            raise KernelUnavailable(f"the Triton kernels mcdist.kernels.{name} failed to import: "
                                    f"{type(error).__name__}: {error}") from error
    return _loaded[name]


def kernel_error(names=CORE_KERNELS):
    """The KernelUnavailable of the first of ``names`` that fails to import, or None when all import."""
    for name in names:
        try:
            kernel_module(name)
        except KernelUnavailable as error:
            return error
    return None


def triton_available(names=CORE_KERNELS) -> bool:
    """Whether the kernel modules ``names`` import. False also when they fail for a reason other than a missing
    triton: call :func:`kernel_module` to see the error."""
    return kernel_error(names) is None


def warn_fallback(key: str, error: BaseException) -> None:
    """Warn (once per ``key``) that impl='auto' runs the chunked path because a Triton kernel failed."""
    if key in _warned:
        return
    _warned.add(key)
    detail = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the compiler printed
    warnings.warn(f"impl = 'auto': the Triton kernel {key} is unusable ({detail}); running the chunked PyTorch "
                  f"path instead. Pass impl = 'triton' to make this an error, or impl = 'chunked' to silence it.",
                  RuntimeWarning, stacklevel=3)


def _on_cuda(tensor: torch.Tensor) -> bool:
    """Whether 'auto' tries the kernels for ``tensor`` (one place, so a test can stand in for a GPU)."""
    return tensor.is_cuda


def _can_interpret(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_impl(impl: str, tensor: torch.Tensor, kernels=CORE_KERNELS) -> str:
    """The implementation ``impl`` runs for inputs like ``tensor``: 'reference', 'chunked' or 'triton'.

    Args:
        impl: 'auto', 'chunked', 'reference' or 'triton'.
        tensor: an input of the op (its device decides 'auto').
        kernels: the kernel modules the caller needs (names under ``mcdist.kernels``).
    Raises:
        ValueError: an unknown impl, or 'triton' for CPU tensors without TRITON_INTERPRET=1.
        KernelUnavailable: impl = 'triton' and a kernel module fails to import.
    'auto' on CUDA with a kernel module that fails to import warns once (naming the error) and gives 'chunked'.
    """
    check_impl(impl)
    if impl == "triton":
        if not _can_interpret(tensor):
            raise ValueError("impl = 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                             "imported to run the kernels on the CPU")
        error = kernel_error(kernels)
        if error is not None:
            raise error
        return "triton"
    if impl != "auto":
        return impl
    if not _on_cuda(tensor):
        return "chunked"
    error = kernel_error(kernels)
    if error is not None:
        warn_fallback("/".join(kernels), error)
        return "chunked"
    return "triton"


def compile_errors() -> tuple:
    """The exception types of a Triton kernel that fails to compile or to fit the device (empty without triton)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except Exception:  # no triton: no kernel ran, so there is nothing to catch
        return ()
    return (CompilationError, OutOfResources)


def run_kernel(requested: str, key: str, kernel, fallback):
    """``kernel()``; where it fails to compile and ``requested`` was 'auto', warn once and return ``fallback()``.

    Under impl = 'triton' the compile error propagates. Other errors (bad arguments, wrong results) always do.
    """
    if requested != "auto":
        return kernel()
    if key in _broken:
        return fallback()
    try:
        return kernel()
    except compile_errors() as error:
        _broken.add(key)
        warn_fallback(key, error)
        return fallback()
