"""Fused attention in Triton: FlashAttention-2 forward and backward (varlen, GQA, any head dim
up to 128).  The decode path lives in :mod:`.triton_decode`.

Layout.  Every input is brought to the packed flash-attn "varlen" layout: tokens (N, H, D) plus
int32 ``cu_seqlens`` offsets; a plain (B, T, H, D) batch is the special case
``cu_seqlens = arange(B + 1) * T``.  One program handles one block of queries (forward, dQ) or
keys (dK/dV) of one sequence and one head, so sequences never see each other and padding is
never computed.

Head dims.  The kernels tile the head dim as ``BLOCK_D`` = the next power of two (>= 16); a head
dim below it (80 or 96, as some Llama-family models use) is handled by masked loads and stores
(``PAD_D``), so the padded lanes read zeros and are never written.  Head dims above 128 are
rejected (their tiles would not fit the registers).

Forward.  Online softmax in base 2 (``exp2`` with the scale folded into ``log2(e)``); the T x T
score matrix is never stored; the per-row log-sum-exp (base-2 units) is saved.  Key blocks
strictly inside the causal triangle and the sequence run without masks; only the diagonal block
and the last, partial block pay for ``tl.where``.  ``use_tma=True`` loads Q/K/V tiles through TMA
tensor descriptors (Hopper's bulk copy engine; host-side ``TensorDescriptor``) instead of pointer
arithmetic -- an A/B alternative, used only where the head dim needs no padding.

Backward.  ``delta = rowsum(dO * O)`` in a small preprocess kernel, then one of:
    * deterministic (default): a dK/dV kernel, one program per key block and *key/value* head,
      looping over the query heads of its GQA group (the group sum happens in registers) and the
      query blocks; then a separate dQ kernel per query block.  No atomics: every output element
      is written by exactly one program, so the backward is bit-identical across runs.  The price
      is computing QK^T and dO V^T twice: 7 GEMMs per block pair.
    * ``deterministic=False``: the same dK/dV kernel also forms dQ's share of each block pair
      (dS K) and adds it into an fp32 dQ buffer with atomics -- 5 GEMMs, FlashAttention-2's
      scheme; the summation order (hence the last bits of dQ) varies between runs.

Registered as torch custom ops (``fastgpt::flash_attn_fwd`` / ``fastgpt::flash_attn_bwd``) with
fake (meta) implementations and an autograd formula, so models using them trace under
``torch.compile`` without graph breaks inside the op.

Precision: fp16/bf16 inputs use fp16/bf16 tensor-core dots with fp32 accumulation; fp32 inputs
use true fp32 (``input_precision="ieee"``) dots, never TF32.  All softmax statistics are fp32.

Launch configurations come from :mod:`.launch` (a committed per-GPU table, autotuning as the
fallback, fixed 16-wide tiles under the interpreter); :func:`describe_launch` reports the choice.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, LaunchConfig, candidates, head_dim_block, lookup, run

__all__ = ["attention_triton", "describe_launch"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 128
_PRE_BLOCK = 16 if INTERPRET else 128  # tokens per program in the delta = rowsum(dO*O) kernel


# ==================================================================================== helpers
@triton.jit
def _sequence_bounds(cu_seqlens, seq):
    """(first token as int64, length) of packed sequence ``seq``: token offset x stride can pass
    2**31, so the start is widened before any address arithmetic."""
    start = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - start
    return start.to(tl.int64), length


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, TRANSPOSED: tl.constexpr, MASK_ROWS: tl.constexpr,
               PAD_D: tl.constexpr):
    """Load a (rows, d) tile -- or its transpose (d, rows) -- masking only what needs it:
    rows past the sequence (MASK_ROWS) and head-dim lanes past the real head dim (PAD_D)."""
    if TRANSPOSED:
        row_mask = row_ok[None, :]
        d_mask = d_ok[:, None]
    else:
        row_mask = row_ok[:, None]
        d_mask = d_ok[None, :]
    if MASK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=row_mask & d_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=d_mask, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, value, row_ok, d_ok, PAD_D: tl.constexpr):
    if PAD_D:
        tl.store(ptrs, value, mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None])


@triton.jit
def _causal_ranges(start, seq_len, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                   IS_CAUSAL: tl.constexpr):
    """For a block of rows starting at ``start``: the end of the column blocks that need no mask
    (inside the sequence and, if causal, left of the diagonal) and the end of all columns seen."""
    full_end = (seq_len // BLOCK_COLS) * BLOCK_COLS
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, start)
        hi = tl.minimum(seq_len, start + BLOCK_ROWS)
    else:
        hi = seq_len
    return full_end, hi


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v, cols, offs_m, seq_len, MASK: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Fold one block of (already scaled) scores and its V tile into (acc, l_i, m_i).  With MASK,
    only columns < seq_len (and, if causal, <= the row's position ``offs_m``) count."""
    if MASK:
        keep = cols[None, :] < seq_len
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row may see no key of a block yet (a decode chunk after its query): keep exponents finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _store_out_lse(Out, Lse, acc, l_i, m_i, seq_start, offs_m, head, row_ok, offs_d, d_ok,
                   stride_ot, stride_oh, stride_lh, PAD_D: tl.constexpr):
    acc = acc / l_i[:, None]
    _store_tile(Out + (seq_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
                acc.to(Out.dtype.element_ty), row_ok, d_ok, PAD_D)
    tl.store(Lse + head * stride_lh + seq_start + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ============================================================================ forward kernels
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len, offs_m, offs_d,
               d_ok, lo, hi, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Key blocks [lo, hi) through pointer loads; MASK on diagonal and tail blocks only."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len
        kt = _load_tile(k_base + cols[None, :] * stride_kt + offs_d[:, None], col_ok, d_ok,
                        True, MASK, PAD_D)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok,
                       False, MASK, PAD_D)
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, cols, offs_m, seq_len, MASK,
                                             IS_CAUSAL, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, cu_seqlens, qk_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, stride_lh, SEQ_BUCKET,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks of the longest sequence, sequences, query heads).  SEQ_BUCKET is only
    an autotuning key (the longest sequence, bucketed)."""
    # Launch the (causally) most expensive query blocks first so they do not end up in the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_m >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = _load_tile(Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                   row_ok, d_ok, False, True, PAD_D)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_ranges(start_m, seq_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len,
                               offs_m, offs_d, d_ok, 0, full_end, qk_scale, BLOCK_N, False, PAD_D,
                               IS_CAUSAL, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len,
                               offs_m, offs_d, d_ok, full_end, hi, qk_scale, BLOCK_N, True, PAD_D,
                               IS_CAUSAL, DOT_PREC)
    _store_out_lse(Out, Lse, acc, l_i, m_i, seq_start, offs_m, head, row_ok, offs_d, d_ok,
                   stride_ot, stride_oh, stride_lh, PAD_D)


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, seq_start, kv_col, seq_len, offs_m, lo, hi,
                   qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """Key blocks [lo, hi) through TMA descriptors.  Rows past the sequence belong to the next
    sequence (or are zero-filled past the tensor): their scores are masked, and their V rows
    meet p = 0."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = desc_k.load([seq_start + start_n, kv_col])
        v = desc_v.load([seq_start + start_n, kv_col])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, start_n + offs_n, offs_m,
                                             seq_len, MASK, IS_CAUSAL, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tma_kernel(desc_q, desc_k, desc_v, Out, Lse, cu_seqlens, qk_scale,
                         stride_ot, stride_oh, stride_lh,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward with Q/K/V tiles loaded through 2-D (tokens, heads * HEAD_DIM) descriptors;
    the output is stored with masked pointer stores (a tile may overhang into the next sequence,
    whose rows must not be written).  Needs HEAD_DIM to be a power of two (no padding)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + seq)  # int32: TMA coordinates are 32-bit
    seq_len = tl.load(cu_seqlens + seq + 1) - seq_start
    if start_m >= seq_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = desc_q.load([seq_start + start_m, head * HEAD_DIM])
    kv_col = (head // GROUP) * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, hi = _causal_ranges(start_m, seq_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, seq_start, kv_col, seq_len,
                                   offs_m, 0, full_end, qk_scale, BLOCK_N, False, IS_CAUSAL, DOT_PREC)
    acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, desc_k, desc_v, seq_start, kv_col, seq_len,
                                   offs_m, full_end, hi, qk_scale, BLOCK_N, True, IS_CAUSAL, DOT_PREC)
    _store_out_lse(Out, Lse, acc, l_i, m_i, seq_start.to(tl.int64), offs_m, head, row_ok, offs_d,
                   offs_d < HEAD_DIM, stride_ot, stride_oh, stride_lh, False)


