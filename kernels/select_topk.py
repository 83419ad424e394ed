"""Triton kernel for the ssc selection: each token's top-k closed segments, scored and selected in one pass.

Same contract as :func:`mcdist.ops.select_top_k`: for token t, the segments visible to it are
j < (query_offset + t) // segment_len (and j < N); with r_tj = τ ⟨u_t, c_j⟩ it returns the K visible j of highest
score in descending score order, equal scores in ascending index, −1 after the last visible one.

    select_top_k_fwd_kernel     programs over (block of BLOCK_T tokens, batch·head); loop over blocks of
                                BLOCK_N contexts up to the last one the block's last token sees

Each program keeps a running top-K per token in registers (scores and indices, [BLOCK_T, BLOCK_K]) and merges
every block of scores into it in K rounds of "take the larger head of (running list, block)"; the scores never
go to memory (the PyTorch path materialises [B, T_block, H, N] of them). The running list only ever holds lower
indices than the current block, so equal scores take the running entry; inside the block, tl.max with
``return_indices_tie_break_left`` takes the lowest index among equals (docs/kernels.md, "ssc fused selection").

Scores are rounded as the PyTorch path rounds them: u is cast to the contexts' dtype, the dot accumulates in
float32, and for 16-bit contexts the product and then τ times it are rounded to that dtype (so 16-bit scores tie
where theirs do). The public op is :func:`select_top_k_triton`, the custom op ``mcdist::select_top_k_triton``
(fake implementation, no autograd: the selection is not differentiated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcdist.kernels._interpreter import interpreting

__all__ = ["select_top_k_triton"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Written before the kernel runs; every output element is overwritten with an index ≥ −1, so one left over means
# a program skipped it (the tests look for it).
UNWRITTEN = -2


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE's precision (to nearest, ties to even), still float32.

    bfloat16 by bit arithmetic: the interpreter's float32 → bfloat16 cast truncates, a GPU's rounds to nearest even,
    and the PyTorch path rounds to nearest even; NaN is not preserved (NaN scores are not supported anyway)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def select_top_k_fwd_kernel(
    u_ptr,  # [B, T, H, D]
    contexts_ptr,  # [B, N, H, D]
    out_ptr,  # [B, T, H, K] int64 out
    T,
    H,
    N,
    K,
    segment_len,
    query_offset,
    gate_scale,
    D: tl.constexpr,
    SCORE_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Later token blocks see more segments (longer loops): they take the first program ids, so they start first.
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_d = offs_d < D
    rows = (b * T + offs_t) * H + h  # [BT] int64: (b, t, h) row of u and of the output

    u = tl.load(u_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
    u = _round_to(u.to(tl.float32), SCORE_DTYPE).to(DOT_DTYPE)  # [BT, BD]; u.to(contexts.dtype), as PyTorch
    sees = tl.minimum((query_offset + offs_t) // segment_len, N)  # [BT] segments visible to each token
    n_hi = tl.minimum((query_offset + tl.minimum(T, (pid_t + 1) * BLOCK_T) - 1) // segment_len, N)

    best = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)  # running top-K, descending; −inf = empty
    best_idx = tl.full([BLOCK_T, BLOCK_K], -1, tl.int32)
    for j0 in range(0, n_hi, BLOCK_N):
        offs_j = j0 + offs_n
        c = tl.load(contexts_ptr + ((b * N + offs_j) * H + h)[:, None] * D + offs_d[None, :],
                    mask=(offs_j < n_hi)[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)  # [BN, BD]
        dot = tl.dot(u, tl.trans(c), input_precision=DOT_PRECISION)  # [BT, BN] float32
        s = _round_to(_round_to(dot, SCORE_DTYPE) * gate_scale, SCORE_DTYPE)
        s = tl.where(offs_j[None, :] < sees[:, None], s, float("-inf"))

        merged = tl.full([BLOCK_T, BLOCK_K], float("-inf"), tl.float32)
        merged_idx = tl.full([BLOCK_T, BLOCK_K], -1, tl.int32)
        for r in range(0, K):
            run_v, run_pos = tl.max(best, axis=1, return_indices=True, return_indices_tie_break_left=True)
            blk_v, blk_pos = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            take_run = run_v >= blk_v  # equal scores: the running entry has the lower index
            run_hit = offs_k[None, :] == run_pos[:, None]  # [BT, BK]
            run_i = tl.sum(tl.where(run_hit, best_idx, 0), axis=1)
            pick_v = tl.where(take_run, run_v, blk_v)
            pick_i = tl.where(take_run, run_i, j0 + blk_pos)
            slot = offs_k[None, :] == r
            merged = tl.where(slot, pick_v[:, None], merged)
            merged_idx = tl.where(slot, pick_i[:, None], merged_idx)
            best = tl.where(run_hit & take_run[:, None], float("-inf"), best)
            s = tl.where((offs_n[None, :] == blk_pos[:, None]) & (~take_run)[:, None], float("-inf"), s)
        best = merged
        best_idx = merged_idx

    # −1 where fewer than K segments are visible; the PyTorch path also drops non-finite scores
    found = (best > float("-inf")) & (best < float("inf"))
    tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], tl.where(found, best_idx, -1).to(tl.int64),
             mask=mask_t[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _meta(u: torch.Tensor, contexts: torch.Tensor, top_k: int) -> tuple[dict, dict]:
    """Constexpr sizes and launch options (fixed heuristics from sm_90 compiles, docs/kernels.md)."""
    d = u.shape[3]
    score_dtype = _TL_DTYPE[contexts.dtype]
    if interpreting():  # the interpreter has no 16-bit dot; 16 is tl.dot's smallest tile
        dot_dtype, precision, block_t, block_n, launch = tl.float32, "ieee", 16, 16, {}
    else:
        # float32 scores in full float32 ("ieee", CUDA cores): the selection is discrete, so a coarser product
        # (tf32) would reorder near-equal scores that the PyTorch path orders
        dot_dtype, precision = score_dtype, "ieee" if score_dtype == tl.float32 else "tf32"
        # no register spills at D = 64 and 128, K = 8 (docs/kernels.md, "ssc fused selection")
        block_t, block_n = 32, 64
        launch = {"num_warps": 8, "num_stages": 2}
    meta = {
        "D": d,
        "SCORE_DTYPE": score_dtype,
        "DOT_DTYPE": dot_dtype,
        "DOT_PRECISION": precision,
        "BLOCK_T": block_t,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
        "BLOCK_K": max(2, triton.next_power_of_2(top_k)),
    }
    return meta, launch


def _check_args(u, contexts, segment_len, top_k, query_offset):
    if u.dim() != 4 or contexts.dim() != 4 or u.shape[0] != contexts.shape[0] or u.shape[2:] != contexts.shape[2:]:
        raise ValueError(f"u must be [B, T, H, D] and contexts [B, N, H, D] with the same B, H, D; got u "
                         f"{tuple(u.shape)}, contexts {tuple(contexts.shape)}")
    for name, t in (("u", u), ("contexts", contexts)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {_SUPPORTED_DTYPES}")
    if contexts.device != u.device:
        raise ValueError(f"contexts is on {contexts.device}; expected {u.device} like u")
    if segment_len <= 0 or top_k <= 0 or query_offset < 0:
        raise ValueError(f"segment_len = {segment_len}, top_k = {top_k}, query_offset = {query_offset}; expected "
                         "segment_len ≥ 1, top_k ≥ 1, query_offset ≥ 0")
    B, T, H, _ = u.shape
    if max(B * T * H, B * contexts.shape[1] * H, query_offset + T) >= 2 ** 31:
        raise ValueError(f"B·T·H, B·N·H and query_offset + T must stay below 2^31; got B, T, H, N = "
                         f"{B}, {T}, {H}, {contexts.shape[1]} and query_offset = {query_offset}")
    if u.device.type != "cuda" and not interpreting():
        raise ValueError(f"select_top_k_triton needs CUDA tensors (got device {u.device}); on CPU use "
                         "mcdist.ops.select_top_k, or set TRITON_INTERPRET=1 before importing triton")


def _select(u, contexts, segment_len, top_k, gate_scale, query_offset):
    B, T, H, _ = u.shape
    out = torch.full((B, T, H, top_k), UNWRITTEN, dtype=torch.int64, device=u.device)
    if B * T * H == 0:
        return out
    u, contexts = u.contiguous(), contexts.contiguous()
    meta, launch = _meta(u, contexts, top_k)
    grid = (triton.cdiv(T, meta["BLOCK_T"]), B * H)
    select_top_k_fwd_kernel[grid](u, contexts, out, T, H, contexts.shape[1], top_k, segment_len, query_offset,
                                  gate_scale, **meta, **launch)
    return out


@torch.library.custom_op("mcdist::select_top_k_triton", mutates_args=())
def _select_top_k_op(u: torch.Tensor, contexts: torch.Tensor, segment_len: int, top_k: int, gate_scale: float,
                     query_offset: int) -> torch.Tensor:
    return _select(u, contexts, segment_len, top_k, gate_scale, query_offset)


@_select_top_k_op.register_fake
def _(u, contexts, segment_len, top_k, gate_scale, query_offset):
    return u.new_empty((*u.shape[:3], top_k), dtype=torch.int64)


def select_top_k_triton(
    u: torch.Tensor,
    contexts: torch.Tensor,
    *,
    segment_len: int,
    top_k: int,
    gate_scale: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """Each token's top-k closed segments by gate score (Triton, one pass; not differentiable).

    Args:
        u: [B, T, H, D] gate queries (float32, bfloat16 or float16).
        contexts: [B, N, H, D] contexts of all segments from global index 0 (float32, bfloat16 or float16).
        segment_len: C, tokens per segment; token t sees segments j < (query_offset + t) // C.
        top_k: K ≥ 1 (may exceed N).
        gate_scale: τ in r_tj = τ ⟨u_t, c_j⟩.
        query_offset: global position of token 0.
    Returns:
        [B, T, H, K] int64 segment indices, descending score, equal scores in ascending index, −1 where fewer than
        K segments are visible: equal to :func:`mcdist.ops.select_top_k` where the scores are computed alike.
    """
    _check_args(u, contexts, int(segment_len), int(top_k), int(query_offset))
    return _select_top_k_op(u.detach(), contexts.detach(), int(segment_len), int(top_k), float(gate_scale),
                            int(query_offset))
