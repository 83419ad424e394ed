"""Triton kernels for the read of one block of cached memory states (forward and backward).

Implements "Cached read" of docs/architecture.md. For token t and visible state j (global index
``segment_offset + j`` below the token's segment ``(query_offset + t) // segment_len``, and among the token's
``selected`` indices when given):

    r_tj = τ ⟨u_t, c_j⟩,    lse_t = logsumexp_j r_tj,    out_t = Σ_j softmax_j(r_t·) M_j z_t

A token that sees no state gets lse = −inf and out = 0. This is flash attention where every key is one whole
state matrix: the forward keeps a running max, running sum and rescaled accumulator per token. The gradients
(docs/kernels.md, "Cached read kernel"), with p_tj = exp(r_tj − lse_t) and δ_t = ⟨dout_t, out_t⟩ − dlse_t:

    dr_tj = p_tj (⟨dout_t, M_j z_t⟩ − δ_t)
    dz_t = Σ_j p_tj M_jᵀ dout_t          du_t = τ Σ_j dr_tj c_j          (parallel over query blocks)
    dM_j = Σ_t p_tj dout_t z_tᵀ          dc_j = τ Σ_t dr_tj u_t          (parallel over states)

Kernels:
    cached_read_fwd_kernel          programs over (query block, tile of Dout, batch·head); loop over states
    cached_read_bwd_kernel_dzdu     programs over (query block, batch·head); loop over states
    cached_read_bwd_kernel_dmdc     programs over (BLOCK_S states, batch·head); loop over query blocks

Every output element is written by exactly one program: no atomics, the backward is deterministic. Tile sizes
come from fixed heuristics (``_meta``); ``TILE_OVERRIDES`` replaces them for benchmarking.

The public op is :func:`cached_read_triton`; it is the custom op ``mcdist::cached_read_triton`` (fake
implementation + autograd formula), so ``torch.compile`` treats it as one opaque node.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mcdist.kernels._interpreter import interpreting

__all__ = ["cached_read_triton", "FP32_DOT_PRECISION", "TILE_OVERRIDES"]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# tl.dot operands when both z and the states are float32 (on GPU). "bf16": cast the tiles to bfloat16 (fp32
# accumulation; ~3e-3 relative error, full tensor-core speed); "tf32x3": three tf32 products, close to float32
# accuracy but register-bound (spills at D = 128); "tf32": ~1e-3 error; "ieee": exact float32 on CUDA cores
# (slow). Read at launch time. Scores, softmax statistics and accumulators are float32 in every mode.
FP32_DOT_PRECISION = "tf32x3"
_FP32_DOT_PRECISIONS = ("bf16", "tf32", "tf32x3", "ieee")


def _interpreting() -> bool:
    return interpreting()


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def tile_mask(mask_rows, offs_cols, N: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK_T, BLOCK] load/store mask; the column test is compiled out when the block is exactly N wide."""
    if BLOCK == N:
        mask = mask_rows[:, None]  # tl.load/tl.store broadcast it over the columns
    else:
        mask = mask_rows[:, None] & (offs_cols[None, :] < N)
    return mask


@triton.jit
def _load_selected(selected_ptr, tok, offs_t, mask_t, H, K, BLOCK_K: tl.constexpr):
    """[BLOCK_T, BLOCK_K] int64 selected indices of a block of tokens; −1 outside."""
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(selected_ptr + tok * K + (offs_t * H * K)[:, None] + offs_k[None, :],
                   mask=mask_t[:, None] & (offs_k[None, :] < K), other=-1)


@triton.jit
def _visible(seg_t, mask_t, g, sel, HAS_SELECTED: tl.constexpr):
    """[BLOCK_T] bool: which tokens of the block see the state with global index g."""
    visible = mask_t & (g < seg_t)
    if HAS_SELECTED:
        visible = visible & (tl.sum((sel == g).to(tl.int32), axis=1) > 0)
    return visible


@triton.jit
def _any(visible, HAS_SELECTED: tl.constexpr):
    """Whether any token of the block sees the state. Without selection every (state, block) pair the loops visit
    has a visible token (they stop at the block's last segment / start at the state's first reader), so the
    cross-warp reduction is compiled out."""
    if HAS_SELECTED:
        result = tl.max(visible.to(tl.int32), axis=0) > 0
    else:
        result = True
    return result


