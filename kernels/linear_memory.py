"""Triton kernels for the chunked linear memory pass (forward and backward).

Implements the "Linear memory pass" of docs/architecture.md:

    M_t = exp(g_t) · M_{t-1} + v_t k_tᵀ,    o_t = M_t q_t   (the read includes token t)

with segments of length C (``segment_len``) whose end states are cached, and a chunkwise-parallel schedule
with chunks of length c (``chunk_len``, c divides C). The derivation of the chunked form and of its gradients
(including the log-decay identity) is in docs/kernels.md, "Chunked linear memory".

Kernels (one program per tile of the D×D state: BK, BV <= 64 in the kernels parallel over chunks, <= 32 in the
sequential walks, so D = 64 and D = 128 both fit):
    linear_memory_fwd_kernel_h     sequential over chunks: state at every chunk start + segment-end states
    linear_memory_fwd_kernel_o     parallel over chunks: intra-chunk causal part + decayed read of the chunk state
    linear_memory_bwd_kernel_dh    reverse sequential: gradient of the state at every chunk end
    linear_memory_bwd_kernel_dqk   parallel over chunks: dq, dk, and the per-token terms of dlog_decay
    linear_memory_bwd_kernel_dv    parallel over chunks: dv

With ``walk="scan"`` the two sequential walks are replaced by a two-level scan (docs/kernels.md, "Two-level
scan"): ``linear_memory_kernel_chunk_term`` (parallel over chunks: each chunk's own term, a tl.dot) then
``linear_memory_fwd_kernel_scan`` / ``linear_memory_bwd_kernel_scan`` (sequential over chunks but elementwise,
over flat blocks of the state: no dot in the loop).

The public op is :func:`linear_memory_triton`; it is registered as the custom op
``mcdist::linear_memory_triton`` (with a fake implementation and an autograd formula) so that
``torch.compile`` treats it as one opaque node.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mcdist.kernels._interpreter import interpreting

__all__ = ["linear_memory_triton"]

STATE_INITS = ("checkpoint", "independent")
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Largest tile of the D×D state along each dimension: in the kernels parallel over chunks, and in the two kernels
# that walk the chunks sequentially (smaller tiles there give more programs to run side by side: at B = 1, H = 16,
# D = 128 the walk runs 256 programs instead of 64). Tests lower both to exercise several tiles at small D.
_MAX_BLOCK_D = 64
_MAX_STATE_BLOCK_D = 32

# How the chunk-start states are carried across chunks (forward, and the state gradient in the backward), the
# ``walk`` argument: "sequential" walks the chunks with one tl.dot per step (the measured default); "scan" computes
# every chunk's own term in parallel and then carries the state with an elementwise loop (docs/kernels.md,
# "Two-level scan").
WALKS = ("sequential", "scan")
# Largest flat block of the D×D state per program of the scan's elementwise loop: 512 floats (4 per thread at
# 4 warps) at D = 128, 32 programs per (batch, head); 256 at D = 64, 16 programs. Tests lower it.
_MAX_SCAN_BLOCK = 512


def _interpreting() -> bool:
    return interpreting()


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def linear_memory_fwd_kernel_h(
    k_ptr,  # [B, T, H, D]
    v_ptr,  # [B, T, H, D]
    gc_ptr,  # [B, T, H] float32, log-decay cumulated inside each chunk
    init_ptr,  # [B, H, D, D] float32 (read only when HAS_INIT)
    h_ptr,  # [B, NT, H, D, D] float32 out: state at the start of every chunk
    cached_ptr,  # [B, N, H, D, D] float32 out: state at the end of every segment
    final_ptr,  # [B, H, D, D] float32 out
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_SEGMENT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DECAY: tl.constexpr,
    HAS_INIT: tl.constexpr,
    INDEPENDENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK
    num_segments = tl.cdiv(num_chunks, CHUNKS_PER_SEGMENT)

    offs_t = tl.arange(0, CHUNK)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < D
    mask_v = offs_v < D
    mask_state = mask_v[:, None] & mask_k[None, :]
    # State tile [BV, BK] inside one [D, D] matrix (rows index values, columns index keys).
    state_offs = offs_v[:, None] * D + offs_k[None, :]

    state = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + i_bh * D * D + state_offs, mask=mask_state, other=0.0).to(tl.float32)

    for i_n in range(0, num_chunks):
        if INDEPENDENT:
            if i_n % CHUNKS_PER_SEGMENT == 0:
                state = tl.zeros([BV, BK], dtype=tl.float32)
        tl.store(h_ptr + ((i_b * num_chunks + i_n) * H + i_h) * D * D + state_offs, state, mask=mask_state)

        tok = i_n * CHUNK + offs_t
        row = (i_b * T + tok) * H + i_h  # [CHUNK]
        k = tl.load(k_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        if USE_DECAY:
            gc = tl.load(gc_ptr + row)  # [CHUNK]
            g_last = tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h)
            k = k * tl.exp(g_last - gc)[:, None]
            state = state * tl.exp(g_last)
        state += tl.dot(tl.trans(v), k, input_precision=DOT_PRECISION)  # [BV, BK]

        if ((i_n + 1) % CHUNKS_PER_SEGMENT == 0) | (i_n == num_chunks - 1):
            i_s = i_n // CHUNKS_PER_SEGMENT
            tl.store(cached_ptr + ((i_b * num_segments + i_s) * H + i_h) * D * D + state_offs, state,
                     mask=mask_state)

    tl.store(final_ptr + i_bh * D * D + state_offs, state, mask=mask_state)


@triton.jit
def linear_memory_fwd_kernel_o(
    q_ptr,  # [B, T, H, D]
    k_ptr,  # [B, T, H, D]
    v_ptr,  # [B, T, H, D]
    gc_ptr,  # [B, T, H] float32
    h_ptr,  # [B, NT, H, D, D] float32
    o_ptr,  # [B, T, H, D] out
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    USE_DECAY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK

    offs_t = tl.arange(0, CHUNK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < D
    row = (i_b * T + i_n * CHUNK + offs_t) * H + i_h  # [CHUNK]
    h_base = h_ptr + ((i_b * num_chunks + i_n) * H + i_h) * D * D

    out = tl.zeros([CHUNK, BV], dtype=tl.float32)
    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    for i_k in range(0, NK):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < D
        q = tl.load(q_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        # Transposed state tile [BK, BV]: element (key j, value i) = M[i, j].
        state_t = tl.load(h_base + offs_v[None, :] * D + offs_k[:, None],
                          mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        out += tl.dot(q, state_t, input_precision=DOT_PRECISION)

    causal = offs_t[:, None] >= offs_t[None, :]
    if USE_DECAY:
        gc = tl.load(gc_ptr + row)
        out = out * tl.exp(gc)[:, None]
        decay = tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
        scores = scores * decay
    else:
        scores = tl.where(causal, scores, 0.0)
    v = tl.load(v_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    out += tl.dot(scores, v, input_precision=DOT_PRECISION)
    tl.store(o_ptr + row[:, None] * D + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_v[None, :])


@triton.jit
def linear_memory_bwd_kernel_dh(
    q_ptr,  # [B, T, H, D]
    do_ptr,  # [B, T, H, D]
    gc_ptr,  # [B, T, H] float32
    dcached_ptr,  # [B, N, H, D, D] float32
    dfinal_ptr,  # [B, H, D, D] float32
    dh_ptr,  # [B, NT, H, D, D] float32 out: gradient of the state at the end of every chunk
    dinit_ptr,  # [B, H, D, D] float32 out (written only when not INDEPENDENT)
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_SEGMENT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_DECAY: tl.constexpr,
    INDEPENDENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK
    num_segments = tl.cdiv(num_chunks, CHUNKS_PER_SEGMENT)

    offs_t = tl.arange(0, CHUNK)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < D
    mask_v = offs_v < D
    mask_state = mask_v[:, None] & mask_k[None, :]
    state_offs = offs_v[:, None] * D + offs_k[None, :]

    # Gradient flowing into the end state of the current chunk from later chunks.
    carry = tl.load(dfinal_ptr + i_bh * D * D + state_offs, mask=mask_state, other=0.0)
    for i_rev in range(0, num_chunks):
        i_n = num_chunks - 1 - i_rev
        if ((i_n + 1) % CHUNKS_PER_SEGMENT == 0) | (i_n == num_chunks - 1):
            i_s = i_n // CHUNKS_PER_SEGMENT
            carry += tl.load(dcached_ptr + ((i_b * num_segments + i_s) * H + i_h) * D * D + state_offs,
                             mask=mask_state, other=0.0)
        tl.store(dh_ptr + ((i_b * num_chunks + i_n) * H + i_h) * D * D + state_offs, carry, mask=mask_state)

        row = (i_b * T + i_n * CHUNK + offs_t) * H + i_h
        q = tl.load(q_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        if USE_DECAY:
            gc = tl.load(gc_ptr + row)
            g_last = tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h)
            q = q * tl.exp(gc)[:, None]
            carry = carry * tl.exp(g_last)
        # carry is now the gradient of the state at the start of chunk i_n.
        carry += tl.dot(tl.trans(do), q, input_precision=DOT_PRECISION)
        if INDEPENDENT:
            if i_n % CHUNKS_PER_SEGMENT == 0:
                carry = tl.zeros([BV, BK], dtype=tl.float32)

    if not INDEPENDENT:
        tl.store(dinit_ptr + i_bh * D * D + state_offs, carry, mask=mask_state)


@triton.jit
def linear_memory_bwd_kernel_dqk(
    q_ptr,  # [B, T, H, D]
    k_ptr,  # [B, T, H, D]
    v_ptr,  # [B, T, H, D]
    gc_ptr,  # [B, T, H] float32
    h_ptr,  # [B, NT, H, D, D] float32 state at chunk starts
    do_ptr,  # [B, T, H, D]
    dh_ptr,  # [B, NT, H, D, D] float32 gradient of the state at chunk ends
    dq_ptr,  # [B, T, H, D] float32 out
    dk_ptr,  # [B, T, H, D] float32 out
    dgc_ptr,  # [NK, B, T, H] float32 out: per key block, q·dq - k·dk
    dglast_ptr,  # [NK, B, NT, H] float32 out: per key block, the gradient of the chunk's total log-decay
    T,
    B,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NV: tl.constexpr,
    USE_DECAY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK

    offs_t = tl.arange(0, CHUNK)
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < D
    row = (i_b * T + i_n * CHUNK + offs_t) * H + i_h
    state_base = ((i_b * num_chunks + i_n) * H + i_h) * D * D

    q = tl.load(q_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)

    dscores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # dO Vᵀ
    dq_inter = tl.zeros([CHUNK, BK], dtype=tl.float32)  # dO S
    dk_state = tl.zeros([CHUNK, BK], dtype=tl.float32)  # V dE
    state_dot = tl.zeros([BV, BK], dtype=tl.float32)  # S ⊙ dE, summed at the end
    for i_v in range(0, NV):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < D
        mask_state = mask_v[:, None] & mask_k[None, :]
        state_offs = offs_v[:, None] * D + offs_k[None, :]
        v = tl.load(v_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
        state = tl.load(h_ptr + state_base + state_offs, mask=mask_state, other=0.0)  # [BV, BK]
        dstate = tl.load(dh_ptr + state_base + state_offs, mask=mask_state, other=0.0)  # [BV, BK]
        dscores += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        dq_inter += tl.dot(do, state, input_precision=DOT_PRECISION)
        dk_state += tl.dot(v, dstate, input_precision=DOT_PRECISION)
        if USE_DECAY:
            state_dot += state * dstate

    causal = offs_t[:, None] >= offs_t[None, :]
    if USE_DECAY:
        gc = tl.load(gc_ptr + row)
        g_last = tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h)
        dq_inter = dq_inter * tl.exp(gc)[:, None]
        dk_state = dk_state * tl.exp(g_last - gc)[:, None]
        dscores = dscores * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    else:
        dscores = tl.where(causal, dscores, 0.0)
    dq = dq_inter + tl.dot(dscores, k, input_precision=DOT_PRECISION)
    dk = dk_state + tl.dot(tl.trans(dscores), q, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + row[:, None] * D + offs_k[None, :], dq, mask=mask_k[None, :])
    tl.store(dk_ptr + row[:, None] * D + offs_k[None, :], dk, mask=mask_k[None, :])

    if USE_DECAY:
        dgc = tl.sum(q * dq, axis=1) - tl.sum(k * dk, axis=1)  # [CHUNK]
        tl.store(dgc_ptr + i_k * B * T * H + row, dgc)
        # d<E>/dG where E = e^G S + Σ_j e^{G-gc_j} v_j k_jᵀ is the chunk's end state: <dE, E>.
        dglast = tl.exp(g_last) * tl.sum(tl.sum(state_dot, axis=1), axis=0) + tl.sum(tl.sum(k * dk_state, axis=1),
                                                                                     axis=0)
        tl.store(dglast_ptr + ((i_k * B + i_b) * num_chunks + i_n) * H + i_h, dglast)


@triton.jit
def linear_memory_bwd_kernel_dv(
    q_ptr,  # [B, T, H, D]
    k_ptr,  # [B, T, H, D]
    gc_ptr,  # [B, T, H] float32
    do_ptr,  # [B, T, H, D]
    dh_ptr,  # [B, NT, H, D, D] float32 gradient of the state at chunk ends
    dv_ptr,  # [B, T, H, D] float32 out
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    USE_DECAY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK

    offs_t = tl.arange(0, CHUNK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < D
    row = (i_b * T + i_n * CHUNK + offs_t) * H + i_h
    dh_base = dh_ptr + ((i_b * num_chunks + i_n) * H + i_h) * D * D

    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # Q Kᵀ
    dv_state = tl.zeros([CHUNK, BV], dtype=tl.float32)  # K dEᵀ
    for i_k in range(0, NK):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < D
        q = tl.load(q_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
        dstate_t = tl.load(dh_base + offs_v[None, :] * D + offs_k[:, None],
                           mask=mask_k[:, None] & mask_v[None, :], other=0.0)  # [BK, BV]
        scores += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        dv_state += tl.dot(k, dstate_t, input_precision=DOT_PRECISION)

    causal = offs_t[:, None] >= offs_t[None, :]
    if USE_DECAY:
        gc = tl.load(gc_ptr + row)
        g_last = tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h)
        dv_state = dv_state * tl.exp(g_last - gc)[:, None]
        scores = scores * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], float("-inf")))
    else:
        scores = tl.where(causal, scores, 0.0)
    do = tl.load(do_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    dv = dv_state + tl.dot(tl.trans(scores), do, input_precision=DOT_PRECISION)
    tl.store(dv_ptr + row[:, None] * D + offs_v[None, :], dv, mask=mask_v[None, :])


@triton.jit
def linear_memory_kernel_chunk_term(
    x_ptr,  # [B, T, H, D] keys (forward) or queries (backward): the columns of the term
    y_ptr,  # [B, T, H, D] values (forward) or output gradients (backward): its rows
    gc_ptr,  # [B, T, H] float32
    term_ptr,  # [B, NT, H, D, D] float32 out: chunk n's term, in slot n + 1 (forward) or n - 1 (REVERSE)
    edge_ptr,  # [B, H, D, D] float32 out: the term that has no slot (the last chunk's, or the first's if REVERSE)
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    NK: tl.constexpr,
    USE_DECAY: tl.constexpr,
    REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Phase A of the scan walks, parallel over chunks: each chunk's own contribution to the carried state.

    Forward: E_n = Vᵀ (K ⊙ e^{Γ−γ}), the chunk's end state from a zero start. REVERSE: L_n = dOᵀ (Q ⊙ e^{γ}),
    the part of the start-state gradient read by the chunk's own tokens. The term goes where the scan will write
    the value computed from it (S_{n+1}, resp. dE_{n-1}), so that the scan's in-place step is a load, then a
    store that depends on it.
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1) % NK
    i_v = tl.program_id(1) // NK
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK

    offs_t = tl.arange(0, CHUNK)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < D
    mask_v = offs_v < D
    mask_state = mask_v[:, None] & mask_k[None, :]
    state_offs = offs_v[:, None] * D + offs_k[None, :]
    row = (i_b * T + i_n * CHUNK + offs_t) * H + i_h  # [CHUNK]

    x = tl.load(x_ptr + row[:, None] * D + offs_k[None, :], mask=mask_k[None, :], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row[:, None] * D + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    if USE_DECAY:
        gc = tl.load(gc_ptr + row)
        if REVERSE:
            x = x * tl.exp(gc)[:, None]
        else:
            g_last = tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h)
            x = x * tl.exp(g_last - gc)[:, None]
    term = tl.dot(tl.trans(y), x, input_precision=DOT_PRECISION)  # [BV, BK]

    if REVERSE:
        i_dest = i_n - 1
    else:
        i_dest = i_n + 1
    if (i_dest >= 0) & (i_dest < num_chunks):
        tl.store(term_ptr + ((i_b * num_chunks + i_dest) * H + i_h) * D * D + state_offs, term, mask=mask_state)
    else:
        tl.store(edge_ptr + i_bh * D * D + state_offs, term, mask=mask_state)


@triton.jit
def linear_memory_fwd_kernel_scan(
    gc_ptr,  # [B, T, H] float32
    init_ptr,  # [B, H, D, D] float32 (read only when HAS_INIT)
    h_ptr,  # [B, NT, H, D, D] float32 in: E_n in slot n + 1; out: state at the start of every chunk
    cached_ptr,  # [B, N, H, D, D] float32 out: state at the end of every segment
    final_ptr,  # [B, H, D, D] float32 in: E of the last chunk; out: the final state
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_DECAY: tl.constexpr,
    HAS_INIT: tl.constexpr,
    INDEPENDENT: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Phase B of the forward scan: S_{n+1} = e^{Γ_n} S_n + E_n, elementwise on a flat block of the state.

    No dot and no dependence of the loads on the carried state, so the loop's loads are prefetched STAGES deep.
    """
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK
    num_segments = tl.cdiv(num_chunks, CHUNKS_PER_SEGMENT)

    offs = i_blk * BLOCK + tl.arange(0, BLOCK)  # flat index into one [D, D] state
    mask = offs < D * D
    final = final_ptr + i_bh * D * D + offs

    state = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + i_bh * D * D + offs, mask=mask, other=0.0)
    tl.store(h_ptr + (i_b * num_chunks * H + i_h) * D * D + offs, state, mask=mask)
    end = state
    for i_n in tl.range(0, num_chunks, num_stages=STAGES):
        has_next = i_n + 1 < num_chunks
        nxt = h_ptr + ((i_b * num_chunks + i_n + 1) * H + i_h) * D * D + offs
        term = tl.load(tl.where(has_next, nxt, final), mask=mask, other=0.0)  # E_n
        if USE_DECAY:
            state = state * tl.exp(tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h))
        end = state + term
        is_end = ((i_n + 1) % CHUNKS_PER_SEGMENT == 0) | ~has_next
        tl.store(cached_ptr + ((i_b * num_segments + i_n // CHUNKS_PER_SEGMENT) * H + i_h) * D * D + offs, end,
                 mask=mask & is_end)
        state = end
        if INDEPENDENT:
            state = tl.where((i_n + 1) % CHUNKS_PER_SEGMENT == 0, 0.0, end)
        tl.store(nxt, state, mask=mask & has_next)
    tl.store(final, end, mask=mask)


@triton.jit
def linear_memory_bwd_kernel_scan(
    gc_ptr,  # [B, T, H] float32
    dcached_ptr,  # [B, N, H, D, D] float32
    dfinal_ptr,  # [B, H, D, D] float32
    dh_ptr,  # [B, NT, H, D, D] float32 in: L_n in slot n - 1; out: gradient of the state at every chunk end
    dinit_ptr,  # [B, H, D, D] float32 in: L_0; out: gradient of initial_state (written only when not INDEPENDENT)
    T,
    H: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PER_SEGMENT: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_DECAY: tl.constexpr,
    INDEPENDENT: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Phase B of the reverse scan: dS_n = e^{Γ_n} dE_n + L_n, dE_{n-1} = dS_n (+ dcached), elementwise."""
    i_blk = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    num_chunks = T // CHUNK
    num_segments = tl.cdiv(num_chunks, CHUNKS_PER_SEGMENT)

    offs = i_blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D * D
    dinit = dinit_ptr + i_bh * D * D + offs

    # dE of the last chunk, which ends the last segment.
    carry = tl.load(dfinal_ptr + i_bh * D * D + offs, mask=mask, other=0.0)
    carry += tl.load(dcached_ptr + ((i_b * num_segments + num_segments - 1) * H + i_h) * D * D + offs, mask=mask,
                     other=0.0)
    tl.store(dh_ptr + ((i_b * num_chunks + num_chunks - 1) * H + i_h) * D * D + offs, carry, mask=mask)
    for i_rev in tl.range(0, num_chunks, num_stages=STAGES):
        i_n = num_chunks - 1 - i_rev
        has_prev = i_n > 0
        prv = dh_ptr + ((i_b * num_chunks + i_n - 1) * H + i_h) * D * D + offs
        term = tl.load(tl.where(has_prev, prv, dinit), mask=mask, other=0.0)  # L_n
        if USE_DECAY:
            carry = carry * tl.exp(tl.load(gc_ptr + (i_b * T + i_n * CHUNK + CHUNK - 1) * H + i_h))
        carry += term  # dS_n
        starts = i_n % CHUNKS_PER_SEGMENT == 0
        if INDEPENDENT:
            carry = tl.where(starts, 0.0, carry)
        # Chunk n - 1 ends segment n / CHUNKS_PER_SEGMENT - 1 when chunk n starts a segment.
        carry += tl.load(dcached_ptr + ((i_b * num_segments + i_n // CHUNKS_PER_SEGMENT - 1) * H + i_h) * D * D
                         + offs, mask=mask & starts & has_prev, other=0.0)
        tl.store(prv, carry, mask=mask & has_prev)  # dE_{n-1}

    if not INDEPENDENT:
        tl.store(dinit, carry, mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _block_d(D: int) -> int:
    return min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))


def _state_block_d(D: int) -> int:
    return min(_MAX_STATE_BLOCK_D, _block_d(D))


def _scan_block(D: int) -> int:
    return min(_MAX_SCAN_BLOCK, max(256, triton.next_power_of_2(D * D) // 16))


def _check_walk(walk: str) -> str:
    if walk not in WALKS:
        raise ValueError(f"walk = {walk!r}; expected one of {', '.join(repr(w) for w in WALKS)}")
    return walk


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 callers get ~fp32 products (3 TF32 passes); 16-bit callers get TF32, already finer than their inputs.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _chunk_cumsum(log_decay: torch.Tensor, chunk_len: int) -> torch.Tensor:
    B, T, H = log_decay.shape
    return log_decay.view(B, T // chunk_len, chunk_len, H).cumsum(2).view(B, T, H)  # [B, T, H] float32


# Checked with ptxas for sm_90 (D = 64 and 128, bf16 and fp32 inputs): with these, the 16-bit kernels do not spill
# registers (the dq/dk kernel spills 60 bytes at D = 128) and shared memory stays under 128 KiB.
_LAUNCH_SEQUENTIAL = dict(num_warps=4, num_stages=2)
_LAUNCH_PARALLEL = dict(num_warps=8, num_stages=2)
# The scan's kernels (same check, docs/kernels.md "Two-level scan"): no spills, at most 32 KiB of shared memory.
_LAUNCH_TERM = dict(num_warps=4, num_stages=1)
_LAUNCH_SCAN = dict(num_warps=4)
_SCAN_STAGES = 4  # iterations of the scan's elementwise loop in flight (tl.range prefetches its loads)


def _forward_states(k, v, gc, initial_state, segment_len, chunk_len, independent, walk):
    """Runs the state walk ``walk``; returns (chunk_states, cached_states, final_state)."""
    B, T, H, D = k.shape
    num_chunks = T // chunk_len
    num_segments = -(-T // segment_len)
    nan = float("nan")
    chunk_states = torch.full((B, num_chunks, H, D, D), nan, device=k.device, dtype=torch.float32)
    cached_states = torch.full((B, num_segments, H, D, D), nan, device=k.device, dtype=torch.float32)
    final_state = torch.full((B, H, D, D), nan, device=k.device, dtype=torch.float32)
    use_decay = gc is not None
    has_init = initial_state is not None
    if _check_walk(walk) == "scan":
        block = _block_d(D)
        nk = triton.cdiv(D, block)
        linear_memory_kernel_chunk_term[(num_chunks, nk * nk, B * H)](
            k, v, gc if use_decay else k, chunk_states, final_state,
            T, H=H, D=D, CHUNK=chunk_len, BK=block, BV=block, NK=nk, USE_DECAY=use_decay, REVERSE=False,
            DOT_PRECISION=_dot_precision(k.dtype), **_LAUNCH_TERM,
        )
        scan_block = _scan_block(D)
        linear_memory_fwd_kernel_scan[(triton.cdiv(D * D, scan_block), B * H)](
            gc if use_decay else k, initial_state if has_init else k, chunk_states, cached_states, final_state,
            T, H=H, D=D, CHUNK=chunk_len, CHUNKS_PER_SEGMENT=segment_len // chunk_len, BLOCK=scan_block,
            USE_DECAY=use_decay, HAS_INIT=has_init, INDEPENDENT=independent, STAGES=_SCAN_STAGES,
            **_LAUNCH_SCAN,
        )
    else:
        block = _state_block_d(D)
        tiles = triton.cdiv(D, block)
        linear_memory_fwd_kernel_h[(tiles, tiles, B * H)](
            k, v, gc if use_decay else k, initial_state if has_init else k,
            chunk_states, cached_states, final_state,
            T, H=H, D=D, CHUNK=chunk_len, CHUNKS_PER_SEGMENT=segment_len // chunk_len, BK=block, BV=block,
            USE_DECAY=use_decay, HAS_INIT=has_init, INDEPENDENT=independent,
            DOT_PRECISION=_dot_precision(k.dtype), **_LAUNCH_SEQUENTIAL,
        )
    return chunk_states, cached_states, final_state


def _forward(q, k, v, log_decay, initial_state, segment_len, chunk_len, independent, walk):
    B, T, H, D = q.shape
    gc = _chunk_cumsum(log_decay, chunk_len) if log_decay is not None else None
    chunk_states, cached_states, final_state = _forward_states(
        k, v, gc, initial_state, segment_len, chunk_len, independent, walk)
    block = _block_d(D)
    nk = nv = triton.cdiv(D, block)
    out = torch.full_like(q, float("nan"))  # [B, T, H, D]
    linear_memory_fwd_kernel_o[(T // chunk_len, nv, B * H)](
        q, k, v, gc if gc is not None else q, chunk_states, out,
        T, H=H, D=D, CHUNK=chunk_len, BK=block, BV=block, NK=nk, USE_DECAY=gc is not None,
        DOT_PRECISION=_dot_precision(q.dtype), **_LAUNCH_PARALLEL,
    )
    return out, cached_states, final_state


def _backward(q, k, v, log_decay, initial_state, d_out, d_cached, d_final, segment_len, chunk_len, independent,
              walk):
    B, T, H, D = q.shape
    num_chunks = T // chunk_len
    block = _block_d(D)
    nk = nv = triton.cdiv(D, block)
    use_decay = log_decay is not None
    precision = _dot_precision(q.dtype)
    nan = float("nan")
    gc = _chunk_cumsum(log_decay, chunk_len) if use_decay else None

    # Recompute the chunk-start states instead of keeping them from the forward (B·T/c·H·D² floats).
    chunk_states, _, _ = _forward_states(k, v, gc, initial_state, segment_len, chunk_len, independent, walk)

    d_chunk_end = torch.full_like(chunk_states, nan)  # [B, NT, H, D, D]
    d_initial = torch.full((B, H, D, D), nan, device=q.device, dtype=torch.float32)
    if _check_walk(walk) == "scan":
        linear_memory_kernel_chunk_term[(num_chunks, nk * nv, B * H)](
            q, d_out, gc if use_decay else q, d_chunk_end, d_initial,
            T, H=H, D=D, CHUNK=chunk_len, BK=block, BV=block, NK=nk, USE_DECAY=use_decay, REVERSE=True,
            DOT_PRECISION=precision, **_LAUNCH_TERM,
        )
        scan_block = _scan_block(D)
        linear_memory_bwd_kernel_scan[(triton.cdiv(D * D, scan_block), B * H)](
            gc if use_decay else q, d_cached, d_final, d_chunk_end, d_initial,
            T, H=H, D=D, CHUNK=chunk_len, CHUNKS_PER_SEGMENT=segment_len // chunk_len, BLOCK=scan_block,
            USE_DECAY=use_decay, INDEPENDENT=independent, STAGES=_SCAN_STAGES, **_LAUNCH_SCAN,
        )
    else:
        state_block = _state_block_d(D)
        state_tiles = triton.cdiv(D, state_block)
        linear_memory_bwd_kernel_dh[(state_tiles, state_tiles, B * H)](
            q, d_out, gc if use_decay else q, d_cached, d_final, d_chunk_end, d_initial,
            T, H=H, D=D, CHUNK=chunk_len, CHUNKS_PER_SEGMENT=segment_len // chunk_len, BK=state_block,
            BV=state_block, USE_DECAY=use_decay, INDEPENDENT=independent, DOT_PRECISION=precision,
            **_LAUNCH_SEQUENTIAL,
        )

    dq = torch.full(q.shape, nan, device=q.device, dtype=torch.float32)
    dk = torch.full(q.shape, nan, device=q.device, dtype=torch.float32)
    dv = torch.full(q.shape, nan, device=q.device, dtype=torch.float32)
    if use_decay:
        dgc_parts = torch.full((nk, B, T, H), nan, device=q.device, dtype=torch.float32)
        dglast_parts = torch.full((nk, B, num_chunks, H), nan, device=q.device, dtype=torch.float32)
    else:
        dgc_parts = dglast_parts = dq  # never touched
    linear_memory_bwd_kernel_dqk[(num_chunks, nk, B * H)](
        q, k, v, gc if use_decay else q, chunk_states, d_out, d_chunk_end, dq, dk, dgc_parts, dglast_parts,
        T, B, H=H, D=D, CHUNK=chunk_len, BK=block, BV=block, NV=nv, USE_DECAY=use_decay,
        DOT_PRECISION=precision, **_LAUNCH_PARALLEL,
    )
    linear_memory_bwd_kernel_dv[(num_chunks, nv, B * H)](
        q, k, gc if use_decay else q, d_out, d_chunk_end, dv,
        T, H=H, D=D, CHUNK=chunk_len, BK=block, BV=block, NK=nk, USE_DECAY=use_decay,
        DOT_PRECISION=precision, **_LAUNCH_PARALLEL,
    )

    if use_decay:
        # dgc_t = q_t·dq_t − k_t·dk_t, plus <dE, E> on the chunk's last position; then g_j collects every
        # gc_t with t ≥ j in its chunk (a reversed cumulative sum).
        dgc = dgc_parts.sum(0).view(B, num_chunks, chunk_len, H)  # [B, NT, c, H]
        dgc[:, :, -1] += dglast_parts.sum(0)
        d_log_decay = dgc.flip(2).cumsum(2).flip(2).reshape(B, T, H)
    else:
        d_log_decay = torch.zeros(0, device=q.device, dtype=torch.float32)
    if independent or initial_state is None:
        d_initial = torch.zeros(0, device=q.device, dtype=torch.float32)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_log_decay, d_initial


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile) and their autograd formula
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mcdist::linear_memory_triton", mutates_args=())
def _linear_memory_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    segment_len: int,
    chunk_len: int,
    independent: bool,
    walk: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, log_decay, initial_state, segment_len, chunk_len, independent, walk)


@_linear_memory_op.register_fake
def _(q, k, v, log_decay, initial_state, segment_len, chunk_len, independent, walk):
    B, T, H, D = q.shape
    num_segments = -(-T // segment_len)
    return (
        torch.empty_like(q),
        q.new_empty((B, num_segments, H, D, D), dtype=torch.float32),
        q.new_empty((B, H, D, D), dtype=torch.float32),
    )


@torch.library.custom_op("mcdist::linear_memory_triton_backward", mutates_args=())
def _linear_memory_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: Optional[torch.Tensor],
    initial_state: Optional[torch.Tensor],
    d_out: torch.Tensor,
    d_cached: torch.Tensor,
    d_final: torch.Tensor,
    segment_len: int,
    chunk_len: int,
    independent: bool,
    walk: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, dlog_decay, dinitial_state); the last two are empty when their input is None."""
    return _backward(q, k, v, log_decay, initial_state, d_out, d_cached, d_final, segment_len, chunk_len,
                     independent, walk)


@_linear_memory_backward_op.register_fake
def _(q, k, v, log_decay, initial_state, d_out, d_cached, d_final, segment_len, chunk_len, independent, walk):
    B, T, H, D = q.shape
    empty = q.new_empty((0,), dtype=torch.float32)
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty((B, T, H), dtype=torch.float32) if log_decay is not None else empty,
        q.new_empty((B, H, D, D), dtype=torch.float32) if (initial_state is not None and not independent) else empty,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, log_decay, initial_state, segment_len, chunk_len, independent, walk = inputs
    ctx.save_for_backward(q, k, v, log_decay, initial_state)
    ctx.segment_len = segment_len
    ctx.chunk_len = chunk_len
    ctx.independent = independent
    ctx.walk = walk


def _backward_formula(ctx, d_out, d_cached, d_final):
    q, k, v, log_decay, initial_state = ctx.saved_tensors
    B, T, H, D = q.shape
    num_segments = -(-T // ctx.segment_len)
    if d_out is None:
        d_out = torch.zeros_like(q)
    if d_cached is None:
        d_cached = q.new_zeros((B, num_segments, H, D, D), dtype=torch.float32)
    if d_final is None:
        d_final = q.new_zeros((B, H, D, D), dtype=torch.float32)
    dq, dk, dv, d_log_decay, d_initial = _linear_memory_backward_op(
        q, k, v, log_decay, initial_state,
        d_out.contiguous(), d_cached.float().contiguous(), d_final.float().contiguous(),
        ctx.segment_len, ctx.chunk_len, ctx.independent, ctx.walk,
    )
    return (
        dq, dk, dv,
        d_log_decay if log_decay is not None else None,
        d_initial if initial_state is not None else None,
        None, None, None, None,
    )


torch.library.register_autograd(_linear_memory_op, _backward_formula, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------------------------


def _validate(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state):
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        raise ValueError("q, k and v must be tensors")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape [B, T, H, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among float32, bfloat16, float16; got q {q.dtype}, "
                         f"k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"linear_memory_triton needs CUDA tensors (got device {q.device}); on CPU use the "
                         "chunked PyTorch path, or set TRITON_INTERPRET=1 before importing triton")
    B, T, H, D = q.shape
    if T == 0 or B == 0 or H == 0 or D == 0:
        raise ValueError(f"q must have no empty dimension, got shape {tuple(q.shape)}")
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or tuple(log_decay.shape) != (B, T, H):
            shape = tuple(log_decay.shape) if isinstance(log_decay, torch.Tensor) else type(log_decay).__name__
            raise ValueError(f"log_decay must be [B, T, H] = {(B, T, H)} or None, got {shape}")
        if not log_decay.is_floating_point():
            raise ValueError(f"log_decay must be floating point (float32 expected), got {log_decay.dtype}")
        if log_decay.device != q.device:
            raise ValueError(f"log_decay is on {log_decay.device}, q on {q.device}")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1:
        raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
    if (isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 16
            or chunk_len & (chunk_len - 1)):
        raise ValueError(f"chunk_len must be a power of two >= 16 for the Triton kernel, got {chunk_len!r}")
    if segment_len % chunk_len != 0:
        raise ValueError(f"chunk_len must divide segment_len; got segment_len={segment_len}, "
                         f"chunk_len={chunk_len}")
    if T % chunk_len != 0:
        raise ValueError(f"T must be a multiple of chunk_len (the caller pads); got T={T}, chunk_len={chunk_len}")
    if state_init not in STATE_INITS:
        raise ValueError(f"state_init must be one of {STATE_INITS}, got {state_init!r}")
    if initial_state is not None:
        if state_init == "independent":
            raise ValueError("initial_state must be None when state_init='independent' (every segment starts "
                             "from zeros)")
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, D, D):
            shape = (tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor)
                     else type(initial_state).__name__)
            raise ValueError(f"initial_state must be [B, H, D, D] = {(B, H, D, D)}, got {shape}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating point (float32 expected), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device}, q on {q.device}")


def linear_memory_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: Optional[torch.Tensor],
    *,
    segment_len: int,
    chunk_len: int,
    state_init: str,
    initial_state: Optional[torch.Tensor] = None,
    walk: str = "sequential",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear memory pass with segment caching, chunkwise-parallel Triton kernels (differentiable).

    ``M_t = exp(g_t) · M_{t-1} + v_t k_tᵀ`` and ``o_t = M_t q_t``; the state at the end of each segment of
    ``segment_len`` tokens is returned. Gradients flow to q, k, v, log_decay and initial_state, from all three
    outputs.

    Args:
        q, k, v: ``[B, T, H, D]``, float32 / bfloat16 / float16 (one dtype). T must be a multiple of chunk_len.
        log_decay: ``[B, T, H]`` log of the per-token decay (``≤ 0``, not checked), or None for plain linear
            memory. Computed in float32 (other float dtypes are cast).
        segment_len: C, the segment length; the last segment may be partial.
        chunk_len: c, the kernel chunk length: a power of two ≥ 16 that divides segment_len.
        state_init: ``"checkpoint"`` (segment s starts from the end of segment s−1) or ``"independent"``
            (every segment starts from zeros).
        initial_state: ``[B, H, D, D]`` state before token 0 under ``"checkpoint"`` (zeros if None); must be
            None under ``"independent"``. Computed in float32.
        walk: how the chunk-start states are carried across chunks, ``"sequential"`` (default) or ``"scan"``;
            both give the same results up to float32 rounding.

    Returns:
        online_out: ``[B, T, H, D]`` in q's dtype, ``o_t = M_t q_t``.
        cached_states: ``[B, N, H, D, D]`` float32, N = ceil(T / segment_len), the state at each segment end.
        final_state: ``[B, H, D, D]`` float32, the state after the last token.

    Raises:
        ValueError: on shapes, dtypes, devices or lengths that do not fit (the message names the values), or a
            ``walk`` other than "sequential" and "scan".
    """
    _validate(q, k, v, log_decay, segment_len, chunk_len, state_init, initial_state)
    _check_walk(walk)
    if log_decay is not None:
        log_decay = log_decay.float().contiguous()
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return _linear_memory_op(q.contiguous(), k.contiguous(), v.contiguous(), log_decay, initial_state,
                             segment_len, chunk_len, state_init == "independent", walk)
