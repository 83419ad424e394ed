"""The direct backward of a read of linear states from the merged (out, lse) (ops.cached_read_backward), used by
the sequence-parallel ring: against autograd through the merge of two blocks' partials (token-loop reference)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from checks import assert_rel_close  # noqa: E402
from mcdist import ops  # noqa: E402
from mcdist.ops import cached_read_reference, merge_partials  # noqa: E402


def _impls():
    impls = ["chunked"]
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        impls.append("triton")
    return impls


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("ssc", [False, True], ids=["grm", "ssc"])
def test_block_gradients_from_the_merged_statistics(impl, ssc):
    torch.manual_seed(0)
    B, T, H, D, C = 1, 22, 2, 4, 3
    query_offset = 0  # tokens 0..21: segments 0..7; segment 0 sees nothing, segment 7 all 7 states
    n_a, n_b = 3, 4  # block A = segments 0..2, block B = segments 3..6
    dtype = torch.float64 if impl == "chunked" else torch.float32
    z, u = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, D, dtype=dtype)
    states = torch.randn(B, n_a + n_b, H, D, D, dtype=dtype) / 2
    contexts = torch.randn(B, n_a + n_b, H, D, dtype=dtype)
    selected = None
    if ssc:
        generator = torch.Generator().manual_seed(3)
        selected = torch.randint(-1, n_a + n_b, (B, T, H, 2), generator=generator)
    grad_out, grad_lse = torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, H, dtype=dtype)
    settings = dict(segment_len=C, gate_scale=0.7, query_offset=query_offset, selected=selected)

    # reference: autograd through the merge of the two blocks' partials (float64 token loops)
    leaves = [t.detach().double().requires_grad_() for t in (z, u, states, contexts)]
    zr, ur, sr, cr = leaves
    part_a = cached_read_reference(zr, ur, sr[:, :n_a], cr[:, :n_a], segment_offset=0, **settings)
    part_b = cached_read_reference(zr, ur, sr[:, n_a:], cr[:, n_a:], segment_offset=n_a, **settings)
    out, lse = merge_partials(part_a, part_b)
    finite = torch.isfinite(lse)
    assert finite.any() and not finite.all()  # some tokens see nothing: the −inf path is exercised
    loss = (out * grad_out.double()).sum() + (torch.where(finite, lse, 0) * grad_lse.double()).sum()
    expected = torch.autograd.grad(loss, leaves)

    # direct: each block's gradients from the merged statistics alone, summed over the blocks
    grad_z, grad_u = torch.zeros_like(z), torch.zeros_like(u)
    grad_states, grad_contexts = torch.zeros_like(states), torch.zeros_like(contexts)
    for first, last in ((0, n_a), (n_a, n_a + n_b)):
        dz, du, ds, dc = ops.cached_read_backward(grad_out, grad_lse, z, u, states[:, first:last],
                                                  contexts[:, first:last], out.detach().to(dtype),
                                                  lse.detach().to(dtype), segment_offset=first, impl=impl, **settings)
        grad_z += dz.to(dtype)
        grad_u += du.to(dtype)
        grad_states[:, first:last] += ds.to(dtype)
        grad_contexts[:, first:last] += dc.to(dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for name, got, want in zip(("z", "u", "states", "contexts"), (grad_z, grad_u, grad_states, grad_contexts),
                               expected, strict=True):
        assert_rel_close(got, want, tolerance, f"d{name}")


def test_reference_impl_has_no_direct_backward():
    z = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="impl = 'reference'"):
        ops.cached_read_backward(z, z[..., 0], z, z, torch.randn(1, 1, 1, 2, 2), torch.randn(1, 1, 1, 2), z,
                                 z[..., 0], segment_len=2, gate_scale=1.0, impl="reference")
