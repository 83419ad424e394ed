"""mcdist.ops' choice of implementation: no silent fallback. A Triton kernel that fails to import or to compile
raises under impl='triton' and warns once (naming the error) under impl='auto' before the chunked path runs; an
impl a path cannot honour is a ValueError. Import failures are simulated by hiding the kernel module; 'auto' on
a GPU by standing in for one (mcdist.ops.dispatch._on_cuda)."""

import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402

from checks import assert_rel_close  # noqa: E402
from mcdist import ops  # noqa: E402
from mcdist.ops import dispatch  # noqa: E402


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """No kernel module loaded or warned about yet in mcdist.ops.dispatch (restored afterwards)."""
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_broken", set())


@pytest.fixture
def broken_linear_kernel(monkeypatch, fresh_dispatch):
    """``import mcdist.kernels.linear_memory`` fails with ImportError (a None entry in sys.modules)."""
    monkeypatch.setitem(sys.modules, "mcdist.kernels.linear_memory", None)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "_on_cuda", lambda tensor: True)


def linear_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (0.5 * torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    return (q, k, v, None), dict(segment_len=32, chunk_len=16, state_init="checkpoint")


def test_triton_asked_and_the_kernel_fails_to_import_raises_naming_the_error(broken_linear_kernel):
    args, kw = linear_inputs()
    with pytest.raises(ops.KernelUnavailable, match=r"mcdist\.kernels\.linear_memory failed to import: "
                                                     r"ModuleNotFoundError") as caught:
        ops.linear_memory(*args, impl="triton", **kw)
    assert isinstance(caught.value.__cause__, ImportError)
    with pytest.raises(ops.KernelUnavailable, match="linear_memory"):
        ops.resolve_impl("triton", args[0])
    assert not ops.triton_available()


def test_auto_on_a_gpu_warns_once_naming_the_error_then_runs_chunked(broken_linear_kernel, gpu):
    args, kw = linear_inputs()
    want = ops.linear_memory_chunked(*args, **kw)
    with pytest.warns(RuntimeWarning, match=r"impl = 'auto'.*mcdist\.kernels\.linear_memory failed to import.*"
                                            r"chunked PyTorch path") as record:
        got = ops.linear_memory(*args, impl="auto", **kw)
    assert len(record) == 1
    assert_rel_close(tuple(got), tuple(want), 0.0, "auto's chunked result")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        ops.linear_memory(*args, impl="auto", **kw)


def test_auto_on_the_cpu_runs_chunked_without_trying_the_kernels(broken_linear_kernel):
    args, kw = linear_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_impl("auto", args[0]) == "chunked"
        ops.linear_memory(*args, impl="auto", **kw)


def test_a_kernel_that_fails_to_compile(monkeypatch, fresh_dispatch, gpu):
    """impl='triton': the compile error propagates. impl='auto': one warning naming it, then the chunked path
    (and later calls go straight there)."""
    module = ops.kernel_module("linear_memory")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise CompilationError(None, None, "planted compile failure")

    monkeypatch.setattr(module, "linear_memory_triton", failing)
    args, kw = linear_inputs()
    with pytest.raises(CompilationError, match="planted compile failure"):
        ops.linear_memory(*args, impl="triton", **kw)
    with pytest.warns(RuntimeWarning, match="linear_memory is unusable.*planted compile failure") as record:
        got = ops.linear_memory(*args, impl="auto", **kw)
    assert len(record) == 1 and len(calls) == 2
    assert_rel_close(tuple(got), tuple(ops.linear_memory_chunked(*args, **kw)), 0.0, "auto's chunked result")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.linear_memory(*args, impl="auto", **kw)
    assert len(calls) == 2


def test_other_kernel_errors_are_not_swallowed_by_auto(monkeypatch, fresh_dispatch, gpu):
    module = ops.kernel_module("linear_memory")

    def failing(*args, **kwargs):
        raise RuntimeError("a bug, not a compile failure")

    monkeypatch.setattr(module, "linear_memory_triton", failing)
    args, kw = linear_inputs()
    with pytest.raises(RuntimeError, match="a bug"):
        ops.linear_memory(*args, impl="auto", **kw)


def test_the_ssc_kernels_fail_loudly_too(monkeypatch, fresh_dispatch):
    monkeypatch.setitem(sys.modules, "mcdist.kernels.select_topk", None)
    monkeypatch.setitem(sys.modules, "mcdist.kernels.ssc_read", None)
    u, contexts = torch.randn(1, 9, 2, 4), torch.randn(1, 2, 2, 4)
    with pytest.raises(ops.KernelUnavailable, match="select_topk"):
        ops.select_top_k(u, contexts, segment_len=4, top_k=1, gate_scale=1.0, impl="triton", select="fused")
    z, states = torch.randn(1, 9, 2, 4), torch.randn(1, 2, 2, 4, 4)
    selected = torch.zeros(1, 9, 2, 1, dtype=torch.int64)
    with pytest.raises(ops.KernelUnavailable, match="ssc_read"):
        ops.cached_read(z, u, states, contexts, segment_len=4, gate_scale=1.0, selected=selected, impl="triton",
                        ssc_read="gather")


def test_an_impl_a_path_cannot_honour_is_an_error():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 8, 2, 4, generator=g)
    deep = dict(kind="dla", segment_len=4, minibatch_len=2, state_init="checkpoint", inner_lr=0.1,
                init_weights=(torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, 3, generator=g)))
    with pytest.raises(ValueError, match=r"deep_memory \(no Triton kernel\): impl = 'triton'"):
        ops.deep_memory(k, k, torch.rand(1, 8, 2, generator=g), impl="triton", **deep)
    w1s, w2s = torch.randn(1, 2, 2, 3, 4, generator=g), torch.randn(1, 2, 2, 4, 3, generator=g)
    contexts = torch.randn(1, 2, 2, 4, generator=g)
    with pytest.raises(ValueError, match="cached_read: impl = 'triton' has no kernel for deep-memory states"):
        ops.cached_read(k, k, (w1s, w2s), contexts, segment_len=4, gate_scale=1.0, impl="triton")
    for impl in ("reference", "triton"):
        with pytest.raises(ValueError, match=f"residual_read: impl = '{impl}'"):
            ops.residual_read(k, (w1s, w2s), segment_len=4, impl=impl)
    with pytest.raises(ValueError, match="impl = 'fast'; expected one of 'auto', 'chunked', 'reference', 'triton'"):
        ops.linear_memory(k, k, k, segment_len=4, chunk_len=4, state_init="checkpoint", impl="fast")


def test_auto_reads_deep_states_with_the_chunked_path():
    """Deep states have no kernel: 'auto' means the chunked read (the designed path, not a fallback)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 9, 2, 4, generator=g, dtype=torch.float64)
    states = (torch.randn(1, 2, 2, 3, 4, generator=g, dtype=torch.float64),
              torch.randn(1, 2, 2, 4, 3, generator=g, dtype=torch.float64))
    contexts = torch.randn(1, 2, 2, 4, generator=g, dtype=torch.float64)
    kw = dict(segment_len=4, gate_scale=0.5)
    got = ops.cached_read(z, z, states, contexts, impl="auto", **kw)
    want = ops.cached_read_reference(z, z, states, contexts, **kw)
    assert_rel_close(got[0], want[0], 1e-12, "out")
    assert_rel_close(got[1], want[1], 1e-12, "lse", same_infinities=True)
