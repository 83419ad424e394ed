"""Triton kernels for the sparse (ssc) read of one block of cached states, grouped by state (forward and backward).

Same contract as :func:`mcdist.kernels.cached_read.cached_read_triton` with ``selected`` required: for token t
and each distinct index g among its K ``selected`` entries with state j = g − segment_offset in the block
(0 ≤ j < Nb) and g below the token's segment ``(query_offset + t) // segment_len``,

    r_tj = τ ⟨u_t, c_j⟩,    lse_t = logsumexp_j r_tj,    out_t = Σ_j softmax_j(r_t·) M_j z_t

A token that sees no state gets lse = −inf and out = 0. The work is proportional to the number of visible
(token, slot) pairs, T·K, instead of T·Nb for the blocked kernel (docs/kernels.md, "ssc gather read").

Plan (PyTorch, :func:`_pair_plan`): every (token, slot) pair gets the key (batch·head, state); a stable sort
groups each state's pairs contiguously, ``bucket_start`` marks where each group begins, and the groups are cut
into tiles of BLOCK_P pairs. With p_k = exp(r_k − lse_t) and δ_t = ⟨dout_t, out_t⟩ − dlse_t:

    forward   ssc_read_fwd_kernel_pairs    programs over tiles: y_k = M_j z_t (one tl.dot), r_k     per pair
              ssc_read_fwd_kernel_combine  programs over tokens: lse_t, out_t = Σ_k p_k y_k        per token
    backward  ssc_read_bwd_kernel_pairs    programs over tiles: p_k, dr_k = p_k (⟨dout_t, y_k⟩ − δ_t),
                                           p_k M_jᵀ dout_t                                            per pair
              ssc_read_bwd_kernel_dmdc     programs over (batch·head, state), loop over the state's pairs:
                                           dM_j = Σ p_k dout_t z_tᵀ,  dc_j = τ Σ dr_k u_t
              ssc_read_bwd_kernel_dzdu     programs over tokens: dz_t = Σ_k p_k M_jᵀ dout_t,  du_t = τ Σ_k dr_k c_j

Per-pair results go through float32 buffers of B·T·H·K rows (y: Dout wide, the dz terms: Din wide); each row is
written by one program and summed by one program in slot order, so there are no atomics and the result is
deterministic. The public op is :func:`ssc_read_triton`; the kernels run inside the custom op
``mcdist::ssc_read_triton`` (fake implementation + autograd formula), so ``torch.compile`` treats them as one
opaque node; the plan is ordinary PyTorch outside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mcdist.kernels import cached_read as _blocks
from mcdist.kernels.cached_read import tile_mask
from mcdist.kernels._interpreter import interpreting

__all__ = ["ssc_read_triton", "POISON_BUFFERS"]

# Fill every buffer and output with NaN before the kernels run, so an element no program writes shows up as NaN.
# The tests turn it on; it is off by default because the per-pair buffers are B·T·H·K·D floats (a memset of
# gigabytes at T = 64K).
POISON_BUFFERS = False


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(tile_bucket_ptr, tile_start_ptr, tile_stop_ptr, NB, H):
    """The tile of this program: first pair, pair count, and (b, h, state j) of its group."""
    i = tl.program_id(0)
    start = tl.load(tile_start_ptr + i)  # int64
    n = (tl.load(tile_stop_ptr + i) - start).to(tl.int32)  # 0 for the grid's spare programs
    bucket = tl.load(tile_bucket_ptr + i)  # (b·H + h)·NB + j
    bh = bucket // NB
    j = bucket % NB
    b = (bh // H).to(tl.int64)
    h = bh % H
    return start, n, b, h, j


@triton.jit
def ssc_read_fwd_kernel_pairs(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    states_ptr,  # [B, NB, H, DOUT, DIN]
    contexts_ptr,  # [B, NB, H, DC]
    pair_slot_ptr,  # [P] int64: slot index (b·T·H + t·H + h)·K + k of each pair, grouped by (b, h, state)
    tile_bucket_ptr,  # [n_tiles] int32
    tile_start_ptr,  # [n_tiles] int64
    tile_stop_ptr,  # [n_tiles] int64
    y_ptr,  # [P, DOUT] float32 out: M_j z_t per slot
    r_ptr,  # [P] float32 out: τ ⟨u_t, c_j⟩ per slot
    H,
    NB,
    K,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    start, n, b, h, j = _tile(tile_bucket_ptr, tile_start_ptr, tile_stop_ptr, NB, H)
    if n > 0:
        pid_o = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_i = tl.arange(0, BLOCK_DIN)
        offs_o = pid_o * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
        offs_c = tl.arange(0, BLOCK_DC)
        mask_p = offs_p < n
        slot = tl.load(pair_slot_ptr + start + offs_p, mask=mask_p, other=0)  # [BP] int64
        tok = slot // K  # (b·T + t)·H + h

        state = (b * NB + j) * H + h  # int64
        m_tile = states_ptr + state * (DOUT * DIN) + offs_o[:, None] * DIN + offs_i[None, :]
        if BLOCK_DIN == DIN and DOUT % BLOCK_DOUT == 0:
            m = tl.load(m_tile)  # [BDOUT, BDIN]
        else:
            m = tl.load(m_tile, mask=(offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN), other=0.0)
        z = tl.load(z_ptr + tok[:, None] * DIN + offs_i[None, :],
                    mask=tile_mask(mask_p, offs_i, DIN, BLOCK_DIN), other=0.0).to(DOT_DTYPE)  # [BP, BDIN]
        y = tl.dot(z, tl.trans(m.to(DOT_DTYPE)), input_precision=DOT_PRECISION)  # [BP, BDOUT] = M_j z_t
        tl.store(y_ptr + slot[:, None] * DOUT + offs_o[None, :], y,
                 mask=mask_p[:, None] & (offs_o[None, :] < DOUT))
        if pid_o == 0:
            c = tl.load(contexts_ptr + state * DC + offs_c, mask=offs_c < DC, other=0.0).to(tl.float32)  # [BDC]
            u = tl.load(u_ptr + tok[:, None] * DC + offs_c[None, :],
                        mask=tile_mask(mask_p, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)
            r = tl.sum(u * c[None, :], axis=1) * gate_scale  # [BP]
            tl.store(r_ptr + slot, r, mask=mask_p)


@triton.jit
def ssc_read_fwd_kernel_combine(
    slot_state_ptr,  # [NTOK, K] int32: local state index of each slot, −1 if the slot is not visible
    r_ptr,  # [NTOK, K] float32 (read only where visible)
    y_ptr,  # [NTOK, K, DOUT] float32 (read only where visible)
    out_ptr,  # [NTOK, DOUT] float32 out
    lse_ptr,  # [NTOK] float32 out
    NTOK,
    K,
    DOUT: tl.constexpr,
    BLOCK_TOK: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
):
    pid_o = tl.program_id(1)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_TOK + tl.arange(0, BLOCK_TOK)
    offs_o = pid_o * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    mask_t = offs_t < NTOK
    mask_o = offs_o < DOUT

    m_i = tl.full([BLOCK_TOK], float("-inf"), tl.float32)
    for k in range(0, K):
        visible = tl.load(slot_state_ptr + offs_t * K + k, mask=mask_t, other=-1) >= 0
        m_i = tl.maximum(m_i, tl.load(r_ptr + offs_t * K + k, mask=visible, other=float("-inf")))
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # no (−inf) − (−inf) for a token that sees nothing

    l_i = tl.zeros([BLOCK_TOK], tl.float32)
    acc = tl.zeros([BLOCK_TOK, BLOCK_DOUT], tl.float32)
    for k in range(0, K):
        slot = offs_t * K + k
        visible = tl.load(slot_state_ptr + slot, mask=mask_t, other=-1) >= 0
        p = tl.exp(tl.load(r_ptr + slot, mask=visible, other=float("-inf")) - m_safe)  # 0 where not visible
        y = tl.load(y_ptr + slot[:, None] * DOUT + offs_o[None, :], mask=visible[:, None] & mask_o[None, :],
                    other=0.0)
        acc += p[:, None] * y
        l_i += p

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    tl.store(out_ptr + offs_t[:, None] * DOUT + offs_o[None, :], acc / l_safe[:, None],
             mask=mask_t[:, None] & mask_o[None, :])
    tl.store(lse_ptr + offs_t, tl.where(seen, m_i + tl.log(l_safe), float("-inf")), mask=mask_t & (pid_o == 0))


@triton.jit
def ssc_read_bwd_kernel_pairs(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    states_ptr,  # [B, NB, H, DOUT, DIN]
    contexts_ptr,  # [B, NB, H, DC]
    dout_ptr,  # [B, T, H, DOUT] in the dot dtype
    lse_ptr,  # [B, T, H] float32
    delta_ptr,  # [B, T, H] float32: ⟨dout, out⟩ − dlse
    pair_slot_ptr,  # [P] int64
    tile_bucket_ptr,  # [n_tiles] int32
    tile_start_ptr,  # [n_tiles] int64
    tile_stop_ptr,  # [n_tiles] int64
    p_ptr,  # [P] float32 out: softmax weight per slot
    dr_ptr,  # [P] float32 out: gradient of the score per slot
    dzp_ptr,  # [P, DIN] float32 out: p M_jᵀ dout_t per slot
    H,
    NB,
    K,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    start, n, b, h, j = _tile(tile_bucket_ptr, tile_start_ptr, tile_stop_ptr, NB, H)
    if n > 0:
        offs_p = tl.arange(0, BLOCK_P)
        offs_i = tl.arange(0, BLOCK_DIN)
        offs_o = tl.arange(0, BLOCK_DOUT)
        offs_c = tl.arange(0, BLOCK_DC)
        mask_p = offs_p < n
        slot = tl.load(pair_slot_ptr + start + offs_p, mask=mask_p, other=0)  # [BP] int64
        tok = slot // K

        state = (b * NB + j) * H + h
        m = tl.load(states_ptr + state * (DOUT * DIN) + offs_o[:, None] * DIN + offs_i[None, :],
                    mask=(offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN), other=0.0).to(DOT_DTYPE)
        c = tl.load(contexts_ptr + state * DC + offs_c, mask=offs_c < DC, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + tok[:, None] * DIN + offs_i[None, :],
                    mask=tile_mask(mask_p, offs_i, DIN, BLOCK_DIN), other=0.0).to(DOT_DTYPE)
        u = tl.load(u_ptr + tok[:, None] * DC + offs_c[None, :],
                    mask=tile_mask(mask_p, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + tok[:, None] * DOUT + offs_o[None, :],
                       mask=tile_mask(mask_p, offs_o, DOUT, BLOCK_DOUT), other=0.0).to(DOT_DTYPE)
        lse = tl.load(lse_ptr + tok, mask=mask_p, other=0.0)
        delta = tl.load(delta_ptr + tok, mask=mask_p, other=0.0)

        r = tl.sum(u * c[None, :], axis=1) * gate_scale
        p = tl.where(mask_p, tl.exp(r - lse), 0.0)  # [BP]; every pair of a tile is visible, so lse is finite
        y = tl.dot(z, tl.trans(m), input_precision=DOT_PRECISION)  # [BP, BDOUT] = M_j z_t
        dr = p * (tl.sum(y * dout.to(tl.float32), axis=1) - delta)
        g = tl.dot(dout, m, input_precision=DOT_PRECISION)  # [BP, BDIN] = M_jᵀ dout_t
        tl.store(p_ptr + slot, p, mask=mask_p)
        tl.store(dr_ptr + slot, dr, mask=mask_p)
        tl.store(dzp_ptr + slot[:, None] * DIN + offs_i[None, :], p[:, None] * g,
                 mask=tile_mask(mask_p, offs_i, DIN, BLOCK_DIN))


@triton.jit
def ssc_read_bwd_kernel_dmdc(
    z_ptr,  # [B, T, H, DIN]
    u_ptr,  # [B, T, H, DC]
    dout_ptr,  # [B, T, H, DOUT] in the dot dtype
    pair_slot_ptr,  # [P] int64
    bucket_start_ptr,  # [B·H·(NB + 1) + 1] int64: first pair of each (b, h, state) group; state NB = not visible
    p_ptr,  # [P] float32
    dr_ptr,  # [P] float32
    dstates_ptr,  # [B, NB, H, DOUT, DIN] out (dtype of the states)
    dcontexts_ptr,  # [B, NB, H, DC] out (dtype of the contexts)
    H,
    NB,
    K,
    gate_scale,
    DIN: tl.constexpr,
    DOUT: tl.constexpr,
    DC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DOUT: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    # Earlier states are selected by more tokens: the grid's first axis is batch·head, so the programs of state 0
    # (the longest) launch first for every head.
    pid_bh = tl.program_id(0)
    j = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    bucket = pid_bh.to(tl.int64) * (NB + 1) + j
    first = tl.load(bucket_start_ptr + bucket)
    n = (tl.load(bucket_start_ptr + bucket + 1) - first).to(tl.int32)

    offs_p = tl.arange(0, BLOCK_P)
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_o = tl.arange(0, BLOCK_DOUT)
    offs_c = tl.arange(0, BLOCK_DC)
    dm = tl.zeros([BLOCK_DOUT, BLOCK_DIN], tl.float32)
    dc = tl.zeros([BLOCK_DC], tl.float32)
    for i in range(0, tl.cdiv(n, BLOCK_P)):
        mask_p = i * BLOCK_P + offs_p < n
        slot = tl.load(pair_slot_ptr + first + i * BLOCK_P + offs_p, mask=mask_p, other=0)  # [BP] int64
        tok = slot // K
        p = tl.load(p_ptr + slot, mask=mask_p, other=0.0)
        dr = tl.load(dr_ptr + slot, mask=mask_p, other=0.0)
        z = tl.load(z_ptr + tok[:, None] * DIN + offs_i[None, :],
                    mask=tile_mask(mask_p, offs_i, DIN, BLOCK_DIN), other=0.0).to(DOT_DTYPE)
        u = tl.load(u_ptr + tok[:, None] * DC + offs_c[None, :],
                    mask=tile_mask(mask_p, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + tok[:, None] * DOUT + offs_o[None, :],
                       mask=tile_mask(mask_p, offs_o, DOUT, BLOCK_DOUT), other=0.0).to(tl.float32)
        pdout = (dout * p[:, None]).to(DOT_DTYPE)
        dm = tl.dot(tl.trans(pdout), z, dm, input_precision=DOT_PRECISION)  # Σ p dout_t z_tᵀ
        dc += tl.sum(dr[:, None] * u, axis=0)

    state = (b * NB + j) * H + h
    m_mask = (offs_o[:, None] < DOUT) & (offs_i[None, :] < DIN)
    tl.store(dstates_ptr + state * (DOUT * DIN) + offs_o[:, None] * DIN + offs_i[None, :],
             dm.to(dstates_ptr.dtype.element_ty), mask=m_mask)
    tl.store(dcontexts_ptr + state * DC + offs_c, (dc * gate_scale).to(dcontexts_ptr.dtype.element_ty),
             mask=offs_c < DC)


@triton.jit
def ssc_read_bwd_kernel_dzdu(
    slot_state_ptr,  # [NTOK, K] int32: local state index, −1 if not visible
    contexts_ptr,  # [B, NB, H, DC]
    dr_ptr,  # [NTOK, K] float32 (read only where visible)
    dzp_ptr,  # [NTOK, K, DIN] float32 (read only where visible)
    dz_ptr,  # [NTOK, DIN] out (dtype of z)
    du_ptr,  # [NTOK, DC] out (dtype of u)
    NTOK,
    T,
    H,
    NB,
    K,
    gate_scale,
    DIN: tl.constexpr,
    DC: tl.constexpr,
    BLOCK_TOK: tl.constexpr,
    BLOCK_DIN: tl.constexpr,
    BLOCK_DC: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_TOK + tl.arange(0, BLOCK_TOK)  # (b·T + t)·H + h
    offs_i = tl.arange(0, BLOCK_DIN)
    offs_c = tl.arange(0, BLOCK_DC)
    mask_t = offs_t < NTOK
    b = offs_t // (T * H)
    h = offs_t % H

    dz = tl.zeros([BLOCK_TOK, BLOCK_DIN], tl.float32)
    du = tl.zeros([BLOCK_TOK, BLOCK_DC], tl.float32)
    for k in range(0, K):
        slot = offs_t * K + k
        j = tl.load(slot_state_ptr + slot, mask=mask_t, other=-1)
        visible = j >= 0
        dz += tl.load(dzp_ptr + slot[:, None] * DIN + offs_i[None, :],
                      mask=tile_mask(visible, offs_i, DIN, BLOCK_DIN), other=0.0)
        dr = tl.load(dr_ptr + slot, mask=visible, other=0.0)
        c = tl.load(contexts_ptr + ((b * NB + j) * H + h)[:, None] * DC + offs_c[None, :],
                    mask=tile_mask(visible, offs_c, DC, BLOCK_DC), other=0.0).to(tl.float32)
        du += dr[:, None] * c

    tl.store(dz_ptr + offs_t[:, None] * DIN + offs_i[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=tile_mask(mask_t, offs_i, DIN, BLOCK_DIN))
    tl.store(du_ptr + offs_t[:, None] * DC + offs_c[None, :], (du * gate_scale).to(du_ptr.dtype.element_ty),
             mask=tile_mask(mask_t, offs_c, DC, BLOCK_DC))


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _block_pairs(z: torch.Tensor, cached_states: torch.Tensor) -> int:
    """Pairs per tile (BLOCK_P). Fixed: the plan is cut with it before the op runs, forward and backward.

    64 keeps every kernel free of spills on sm_90 for bf16 up to 128 × 128 states; wider states, and float32
    dots (three tf32 products) beyond 64 × 64, take 32.
    """
    if interpreting():
        return 16
    area = _blocks._pow2(z.shape[3]) * _blocks._pow2(cached_states.shape[3])
    limit = 64 * 64 if _blocks._dot_dtype(z, cached_states) == tl.float32 else 128 * 128
    return 64 if area <= limit else 32


def _meta(z, cached_states, contexts, block_p: int, *, backward: bool) -> tuple[dict, dict]:
    """Constexpr sizes and launch options of the pair kernels (fixed heuristics, not autotuned)."""
    din, dout, dc = z.shape[3], cached_states.shape[3], contexts.shape[3]
    dot_dtype = _blocks._dot_dtype(z, cached_states)
    block_din, block_dout_full, block_dc = _blocks._pow2(din), _blocks._pow2(dout), _blocks._pow2(dc, 2)
    # The forward tiles Dout over the grid; the backward needs all of Dout in one program (⟨dout, M z⟩).
    block_dout = block_dout_full if backward else min(block_dout_full, 128)
    if interpreting():
        launch = {}
    elif not backward:
        # float32 dots are three tf32 products (register-heavy): 4 warps spill them badly, 8 do not
        small = block_p * block_dout <= 64 * 64 and dot_dtype != tl.float32
        launch = {"num_warps": 4 if small else 8, "num_stages": 1}
    else:
        launch = {"num_warps": 4 if block_din * block_dout <= 32 * 32 else 8, "num_stages": 2}
    meta = {
        "DIN": din,
        "DOUT": dout,
        "DC": dc,
        "DOT_DTYPE": dot_dtype,
        "DOT_PRECISION": (_blocks.FP32_DOT_PRECISION if dot_dtype == tl.float32 and not interpreting()
                          else "tf32"),
        "BLOCK_P": block_p,
        "BLOCK_DIN": block_din,
        "BLOCK_DOUT": block_dout,
        "BLOCK_DC": block_dc,
    }
    return meta, launch


def _token_meta(width: int) -> tuple[int, dict]:
    """BLOCK_TOK and launch options of the per-token kernels, whose widest row tile is ``width`` floats."""
    return (16, {}) if interpreting() else (32, {"num_warps": 4 if width <= 128 else 8})


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pair_plan(selected, nb, segment_len, query_offset, segment_offset, block_p):
    """Groups the visible (token, slot) pairs by (batch, head, state) and cuts the groups into tiles.

    Returns int tensors (no host synchronisation, shapes known from the inputs):
        slot_state [B, T, H, K] int32: the local state index of each slot (slots sorted per token, so duplicate
            indices are adjacent and only the first counts), −1 where the slot is not visible.
        pair_slot [B·T·H·K] int64: slot indices ordered by (b, h, state), tokens ascending inside a group; the
            slots that are not visible come last in each (b, h) range (group state = Nb).
        bucket_start [B·H·(Nb + 1) + 1] int64: where each (b, h, state) group starts in pair_slot.
        tile_bucket [n] int32, tile_start [n] int64, tile_stop [n] int64: the (b·H + h)·Nb + state group and
            the pair range of each tile of at most block_p pairs; n = ceil(B·T·H·K / block_p) + B·H·Nb bounds
            the number of tiles, and the spare entries have tile_start = tile_stop (empty).
    """
    B, T, H, K = selected.shape
    device = selected.device
    n_groups = B * H * (nb + 1)
    if n_groups >= 2 ** 31:
        raise ValueError(f"B·H·(Nb + 1) = {n_groups} groups; at most 2^31 − 1 supported")
    slots = torch.sort(selected, dim=-1).values  # [B, T, H, K]
    index = slots - segment_offset
    own = (torch.arange(T, device=device) + query_offset) // segment_len  # [T]
    visible = (index >= 0) & (index < nb) & (slots < own[None, :, None, None])
    if K > 1:
        visible[..., 1:] &= slots[..., 1:] != slots[..., :-1]  # a repeated index counts once
    local = torch.where(visible, index, nb).to(torch.int32)  # [B, T, H, K]; nb = not visible
    slot_state = torch.where(visible, local, -1)

    bh = (torch.arange(B, device=device, dtype=torch.int32)[:, None] * H
          + torch.arange(H, device=device, dtype=torch.int32)[None, :])  # [B, H]
    key = bh[:, None, :, None] * (nb + 1) + local  # [B, T, H, K] int32
    sorted_key, pair_slot = torch.sort(key.reshape(-1), stable=True)
    bucket_start = torch.searchsorted(sorted_key, torch.arange(n_groups + 1, device=device, dtype=torch.int32))

    if nb == 0:  # nothing to read: no tiles (the op returns before launching anything)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return slot_state, pair_slot, bucket_start, empty.to(torch.int32), empty, empty
    counts = (bucket_start[1:] - bucket_start[:-1]).view(B * H, nb + 1)[:, :nb].reshape(-1)  # [B·H·Nb]
    tiles = (counts + block_p - 1) // block_p
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = triton.cdiv(B * T * H * K, block_p) + B * H * nb
    tile_id = torch.arange(n_tiles, device=device)
    group = torch.searchsorted(tile_end, tile_id, right=True)  # [n_tiles]; B·H·Nb for the spare tiles
    spare = group >= B * H * nb
    group = group.clamp(max=B * H * nb - 1)
    first_pair = bucket_start[(group // nb) * (nb + 1) + group % nb]
    tile_start = first_pair + (tile_id - (tile_end - tiles)[group]) * block_p
    tile_stop = torch.minimum(tile_start + block_p, first_pair + counts[group])
    tile_start = torch.where(spare, 0, tile_start)
    tile_stop = torch.where(spare, 0, tile_stop)
    return slot_state, pair_slot, bucket_start, group.to(torch.int32), tile_start, tile_stop


def _forward(z, u, cached_states, contexts, slot_state, pair_slot, tile_bucket, tile_start, tile_stop, gate_scale,
             block_p):
    B, T, H, _ = z.shape
    nb, dout_dim = cached_states.shape[1], cached_states.shape[3]
    K = slot_state.shape[3]
    device = z.device
    out = _alloc((B, T, H, dout_dim), torch.float32, device)
    lse = _alloc((B, T, H), torch.float32, device)
    if B * T * H == 0:
        return out, lse
    if nb == 0 or K == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    z, u, cached_states, contexts = (t.contiguous() for t in (z, u, cached_states, contexts))
    meta, launch = _meta(z, cached_states, contexts, block_p, backward=False)
    y = _alloc((B * T * H * K, dout_dim), torch.float32, device)
    r = _alloc((B * T * H * K,), torch.float32, device)
    grid = (tile_bucket.shape[0], triton.cdiv(dout_dim, meta["BLOCK_DOUT"]))
    ssc_read_fwd_kernel_pairs[grid](
        z, u, cached_states, contexts, pair_slot, tile_bucket, tile_start, tile_stop, y, r,
        H, nb, K, float(gate_scale), **meta, **launch)
    block_dout = min(_blocks._pow2(dout_dim), 128)
    block_tok, launch = _token_meta(block_dout)
    ssc_read_fwd_kernel_combine[(triton.cdiv(B * T * H, block_tok), triton.cdiv(dout_dim, block_dout))](
        slot_state, r, y, out, lse, B * T * H, K, DOUT=dout_dim, BLOCK_TOK=block_tok, BLOCK_DOUT=block_dout,
        **launch)
    return out, lse


def _backward(d_out, d_lse, z, u, cached_states, contexts, slot_state, pair_slot, bucket_start, tile_bucket,
              tile_start, tile_stop, out, lse, gate_scale, block_p):
    B, T, H, din = z.shape
    nb = cached_states.shape[1]
    K = slot_state.shape[3]
    device = z.device
    dz = _alloc(z.shape, z.dtype, device)
    du = _alloc(u.shape, u.dtype, device)
    dstates = _alloc(cached_states.shape, cached_states.dtype, device)
    dcontexts = _alloc(contexts.shape, contexts.dtype, device)
    if B * H == 0 or T == 0 or nb == 0 or K == 0:
        return dz.zero_(), du.zero_(), dstates.zero_(), dcontexts.zero_()
    z, u, cached_states, contexts = (t.contiguous() for t in (z, u, cached_states, contexts))
    meta, launch = _meta(z, cached_states, contexts, block_p, backward=True)
    # As in cached_read: dout enters only products, so it is read in the dot dtype, and δ is computed from the
    # same rounded dout so that Σ_k dr_k = dlse_t holds to float32 rounding.
    d_out = d_out.to(_blocks._TORCH_DTYPE[meta["DOT_DTYPE"]]).contiguous()  # [B, T, H, Dout]
    delta = ((d_out.to(torch.float32) * out).sum(-1) - d_lse.to(torch.float32)).contiguous()  # [B, T, H]
    lse = lse.contiguous()
    n_slots = B * T * H * K
    p = _alloc((n_slots,), torch.float32, device)
    dr = _alloc((n_slots,), torch.float32, device)
    dzp = _alloc((n_slots, din), torch.float32, device)
    scalars = dict(H=H, NB=nb, K=K, gate_scale=float(gate_scale))
    ssc_read_bwd_kernel_pairs[(tile_bucket.shape[0],)](
        z, u, cached_states, contexts, d_out, lse, delta, pair_slot, tile_bucket, tile_start, tile_stop, p, dr, dzp,
        **scalars, **meta, **launch)
    ssc_read_bwd_kernel_dmdc[(B * H, nb)](
        z, u, d_out, pair_slot, bucket_start, p, dr, dstates, dcontexts, **scalars, **meta, **launch)
    block_tok, launch = _token_meta(max(meta["BLOCK_DIN"], meta["BLOCK_DC"]))
    ssc_read_bwd_kernel_dzdu[(triton.cdiv(B * T * H, block_tok),)](
        slot_state, contexts, dr, dzp, dz, du, B * T * H, T, H, nb, K, float(gate_scale), DIN=din,
        DC=contexts.shape[3], BLOCK_TOK=block_tok, BLOCK_DIN=meta["BLOCK_DIN"], BLOCK_DC=meta["BLOCK_DC"],
        **launch)
    return dz, du, dstates, dcontexts


@torch.library.custom_op("mcdist::ssc_read_triton", mutates_args=())
def _ssc_read_op(
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    slot_state: torch.Tensor,
    pair_slot: torch.Tensor,
    bucket_start: torch.Tensor,
    tile_bucket: torch.Tensor,
    tile_start: torch.Tensor,
    tile_stop: torch.Tensor,
    gate_scale: float,
    block_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(z, u, cached_states, contexts, slot_state, pair_slot, tile_bucket, tile_start, tile_stop,
                    gate_scale, block_pairs)


@_ssc_read_op.register_fake
def _(z, u, cached_states, contexts, slot_state, pair_slot, bucket_start, tile_bucket, tile_start, tile_stop,
      gate_scale, block_pairs):
    B, T, H, _ = z.shape
    return (z.new_empty((B, T, H, cached_states.shape[3]), dtype=torch.float32),
            z.new_empty((B, T, H), dtype=torch.float32))


@torch.library.custom_op("mcdist::ssc_read_triton_backward", mutates_args=())
def _ssc_read_backward_op(
    d_out: torch.Tensor,
    d_lse: torch.Tensor,
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    slot_state: torch.Tensor,
    pair_slot: torch.Tensor,
    bucket_start: torch.Tensor,
    tile_bucket: torch.Tensor,
    tile_start: torch.Tensor,
    tile_stop: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    gate_scale: float,
    block_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(d_out, d_lse, z, u, cached_states, contexts, slot_state, pair_slot, bucket_start, tile_bucket,
                     tile_start, tile_stop, out, lse, gate_scale, block_pairs)


@_ssc_read_backward_op.register_fake
def _(d_out, d_lse, z, u, cached_states, contexts, slot_state, pair_slot, bucket_start, tile_bucket, tile_start,
      tile_stop, out, lse, gate_scale, block_pairs):
    return (torch.empty_like(z), torch.empty_like(u), torch.empty_like(cached_states), torch.empty_like(contexts))


def _setup_context(ctx, inputs, output):
    z, u, cached_states, contexts, *plan, gate_scale, block_pairs = inputs
    ctx.save_for_backward(z, u, cached_states, contexts, *plan, *output)
    ctx.scalars = (gate_scale, block_pairs)


def _backward_formula(ctx, d_out, d_lse):
    z, u, cached_states, contexts, *plan, out, lse = ctx.saved_tensors
    if d_out is None:
        d_out = torch.zeros_like(out)
    if d_lse is None:
        d_lse = torch.zeros_like(lse)
    grads = torch.ops.mcdist.ssc_read_triton_backward(d_out, d_lse, z, u, cached_states, contexts, *plan, out, lse,
                                                      *ctx.scalars)
    return (*grads, None, None, None, None, None, None, None, None)


torch.library.register_autograd(_ssc_read_op, _backward_formula, setup_context=_setup_context)


def ssc_read_triton(
    z: torch.Tensor,
    u: torch.Tensor,
    cached_states: torch.Tensor,
    contexts: torch.Tensor,
    *,
    segment_len: int,
    gate_scale: float,
    selected: torch.Tensor,
    query_offset: int = 0,
    segment_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-gated read of the selected states of one block, as a partial (Triton; differentiable).

    The ssc counterpart of :func:`mcdist.kernels.cached_read.cached_read_triton` with the same arguments and
    results; its work grows with the number of selected pairs (T·K) rather than with T·Nb.

    Args:
        z: [B, T, H, Din] vectors the states are applied to.
        u: [B, T, H, Dc] gate queries.
        cached_states: [B, Nb, H, Dout, Din] (float32, bfloat16 or float16).
        contexts: [B, Nb, H, Dc] segment contexts.
        segment_len: C, tokens per segment.
        gate_scale: τ in r_tj = τ ⟨u_t, c_j⟩.
        selected: [B, T, H, K] int64 global segment indices each token may read (−1 = empty; indices outside
            [segment_offset, segment_offset + Nb) or not below the token's segment are ignored; a repeated
            index counts once).
        query_offset: global position of token 0.
        segment_offset: global segment index of state 0.
    Returns:
        (out [B, T, H, Dout] float32, lse [B, T, H] float32); a token that sees no state gets out 0 and lse −inf.
        Gradients flow to z, u, cached_states and contexts from both out and lse (not to selected).
    """
    if selected is None:
        raise ValueError("selected is required by ssc_read_triton (the dense read is cached_read_triton)")
    _blocks.check_args(z, u, cached_states, contexts, selected, segment_len, query_offset, segment_offset)
    block_p = _block_pairs(z, cached_states)
    plan = _pair_plan(selected.detach(), cached_states.shape[1], int(segment_len), int(query_offset),
                      int(segment_offset), block_p)
    return _ssc_read_op(z, u, cached_states, contexts, *plan, float(gate_scale), block_p)