# =========================================================================== backward kernels
@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, n_tokens, stride_ot, stride_oh, stride_dt, stride_dh,
                           stride_deltah, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]; grid (token blocks, query heads)."""
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < n_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs_t[:, None] * stride_dt + head * stride_dh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + head * stride_deltah + offs_t, tl.sum(o * do, axis=1), mask=offs_t < n_tokens)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                  stride_qt, stride_dot, stride_dqt, seq_len, offs_n, offs_d, d_ok, lo, hi,
                  qk_scale, sm_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                  PAD_D: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one head; with
    ATOMIC_DQ also add each block pair's dQ share (dS K) into the fp32 dQ buffer.

    Rows past the sequence end load as zeros (q = dO = 0, lse = delta = 0), which makes their
    dV and dK contributions exactly zero, so only the causal diagonal needs a mask; their dQ
    share is masked out of the atomic add.  Key columns past the sequence were loaded as zero
    K / V rows, so they add nothing to dQ either.
    """
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len
        qt = _load_tile(q_base + rows[None, :] * stride_qt + offs_d[:, None], row_ok, d_ok,
                        True, True, PAD_D)
        do = _load_tile(do_base + rows[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok,
                        False, True, PAD_D)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
        if MASK:  # mask the logits, not P: masked logits can exceed lse and overflow exp2
            qkt = tl.where(rows[None, :] >= offs_n[:, None], qkt, float("-inf"))
        pt = tl.exp2(qkt - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
        dk = tl.dot(dst, tl.trans(qt), dk, input_precision=DOT_PREC)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PREC) * sm_scale
            tl.atomic_add(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], dq,
                          mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_kv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, DQ, cu_seqlens, qk_scale, sm_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                        stride_dqt, stride_dqh, stride_lh, SEQ_BUCKET,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (key blocks, sequences, key/value heads); sums over the GQA group in registers.
    With ATOMIC_DQ, DQ is an fp32 (N, Hq, HEAD_DIM) buffer of zeros that receives dQ."""
    start_n = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < seq_len
    k = _load_tile(K + (seq_start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :],
                   col_ok, d_ok, False, True, PAD_D)
    v = _load_tile(V + (seq_start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
                   col_ok, d_ok, False, True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + seq_start * stride_qt + head * stride_qh
        do_base = DO + seq_start * stride_dot + head * stride_doh
        dq_base = DQ + seq_start * stride_dqt + head * stride_dqh
        lse_base = Lse + head * stride_lh + seq_start
        delta_base = Delta + head * stride_lh + seq_start
        lo = 0
        if IS_CAUSAL:
            # Queries before start_n never see this block; the next BLOCK_N queries straddle
            # the diagonal and are masked; the rest see the whole block.
            lo = start_n + BLOCK_N
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                   stride_qt, stride_dot, stride_dqt, seq_len, offs_n, offs_d,
                                   d_ok, start_n, tl.minimum(lo, seq_len), qk_scale, sm_scale,
                                   BLOCK_M, True, PAD_D, ATOMIC_DQ, DOT_PREC)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                               stride_qt, stride_dot, stride_dqt, seq_len, offs_n, offs_d, d_ok,
                               lo, seq_len, qk_scale, sm_scale, BLOCK_M, False, PAD_D, ATOMIC_DQ,
                               DOT_PREC)
    dk = dk * sm_scale
    _store_tile(DK + (seq_start + offs_n[:, None]) * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                dk.to(DK.dtype.element_ty), col_ok, d_ok, PAD_D)
    _store_tile(DV + (seq_start + offs_n[:, None]) * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                dv.to(DV.dtype.element_ty), col_ok, d_ok, PAD_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len, offs_m,
                  offs_d, d_ok, lo, hi, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                  PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_len
        kt = _load_tile(k_base + cols[None, :] * stride_kt + offs_d[:, None], col_ok, d_ok,
                        True, MASK, PAD_D)
        vt = _load_tile(v_base + cols[None, :] * stride_vt + offs_d[:, None], col_ok, d_ok,
                        True, MASK, PAD_D)
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASK:
            keep = col_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, cu_seqlens, qk_scale, sm_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, SEQ_BUCKET,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        PAD_D: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks, sequences, query heads)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_m >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = _load_tile(Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                   row_ok, d_ok, False, True, PAD_D)
    do = _load_tile(DO + (seq_start + offs_m[:, None]) * stride_dot + head * stride_doh + offs_d[None, :],
                    row_ok, d_ok, False, True, PAD_D)
    lse = tl.load(Lse + head * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + head * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end, hi = _causal_ranges(start_m, seq_len, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len,
                       offs_m, offs_d, d_ok, 0, full_end, qk_scale, BLOCK_N, False, PAD_D,
                       IS_CAUSAL, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len,
                       offs_m, offs_d, d_ok, full_end, hi, qk_scale, BLOCK_N, True, PAD_D,
                       IS_CAUSAL, DOT_PREC)
    dq = dq * sm_scale
    _store_tile(DQ + (seq_start + offs_m[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), row_ok, d_ok, PAD_D)


# ======================================================================= launch configuration
_JIT = {"attn_fwd": _attn_fwd_kernel, "attn_bwd_dkdv": _attn_bwd_kv_kernel,
        "attn_bwd_fused": _attn_bwd_kv_kernel, "attn_bwd_dq": _attn_bwd_dq_kernel}
_AUTOTUNE_KEY = ["HEAD_DIM", "BLOCK_D", "IS_CAUSAL", "DOT_PREC", "GROUP", "SEQ_BUCKET"]


def _seq_bucket_arg(max_seqlen: int) -> int:
    """Autotuning key of the sequence length: its next power of two (>= 128, a multiple of 16 so
    Triton's integer specialisation never splits the compiled kernel by it)."""
    return max(128, triton.next_power_of_2(max_seqlen))


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str):
    """The autotuning fallback of one kernel: every candidate of every head-dim / dtype class,
    pruned per launch to the candidates of its BLOCK_D and dtype."""
    configs = {c for d in (64, 128) for dt in (torch.float16, torch.float32)
               for c in candidates(kernel, d, dt)}

    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        allowed = {(c.block_m, c.block_n, c.num_warps, c.num_stages)
                   for c in candidates(kernel, args["BLOCK_D"], args["Q"].dtype)}
        keep = [c for c in cfgs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return keep or cfgs[:1]

    return triton.autotune(
        configs=[triton.Config(c.blocks(kernel), num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in sorted(configs, key=str)],
        key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune},
        reset_to_zero=["DQ"] if kernel == "attn_bwd_fused" else None,
        cache_results=True)(_JIT[kernel])


def _launch(kernel: str, grid, args: tuple, constexprs: dict, block_d: int, dtype: torch.dtype,
            device: torch.device, max_seqlen: int, configs: dict | None) -> None:
    """Launch ``kernel`` with ``configs[kernel]`` if given (the tuning sweep), else its table
    configuration, else through its autotuning fallback."""
    cfg = (configs or {}).get(kernel) or lookup(kernel, block_d, dtype, device, max_seqlen,
                                                constexprs.get("GROUP", 1))[0]
    if cfg is None:
        run(_autotuned(kernel), grid, *args, **constexprs)
        return
    run(_JIT[kernel], grid(cfg.blocks(kernel)), *args, **constexprs, **cfg.meta(kernel))


def describe_launch(head_dim: int, dtype: torch.dtype, device: torch.device, max_seqlen: int,
                    group: int = 1, backward: bool = True, deterministic: bool = True,
                    use_tma: bool = False) -> str:
    """The configurations the kernels of one attention call use, and where each came from
    (the table, the autotuner's choice for this key, or the interpreter's fixed tiles)."""
    block_d = head_dim_block(head_dim)
    kernels = ["attn_fwd_tma" if use_tma and _tma_ok(head_dim) else "attn_fwd"]
    if backward:
        kernels += ["attn_bwd_dkdv", "attn_bwd_dq"] if deterministic else ["attn_bwd_fused"]
    parts = []
    for kernel in kernels:
        cfg, source = lookup(kernel, block_d, dtype, device, max_seqlen, group)
        if cfg is None and kernel in _JIT:
            best = getattr(_autotuned(kernel), "best_config", None)
            cfg_text = (f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} w{best.num_warps} "
                        f"s{best.num_stages}") if best else "not run yet"
            source = f"autotuned among {len(_autotuned(kernel).configs)}"
        else:
            cfg_text = str(cfg or _tma_default(block_d, dtype))
        parts.append(f"{kernel} {cfg_text} [{source}]")
    return "; ".join(parts)


# ============================================================================== host wrappers
def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _tma_ok(head_dim: int) -> bool:
    """TMA descriptors need an unpadded (power-of-two) head dim; the interpreter emulates them."""
    return head_dim == head_dim_block(head_dim)


def _tma_default(block_d: int, dtype: torch.dtype) -> LaunchConfig:
    return candidates("attn_fwd_tma", block_d, dtype)[0]


def _grid(max_seqlen: int, n_seqs: int, n_heads: int, block: str):
    return lambda meta: (triton.cdiv(max_seqlen, meta[block]), n_seqs, n_heads)


def _flash_fwd_tma(q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor
    n_tokens, n_heads, head_dim = q.shape
    cfg = cfg or lookup("attn_fwd_tma", head_dim, q.dtype, q.device, max_seqlen)[0] \
        or _tma_default(head_dim, q.dtype)
    descs = [TensorDescriptor.from_tensor(x.view(n_tokens, -1), [rows, head_dim])
             for x, rows in ((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n))]
    run(_attn_fwd_tma_kernel, (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.numel() - 1, n_heads),
        *descs, out, lse, cu_seqlens, softmax_scale * _LOG2E, out.stride(0), out.stride(1),
        lse.stride(0), GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, IS_CAUSAL=causal,
        DOT_PREC=_dot_precision(q.dtype), **cfg.meta("attn_fwd_tma"))


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int, causal: bool, softmax_scale: float, use_tma: bool = False,
               configs: dict[str, LaunchConfig] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward launch; ``configs`` ({kernel name: LaunchConfig}) overrides the table (the
    tuning sweep times candidates through it)."""
    n_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((n_heads, n_tokens), device=q.device, dtype=torch.float32)
    n_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or n_seqs == 0 or max_seqlen == 0:
        return out, lse
    if use_tma and _tma_ok(head_dim):
        _flash_fwd_tma(q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale,
                       (configs or {}).get("attn_fwd_tma"))
        return out, lse
    block_d = head_dim_block(head_dim)
    _launch("attn_fwd", _grid(max_seqlen, n_seqs, n_heads, "BLOCK_M"),
            (q, k, v, out, lse, cu_seqlens, softmax_scale * _LOG2E,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             out.stride(0), out.stride(1), lse.stride(0), _seq_bucket_arg(max_seqlen)),
            dict(GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d,
                 PAD_D=head_dim != block_d, IS_CAUSAL=causal, DOT_PREC=_dot_precision(q.dtype)),
            block_d, q.dtype, q.device, max_seqlen, configs)
    return out, lse


def _flash_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               causal: bool, softmax_scale: float, deterministic: bool = True,
               configs: dict[str, LaunchConfig] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward launches; ``configs`` as in :func:`_flash_fwd`."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    n_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or n_seqs == 0 or max_seqlen == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    block_d = head_dim_block(head_dim)
    delta = torch.empty_like(lse)
    run(_bwd_preprocess_kernel, (triton.cdiv(n_tokens, _PRE_BLOCK), n_heads),
        out, dout, delta, n_tokens, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=_PRE_BLOCK,
        num_warps=1 if INTERPRET else 4)
    # The fused variant accumulates dQ in fp32 with atomics; the other writes it once, in q's dtype.
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if not deterministic \
        else torch.empty_like(q)
    common = dict(GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  PAD_D=head_dim != block_d, IS_CAUSAL=causal, DOT_PREC=_dot_precision(q.dtype))
    qk_scale = softmax_scale * _LOG2E
    bucket = _seq_bucket_arg(max_seqlen)
    _launch("attn_bwd_dkdv" if deterministic else "attn_bwd_fused",
            _grid(max_seqlen, n_seqs, n_kv_heads, "BLOCK_N"),
            (q, k, v, dout, lse, delta, dk, dv, dq, cu_seqlens, qk_scale, softmax_scale,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
             dq.stride(0), dq.stride(1), lse.stride(0), bucket),
            dict(common, ATOMIC_DQ=not deterministic), block_d, q.dtype, q.device, max_seqlen, configs)
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    _launch("attn_bwd_dq", _grid(max_seqlen, n_seqs, n_heads, "BLOCK_M"),
            (q, k, v, dout, lse, delta, dq, cu_seqlens, qk_scale, softmax_scale,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), bucket),
            common, block_d, q.dtype, q.device, max_seqlen, configs)
    return dq, dk, dv


# ------------------------------------------------------------- torch custom ops + autograd
@torch.library.custom_op("fastgpt::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int, causal: bool, softmax_scale: float, deterministic: bool = True,
                   use_tma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen forward: q (N, Hq, D), k/v (N, Hkv, D) contiguous -> (out, lse (Hq, N)).
    ``deterministic`` only travels to the backward."""
    return _flash_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, use_tma)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic=True, use_tma=False):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastgpt::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   causal: bool, softmax_scale: float, deterministic: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`flash_attn_fwd` given dout and its saved (out, lse)."""
    return _flash_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale,
                      deterministic)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, deterministic, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens,
                                ctx.max_seqlen, ctx.causal, ctx.softmax_scale, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def check_dtypes_and_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shared with the decode path: one dtype, a supported head dim, whole GQA groups."""
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention needs q, k, v of one dtype among fp16/bf16/fp32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{_MAX_HEAD_DIM} for the Triton kernels, got "
                         f"{head_dim} (use the reference backend for larger heads)")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
                         ": same head dim, and query heads a multiple of key/value heads")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_dtypes_and_heads(q, k, v)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, T, H, D) or packed (N, H, D), got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                     softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                     max_seqlen: int | None = None, *, deterministic: bool = True,
                     use_tma: bool = False) -> torch.Tensor:
    """Fused attention, same contract as :func:`reference.attention_reference`.

    Accepts (B, T, H, D) with or without ``cu_seqlens`` (which then indexes the flattened B*T
    tokens) or packed (N, H, D) with ``cu_seqlens``.  ``max_seqlen`` (the longest sequence) sizes
    the launch grid; when omitted it is read from ``cu_seqlens`` (one device->host sync).
    Differentiable in q, k, v; returns q's dtype and shape.  ``deterministic=False`` selects the
    fused backward with atomic dQ; ``use_tma=True`` the TMA-descriptor forward (both A/B options,
    see the module docstring).
    """
    _check_inputs(q, k, v)
    batched = q.dim() == 4
    shape = q.shape
    if batched:
        batch, seqlen = shape[0], shape[1]
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, device=q.device,
                                      dtype=torch.int32)
            max_seqlen = seqlen
    elif cu_seqlens is None:
        raise ValueError("packed (N, H, D) attention inputs need cu_seqlens")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    cu_seqlens = cu_seqlens.to(q.device).contiguous()
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(shape[-1])
    out, _ = flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens,
                            int(max_seqlen), bool(causal), scale, bool(deterministic), bool(use_tma))
    return out.view(shape)