@triton.jit
def cached_read_fwd_kernel(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    states_ptr,  # [B, NB, H, DOUT, DIN]
    contexts_ptr,  # [B, NB, H, DC]
    selected_ptr,  # [B, T, H, K] int64 (read only when HAS_SELECTED)
    out_ptr,  # [B, T, H, DOUT] float32 out
    lse_ptr,  # [B, T, H] float32 out
    T,
    H,
    NB,
    K,
    segment_len,
    query_offset,
    segment_offset,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    HAS_SELECTED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Later query blocks see more states: launch them first so the tail of the grid is short work.
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    t0 = pid_t * BLOCK_T
    tok = (b * T + t0) * H + h  # int64 index of (b, t0, h); offsets inside the block are int32

    offs_t = tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_o = pid_o * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    offs_c = tl.arange(0, BLOCK_DC)
    mask_t = t0 + offs_t < T
    rows = offs_t * H  # [BT]

    z = tl.load(z_ptr + tok * DIN + (rows * DIN)[:, None] + offs_i[None, :],
                mask=tile_mask(mask_t, offs_i, DIN, BLOCK_DIN), other=0.0).to(DOT_DTYPE)  # [BT, BDIN]
    u = tl.load(u_ptr + tok * DC + (rows * DC)[:, None] + offs_c[None, :],
                mask=tile_mask(mask_t, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)  # [BT, BDC]
    if HAS_SELECTED:
        sel = _load_selected(selected_ptr, tok, offs_t, mask_t, H, K, BLOCK_K)  # [BT, BK]
    else:
        sel = None

    seg_t = (query_offset + t0 + offs_t) // segment_len  # [BT]
    last_t = tl.minimum(t0 + BLOCK_T, T) - 1
    # States past the block's last segment are invisible to all of its tokens: stop there (causal by segment).
    n_visible = tl.minimum(tl.maximum((query_offset + last_t) // segment_len - segment_offset, 0), NB)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_DOUT], tl.float32)
    m_tile = offs_o[:, None] * DIN + offs_i[None, :]  # [BDOUT, BDIN] inside one state
    m_mask = (offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN)
    for j in range(0, n_visible):
        visible = _visible(seg_t, mask_t, segment_offset + j, sel, HAS_SELECTED)
        if _any(visible, HAS_SELECTED):  # ssc: a state no token of the block selected costs nothing
            state = (b * NB + j) * H + h  # int64
            c = tl.load(contexts_ptr + state * DC + offs_c, mask=offs_c < DC, other=0.0).to(tl.float32)
            r = tl.sum(u * c[None, :], axis=1) * gate_scale  # [BT]
            r = tl.where(visible, r, float("-inf"))
            m_new = tl.maximum(m_i, r)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (−inf) − (−inf)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(r - m_safe)
            if BLOCK_DIN == DIN and DOUT % BLOCK_DOUT == 0:
                m = tl.load(states_ptr + state * (DOUT * DIN) + m_tile)  # [BDOUT, BDIN]
            else:
                m = tl.load(states_ptr + state * (DOUT * DIN) + m_tile, mask=m_mask, other=0.0)
            zm = tl.dot(z, tl.trans(m.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [BT, BDOUT] = M_j z_t
            acc = acc * alpha[:, None] + p[:, None] * zm
            l_i = l_i * alpha + p
            m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log(l_safe), float("-inf"))
    out = acc / l_safe[:, None]  # acc is 0 for a token that saw nothing
    tl.store(out_ptr + tok * DOUT + (rows * DOUT)[:, None] + offs_o[None, :], out,
             mask=mask_t[:, None] & (offs_o[None, :] < DOUT))
    tl.store(lse_ptr + tok + rows, lse, mask=mask_t & (pid_o == 0))


@triton.jit
def cached_read_bwd_kernel_dzdu(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    states_ptr,  # [B, NB, H, DOUT, DIN]
    contexts_ptr,  # [B, NB, H, DC]
    selected_ptr,  # [B, T, H, K] int64 (read only when HAS_SELECTED)
    lse_ptr,  # [B, T, H] float32
    delta_ptr,  # [B, T, H] float32: ⟨dout, out⟩ − dlse
    dout_ptr,  # [B, T, H, DOUT] in the dot dtype
    dz_ptr,  # [B, T, H, DIN] out (dtype of z)
    du_ptr,  # [B, T, H, DC] out (dtype of u)
    T,
    H,
    NB,
    K,
    segment_len,
    query_offset,
    segment_offset,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    HAS_SELECTED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    t0 = pid_t * BLOCK_T
    tok = (b * T + t0) * H + h

    offs_t = tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_o = tl.arange(0, BLOCK_DOUT)
    offs_c = tl.arange(0, BLOCK_DC)
    mask_t = t0 + offs_t < T
    rows = offs_t * H

    z = tl.load(z_ptr + tok * DIN + (rows * DIN)[:, None] + offs_i[None, :],
                mask=tile_mask(mask_t, offs_i, DIN, BLOCK_DIN), other=0.0).to(tl.float32)  # [BT, BDIN]
    u = tl.load(u_ptr + tok * DC + (rows * DC)[:, None] + offs_c[None, :],
                mask=tile_mask(mask_t, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)  # [BT, BDC]
    dout = tl.load(dout_ptr + tok * DOUT + (rows * DOUT)[:, None] + offs_o[None, :],
                   mask=tile_mask(mask_t, offs_o, DOUT, BLOCK_DOUT), other=0.0).to(DOT_DTYPE)  # [BT, BDOUT]
    lse = tl.load(lse_ptr + tok + rows, mask=mask_t, other=0.0)  # [BT]
    delta = tl.load(delta_ptr + tok + rows, mask=mask_t, other=0.0)  # [BT]
    if HAS_SELECTED:
        sel = _load_selected(selected_ptr, tok, offs_t, mask_t, H, K, BLOCK_K)
    else:
        sel = None

    seg_t = (query_offset + t0 + offs_t) // segment_len
    last_t = tl.minimum(t0 + BLOCK_T, T) - 1
    n_visible = tl.minimum(tl.maximum((query_offset + last_t) // segment_len - segment_offset, 0), NB)

    dz = tl.zeros([BLOCK_T, BLOCK_DIN], tl.float32)
    du = tl.zeros([BLOCK_T, BLOCK_DC], tl.float32)
    m_tile = offs_o[:, None] * DIN + offs_i[None, :]  # [BDOUT, BDIN]
    m_mask = (offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN)
    for j in range(0, n_visible):
        visible = _visible(seg_t, mask_t, segment_offset + j, sel, HAS_SELECTED)
        if _any(visible, HAS_SELECTED):
            state = (b * NB + j) * H + h
            c = tl.load(contexts_ptr + state * DC + offs_c, mask=offs_c < DC, other=0.0).to(tl.float32)
            r = tl.sum(u * c[None, :], axis=1) * gate_scale
            p = tl.where(visible, tl.exp(r - lse), 0.0)  # [BT] final softmax weights
            if BLOCK_DIN == DIN and BLOCK_DOUT == DOUT:
                m = tl.load(states_ptr + state * (DOUT * DIN) + m_tile)
            else:
                m = tl.load(states_ptr + state * (DOUT * DIN) + m_tile, mask=m_mask, other=0.0)
            g = tl.dot(dout, m.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # [BT, BDIN] = M_jᵀ dout_t
            dr = p * (tl.sum(g * z, axis=1) - delta)  # ⟨dout_t, M_j z_t⟩ = ⟨M_jᵀ dout_t, z_t⟩
            dz += p[:, None] * g
            du += dr[:, None] * c[None, :]

    tl.store(dz_ptr + tok * DIN + (rows * DIN)[:, None] + offs_i[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=tile_mask(mask_t, offs_i, DIN, BLOCK_DIN))
    tl.store(du_ptr + tok * DC + (rows * DC)[:, None] + offs_c[None, :], (du * gate_scale).to(du_ptr.dtype.element_ty),
             mask=tile_mask(mask_t, offs_c, DC, BLOCK_DC))


@triton.jit
def _exists(s: tl.constexpr, j0, NB):
    """Whether state j0 + s of a dM/dc program exists (j0 + s < NB); slot 0 always does, so BLOCK_S = 1 tests
    nothing."""
    if s == 0:
        result = True
    else:
        result = j0 + s < NB
    return result


@triton.jit
def _dmdc_init(states_ptr, contexts_ptr, state0, s: tl.constexpr, j0, NB, H, DIN: tl.constexpr,
               DOUT: tl.constexpr, DC: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_DIN: tl.constexpr,
               BLOCK_DOUT: tl.constexpr, BLOCK_DC: tl.constexpr):
    """Slot s of a dM/dc program: (s, M_j [BDOUT, BDIN] in the dot dtype, c_j [BDC] float32, dM accumulator,
    dc accumulator) for state j = j0 + s, whose int64 index is state0 + s·H. A missing state loads as zeros."""
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_o = tl.arange(0, BLOCK_DOUT)
    offs_c = tl.arange(0, BLOCK_DC)
    state = state0 + s * H
    exists = _exists(s, j0, NB)
    m_tile = offs_o[:, None] * DIN + offs_i[None, :]
    m_mask = (offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN) & exists
    m = tl.load(states_ptr + state * (DOUT * DIN) + m_tile, mask=m_mask, other=0.0).to(DOT_DTYPE)
    c = tl.load(contexts_ptr + state * DC + offs_c, mask=(offs_c < DC) & exists, other=0.0).to(tl.float32)
    return s, m, c, tl.zeros([BLOCK_DOUT, BLOCK_DIN], tl.float32), tl.zeros([BLOCK_DC], tl.float32)


@triton.jit
def _dmdc_visible(slot, seg_t, mask_t, g0, j0, NB, sel, HAS_SELECTED: tl.constexpr):
    """(slot, [BLOCK_T] bool): which tokens of the block see the slot's state (global index g0 + s)."""
    return slot, _visible(seg_t, mask_t, g0 + slot[0], sel, HAS_SELECTED) & _exists(slot[0], j0, NB)


@triton.jit
def _dmdc_weights(slot_visible, u, lse, gate_scale):
    """(slot, [BLOCK_T] final softmax weights p_tj of the slot's state)."""
    slot, visible = slot_visible
    r = tl.sum(u * slot[2][None, :], axis=1) * gate_scale
    return slot, tl.where(visible, tl.exp(r - lse), 0.0)


@triton.jit
def _dmdc_accumulate(slot_p, z, u, dout, delta, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block's contribution to the slot's dM_j and dc_j (dc without τ); returns the updated slot."""
    slot, p = slot_p
    s, m, c, dm, dc = slot
    zm = tl.dot(z, tl.trans(m), input_precision=DOT_PRECISION)  # [BT, BDOUT] = M_j z_t
    dr = p * (tl.sum(zm * dout, axis=1) - delta)
    pdout = (dout * p[:, None]).to(DOT_DTYPE)
    dm = tl.dot(tl.trans(pdout), z, dm, input_precision=DOT_PRECISION)  # Σ_t p dout_t z_tᵀ
    dc += tl.sum(dr[:, None] * u, axis=0)
    return s, m, c, dm, dc


@triton.jit
def cached_read_bwd_kernel_dmdc(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    states_ptr,  # [B, NB, H, DOUT, DIN]
    contexts_ptr,  # [B, NB, H, DC]
    selected_ptr,  # [B, T, H, K] int64 (read only when HAS_SELECTED)
    lse_ptr,  # [B, T, H] float32
    delta_ptr,  # [B, T, H] float32: ⟨dout, out⟩ − dlse
    dout_ptr,  # [B, T, H, DOUT] in the dot dtype
    dstates_ptr,  # [B, NB, H, DOUT, DIN] out (dtype of the states)
    dcontexts_ptr,  # [B, NB, H, DC] out (dtype of the contexts)
    T,
    H,
    NB,
    K,
    segment_len,
    query_offset,
    segment_offset,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    HAS_SELECTED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # A program owns the BLOCK_S states j0 .. j0 + BLOCK_S − 1 and streams every query block once for all of
    # them: z, dout and u are loaded once per BLOCK_S states, BLOCK_S× the flops per byte of one state (a program
    # with one state at D = 64 does ~21 MACs per byte of token data: bandwidth-bound). Each state lives in its own
    # slot (a tuple: its M_j, c_j and accumulators), updated by the same code as with one state, so every dot and
    # row-sum keeps the layout of the single-state kernel (stacking the states along Dout into one dot makes the
    # reshapes cost ~90 registers and spill; BLOCK_S = 1 is the single-state kernel, up to address arithmetic).
    # Earlier states are read by more tokens: program 0 owns state 0, the longest, and launches first.
    j0 = tl.program_id(0) * BLOCK_S
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    g0 = segment_offset + j0

    offs_t = tl.arange(0, BLOCK_T)
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_o = tl.arange(0, BLOCK_DOUT)
    offs_c = tl.arange(0, BLOCK_DC)
    rows = offs_t * H
    state0 = (b * NB + j0) * H + h  # int64 index of state j0; state j0 + s is s·H further
    # Slot s holds state j0 + s (at most 8 slots). Comprehensions over tuples are how Triton unrolls per-slot work.
    states = [_dmdc_init(states_ptr, contexts_ptr, state0, s, j0, NB, H, DIN, DOUT, DC, DOT_DTYPE, BLOCK_DIN,
                         BLOCK_DOUT, BLOCK_DC) for s in (0, 1, 2, 3, 4, 5, 6, 7)[:BLOCK_S]]

    # First token that can see state j0 (the program's earliest): its global position is ≥ (g0 + 1)·segment_len.
    t_first = tl.maximum((g0 + 1) * segment_len - query_offset, 0)
    for t0 in range((t_first // BLOCK_T) * BLOCK_T, T, BLOCK_T):
        tok = (b * T + t0) * H + h
        mask_t = t0 + offs_t < T
        seg_t = (query_offset + t0 + offs_t) // segment_len
        if HAS_SELECTED:
            sel = _load_selected(selected_ptr, tok, offs_t, mask_t, H, K, BLOCK_K)
        else:
            sel = None
        visible = [_dmdc_visible(slot, seg_t, mask_t, g0, j0, NB, sel, HAS_SELECTED) for slot in states]
        seen = visible[0][1]
        for s in tl.static_range(1, BLOCK_S):
            seen = seen | visible[s][1]
        if _any(seen, HAS_SELECTED):  # a block that sees none of the program's states is skipped
            u = tl.load(u_ptr + tok * DC + (rows * DC)[:, None] + offs_c[None, :],
                        mask=tile_mask(mask_t, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)  # [BT, BDC]
            lse = tl.load(lse_ptr + tok + rows, mask=mask_t, other=0.0)
            delta = tl.load(delta_ptr + tok + rows, mask=mask_t, other=0.0)
            weighted = [_dmdc_weights(sv, u, lse, gate_scale) for sv in visible]
            z = tl.load(z_ptr + tok * DIN + (rows * DIN)[:, None] + offs_i[None, :],
                        mask=tile_mask(mask_t, offs_i, DIN, BLOCK_DIN), other=0.0).to(DOT_DTYPE)  # [BT, BDIN]
            dout = tl.load(dout_ptr + tok * DOUT + (rows * DOUT)[:, None] + offs_o[None, :],
                           mask=tile_mask(mask_t, offs_o, DOUT, BLOCK_DOUT), other=0.0).to(tl.float32)  # [BT, BDOUT]
            states = [_dmdc_accumulate(sp, z, u, dout, delta, DOT_DTYPE, DOT_PRECISION) for sp in weighted]

    m_tile = offs_o[:, None] * DIN + offs_i[None, :]  # [BDOUT, BDIN]
    m_mask = (offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN)
    for s in tl.static_range(BLOCK_S):
        state = state0 + s * H
        exists = _exists(s, j0, NB)
        tl.store(dstates_ptr + state * (DOUT * DIN) + m_tile, states[s][3].to(dstates_ptr.dtype.element_ty),
                 mask=m_mask & exists)
        tl.store(dcontexts_ptr + state * DC + offs_c, (states[s][4] * gate_scale).to(dcontexts_ptr.dtype.element_ty),
                 mask=(offs_c < DC) & exists)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(int(n), 1)))


_TORCH_DTYPE = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}


def _dot_dtype(z: torch.Tensor, cached_states: torch.Tensor):
    """Dtype of the tl.dot operands: the narrower of z and the states; fp32 pairs follow FP32_DOT_PRECISION."""
    if _interpreting():
        return tl.float32  # the interpreter has no 16-bit dot
    for t in (cached_states, z):
        if t.dtype == torch.float16:
            return tl.float16
    if torch.bfloat16 in (cached_states.dtype, z.dtype):
        return tl.bfloat16
    if FP32_DOT_PRECISION not in _FP32_DOT_PRECISIONS:
        raise ValueError(f"FP32_DOT_PRECISION = {FP32_DOT_PRECISION!r}; expected one of {_FP32_DOT_PRECISIONS}")
    return tl.bfloat16 if FP32_DOT_PRECISION == "bf16" else tl.float32


# Tile choices merged over _meta's at every launch, for benchmarking: {kernel: {name: value}} with kernel "fwd",
# "dzdu" or "dmdc" and names BLOCK_T, num_warps, num_stages (and BLOCK_S for "dmdc"), plus "heuristics":
# "previous" for the choice before BLOCK_S existed (one state per dM program, 64-token dz blocks), so that one run
# can time both. Values are checked against _TILE_RANGES (all powers of two but num_stages). Empty in normal use.
TILE_OVERRIDES: dict = {}
_TILE_KEYS = {"fwd": ("BLOCK_T", "num_warps", "num_stages"), "dzdu": ("BLOCK_T", "num_warps", "num_stages"),
              "dmdc": ("BLOCK_T", "BLOCK_S", "num_warps", "num_stages")}
_TILE_RANGES = {"BLOCK_T": (16, 1024), "BLOCK_S": (1, 8), "num_warps": (1, 32), "num_stages": (1, 8)}
_HEURISTICS = ("current", "previous")


def _overrides(kernel: str) -> tuple[str, dict]:
    """(heuristics, {name: value} for ``kernel``) from TILE_OVERRIDES, validated."""
    for key, value in TILE_OVERRIDES.items():
        if key == "heuristics":
            if value not in _HEURISTICS:
                raise ValueError(f"TILE_OVERRIDES['heuristics'] = {value!r}; expected one of {_HEURISTICS}")
            continue
        if key not in _TILE_KEYS:
            raise ValueError(f"TILE_OVERRIDES has unknown key {key!r}; allowed: 'heuristics', "
                             f"{', '.join(map(repr, _TILE_KEYS))}")
        if not isinstance(value, dict):
            raise ValueError(f"TILE_OVERRIDES[{key!r}] = {value!r}; expected a dict of {_TILE_KEYS[key]}")
        for name, size in value.items():
            if name not in _TILE_KEYS[key]:
                raise ValueError(f"TILE_OVERRIDES[{key!r}] has unknown key {name!r}; allowed: {_TILE_KEYS[key]}")
            least, most = _TILE_RANGES[name]
            if not isinstance(size, int) or not least <= size <= most or (size & (size - 1) and name != "num_stages"):
                raise ValueError(f"TILE_OVERRIDES[{key!r}][{name!r}] = {size!r}; expected an integer in [{least}, "
                                 f"{most}]{'' if name == 'num_stages' else ', a power of two'}")
    return TILE_OVERRIDES.get("heuristics", "current"), dict(TILE_OVERRIDES.get(kernel, {}))


def _meta(z, cached_states, contexts, selected, kernel: str) -> tuple[dict, dict]:
    """Constexpr tile sizes and launch options of ``kernel`` ("fwd", "dzdu" or "dmdc"): fixed heuristics, not
    autotuned, so compile time stays small; TILE_OVERRIDES is merged over them.

    Chosen from sm_90 compiles (registers, spills and shared memory per tile size; docs/kernels.md, "Launch
    parameters").
    """
    heuristics, overrides = _overrides(kernel)
    din, dout, dc = z.shape[3], cached_states.shape[3], contexts.shape[3]
    k = selected.shape[3] if selected is not None else 1
    dot_dtype = _dot_dtype(z, cached_states)
    block_din, block_dout_full, block_dc = _pow2(din), _pow2(dout), _pow2(dc, 2)
    # The forward tiles Dout over the grid; the backward needs all of Dout in one program (⟨dout, M z⟩).
    block_dout = min(block_dout_full, 128) if kernel == "fwd" else block_dout_full
    area = block_din * block_dout
    # One state tile as loaded (before the cast); "tf32x3" float32 operands take it about twice over in shared memory
    # (at D = 128 two forward stages would need 256 KiB, above the 227 KiB a block may have).
    tile_bytes = area * cached_states.element_size() * (2 if dot_dtype == tl.float32 else 1)
    block_s = 1
    if _interpreting():
        block_t, launch = 16, {}
    elif kernel == "fwd":
        block_t = 128 if area <= 64 * 64 else 64
        launch = {"num_warps": 4 if block_t * block_dout <= 32 * 64 else 8,
                  "num_stages": 3 if tile_bytes <= 32 * 1024 else (2 if tile_bytes <= 64 * 1024 else 1)}
    elif heuristics == "previous":
        block_t = 64 if area <= 128 * 128 else 32
        launch = {"num_warps": 4 if area <= 32 * 32 else 8, "num_stages": 2 if area <= 128 * 128 else 1}
    else:
        block_t, block_s, launch = _backward_tiles(kernel, area, dot_dtype)
    meta = {
        "DIN": din,
        "DOUT": dout,
        "DC": dc,
        "HAS_SELECTED": selected is not None,
        "DOT_DTYPE": dot_dtype,
        "DOT_PRECISION": FP32_DOT_PRECISION if dot_dtype == tl.float32 and not _interpreting() else "tf32",
        "BLOCK_T": overrides.pop("BLOCK_T", block_t),
        "BLOCK_DIN": block_din,
        "BLOCK_DOUT": block_dout,
        "BLOCK_DC": block_dc,
        "BLOCK_K": _pow2(k, 2),
    }
    if kernel == "dmdc":
        meta["BLOCK_S"] = overrides.pop("BLOCK_S", block_s)
    return meta, {**launch, **overrides}


def _backward_tiles(kernel: str, area: int, dot_dtype) -> tuple[int, int, dict]:
    """(BLOCK_T, BLOCK_S, launch options) of a backward kernel on the GPU, from sm_90 compiles (docs/kernels.md,
    "Launch parameters"): no register spills with 16-bit dot operands, shared memory under 200 KiB everywhere.
    float32 operands ("tf32x3" splits every operand in three) need smaller tiles and still spill at D = 128."""
    wide = dot_dtype == tl.float32
    if area <= 32 * 32:
        return 64, 1, {"num_warps": 4, "num_stages": 2}
    if kernel == "dzdu":  # 128 tokens per state load at D ≤ 64, as the forward
        if area <= 64 * 64:
            return (64, 1, {"num_warps": 8, "num_stages": 1}) if wide else (128, 1, {"num_warps": 8, "num_stages": 2})
        if area <= 128 * 128:
            return (32, 1, {"num_warps": 8, "num_stages": 1}) if wide else (64, 1, {"num_warps": 8, "num_stages": 2})
    elif area <= 64 * 64:  # dM/dc: two states per program
        return (16, 2, {"num_warps": 8, "num_stages": 2}) if wide else (64, 2, {"num_warps": 8, "num_stages": 2})
    elif area <= 128 * 128:  # one state: a second one spills at any BLOCK_T
        return (16, 1, {"num_warps": 8, "num_stages": 1}) if wide else (32, 1, {"num_warps": 8, "num_stages": 2})
    return 32, 1, {"num_warps": 8, "num_stages": 1}


def check_args(z, u, cached_states, contexts, selected, segment_len, query_offset, segment_offset):
    if z.dim() != 4 or u.dim() != 4 or tuple(z.shape[:3]) != tuple(u.shape[:3]):
        raise ValueError(f"z and u must be [B, T, H, *] with the same B, T, H; got z {tuple(z.shape)}, "
                         f"u {tuple(u.shape)}")
    B, T, H, din = z.shape
    if cached_states.dim() != 5 or cached_states.shape[0] != B or cached_states.shape[2] != H \
            or cached_states.shape[4] != din:
        raise ValueError(f"cached_states must be [B, Nb, H, Dout, Din] with B={B}, H={H}, Din={din}; "
                         f"got {tuple(cached_states.shape)}")
    nb = cached_states.shape[1]
    if tuple(contexts.shape) != (B, nb, H, u.shape[3]):
        raise ValueError(f"contexts must be [B, Nb, H, Dc] = {(B, nb, H, u.shape[3])}; got {tuple(contexts.shape)}")
    for name, t in (("z", z), ("u", u), ("cached_states", cached_states), ("contexts", contexts)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {_SUPPORTED_DTYPES}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device}; expected {z.device} like z")
    if selected is not None:
        if selected.dim() != 4 or tuple(selected.shape[:3]) != (B, T, H) or selected.dtype != torch.int64:
            raise ValueError(f"selected must be int64 [B, T, H, K] with (B, T, H) = {(B, T, H)}; got "
                             f"{selected.dtype} {tuple(selected.shape)}")
        if selected.device != z.device:
            raise ValueError(f"selected is on {selected.device}; expected {z.device} like z")
    if segment_len <= 0:
        raise ValueError(f"segment_len = {segment_len}; expected a positive integer")
    if query_offset < 0 or segment_offset < 0:
        raise ValueError(f"query_offset = {query_offset}, segment_offset = {segment_offset}; expected both >= 0")
    if z.device.type != "cuda" and not _interpreting():
        raise ValueError(f"cached_read_triton needs CUDA tensors (got device {z.device}); on CPU use "
                         "mcdist.ops.cached_read_chunked, or set TRITON_INTERPRET=1 before importing triton")


def _scalars(z, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset):
    T, H = z.shape[1], z.shape[2]
    return dict(T=T, H=H, NB=cached_states.shape[1], K=selected.shape[3] if selected is not None else 1,
                segment_len=segment_len, query_offset=query_offset, segment_offset=segment_offset,
                gate_scale=float(gate_scale))


def _forward(z, u, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset):
    B, T, H, _ = z.shape
    dout_dim = cached_states.shape[3]
    # NaN poison: an element no program writes fails every comparison downstream.
    out = torch.full((B, T, H, dout_dim), float("nan"), device=z.device, dtype=torch.float32)
    lse = torch.full((B, T, H), float("nan"), device=z.device, dtype=torch.float32)
    if B * T * H == 0:
        return out, lse
    z, u, cached_states, contexts = (t.contiguous() for t in (z, u, cached_states, contexts))
    selected = selected.contiguous() if selected is not None else None
    meta, launch = _meta(z, cached_states, contexts, selected, "fwd")
    grid = (triton.cdiv(T, meta["BLOCK_T"]), max(1, triton.cdiv(dout_dim, meta["BLOCK_DOUT"])), B * H)
    cached_read_fwd_kernel[grid](
        z, u, cached_states, contexts, selected if selected is not None else z, out, lse,
        **_scalars(z, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset),
        **meta, **launch)
    return out, lse


def _backward(d_out, d_lse, z, u, cached_states, contexts, selected, out, lse, segment_len, gate_scale,
              query_offset, segment_offset):
    B, T, H, _ = z.shape
    nb = cached_states.shape[1]
    nan = float("nan")
    dz = torch.full(z.shape, nan, device=z.device, dtype=z.dtype)
    du = torch.full(u.shape, nan, device=z.device, dtype=u.dtype)
    dstates = torch.full(cached_states.shape, nan, device=z.device, dtype=cached_states.dtype)
    dcontexts = torch.full(contexts.shape, nan, device=z.device, dtype=contexts.dtype)
    if B * H == 0 or T == 0 or nb == 0:
        return dz.zero_(), du.zero_(), dstates.zero_(), dcontexts.zero_()
    z, u, cached_states, contexts = (t.contiguous() for t in (z, u, cached_states, contexts))
    selected = selected.contiguous() if selected is not None else None
    meta, launch = _meta(z, cached_states, contexts, selected, "dzdu")
    meta_s, launch_s = _meta(z, cached_states, contexts, selected, "dmdc")
    # dout only ever enters products, so the kernels read it in the dot dtype (half the traffic for bf16).
    d_out = d_out.to(_TORCH_DTYPE[meta["DOT_DTYPE"]]).contiguous()  # [B, T, H, Dout]
    # δ_t = ⟨dout_t, out_t⟩ − dlse_t from the same (rounded) dout the kernels use, so that Σ_j dr_tj = dlse_t
    # holds to float32 rounding. A token that saw nothing has p = 0 everywhere, so its δ is never used.
    delta = ((d_out.to(torch.float32) * out).sum(-1) - d_lse.to(torch.float32)).contiguous()  # [B, T, H]
    lse = lse.contiguous()
    scalars = _scalars(z, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset)
    sel = selected if selected is not None else z
    cached_read_bwd_kernel_dzdu[(triton.cdiv(T, meta["BLOCK_T"]), B * H)](
        z, u, cached_states, contexts, sel, lse, delta, d_out, dz, du, **scalars, **meta, **launch)
    cached_read_bwd_kernel_dmdc[(triton.cdiv(nb, meta_s["BLOCK_S"]), B * H)](
        z, u, cached_states, contexts, sel, lse, delta, d_out, dstates, dcontexts, **scalars, **meta_s, **launch_s)
    return dz, du, dstates, dcontexts


@torch.library.custom_op("mcdist::cached_read_triton", mutates_args=())
def _cached_read_op(
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    selected: Optional[torch.Tensor],
    segment_len: int,
    gate_scale: float,
    query_offset: int,
    segment_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(z, u, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset)


@_cached_read_op.register_fake
def _(z, u, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset):
    B, T, H, _ = z.shape
    return (z.new_empty((B, T, H, cached_states.shape[3]), dtype=torch.float32),
            z.new_empty((B, T, H), dtype=torch.float32))


@torch.library.custom_op("mcdist::cached_read_triton_backward", mutates_args=())
def _cached_read_backward_op(
    d_out: torch.Tensor,
    d_lse: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    selected: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_len: int,
    gate_scale: float,
    query_offset: int,
    segment_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(d_out, d_lse, z, u, cached_states, contexts, selected, out, lse, segment_len, gate_scale,
                     query_offset, segment_offset)


@_cached_read_backward_op.register_fake
def _(d_out, d_lse, z, u, cached_states, contexts, selected, out, lse, segment_len, gate_scale, query_offset,
      segment_offset):
    return (torch.empty_like(z), torch.empty_like(u), torch.empty_like(cached_states), torch.empty_like(contexts))


def _setup_context(ctx, inputs, output):
    z, u, cached_states, contexts, selected, segment_len, gate_scale, query_offset, segment_offset = inputs
    out, lse = output
    ctx.save_for_backward(z, u, cached_states, contexts, selected, out, lse)
    ctx.scalars = (segment_len, gate_scale, query_offset, segment_offset)


def _backward_formula(ctx, d_out, d_lse):
    z, u, cached_states, contexts, selected, out, lse = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    if d_lse is None:
        d_lse = torch.zeros_like(lse)
    dz, du, dstates, dcontexts = torch.ops.mcdist.cached_read_triton_backward(
        d_out, d_lse, z, u, cached_states, contexts, selected, out, lse, *ctx.scalars)
    return dz, du, dstates, dcontexts, None, None, None, None, None


torch.library.register_autograd(_cached_read_op, _backward_formula, setup_context=_setup_context)


def cached_read_triton(
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    *,
    segment_len: int,
    gate_scale: float,
    query_offset: int = 0,
    segment_offset: int = 0,
    selected: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-gated read of one block of cached states, as a partial (Triton; differentiable).

    Args:
        z: [B, T, H, Din] vectors the states are applied to (q, or φ(h) for the soup's second layer).
        u: [B, T, H, Dc] gate queries.
        cached_states: [B, Nb, H, Dout, Din] (float32, bfloat16 or float16).
        contexts: [B, Nb, H, Dc] segment contexts.
        segment_len: C, tokens per segment.
        gate_scale: τ in r_tj = τ ⟨u_t, c_j⟩.
        query_offset: global position of token 0.
        segment_offset: global segment index of state 0.
        selected: optional [B, T, H, K] int64 global segment indices each token may read (−1 = empty slot).
    Returns:
        (out [B, T, H, Dout] float32, lse [B, T, H] float32): the block's softmax-weighted read and the
        log-sum-exp of the visible scores; a token that sees no state gets out 0 and lse −inf.
        Gradients flow to z, u, cached_states and contexts from both out and lse (not to selected).
    """
    check_args(z, u, cached_states, contexts, selected, segment_len, query_offset, segment_offset)
    return _cached_read_op(z, u, cached_states, contexts, selected, int(segment_len), float(gate_scale),
                           int(query_offset), int(segment_offset))
