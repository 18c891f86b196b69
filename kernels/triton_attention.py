"""Fused attention in Triton: FlashAttention-2 forward/backward and split-K decode.

Training path (:func:`attention_triton`)
    Every input is brought to the packed flash-attn "varlen" layout: tokens (N, H, D) plus int32
    ``cu_seqlens`` offsets; a plain (B, T, H, D) batch is the special case
    ``cu_seqlens = arange(B + 1) * T``.  One program handles one block of queries (forward, dQ)
    or keys (dK/dV) of one sequence and one head, so sequences never see each other and padding
    is never computed.

    * Forward: online softmax in base 2 (``exp2`` with the scale folded into ``log2(e)``); the
      T x T score matrix is never stored.  Saves the per-row log-sum-exp (base-2 units).
    * Backward: ``delta = rowsum(dO * O)`` in a small preprocess kernel, then two kernels that
      both recompute P from the saved log-sum-exp:
        - dK/dV: one program per key block and *key/value* head; it loops over the query heads
          of its GQA group and over the query blocks, so the group sum happens in registers;
        - dQ: one program per query block and query head, looping over key blocks.
      No atomics anywhere: every output element is written by exactly one program, so the
      backward is deterministic (bit-identical across runs) and autotuning may re-run kernels
      safely.  The price is computing QK^T and dO V^T twice (once per kernel).
    * Key blocks strictly inside the causal triangle and the sequence run without masks; only
      the diagonal block and the last, partial block pay for ``tl.where``.

    The forward and backward are registered as torch custom ops (``fastgpt::flash_attn_fwd`` /
    ``fastgpt::flash_attn_bwd``) with fake (meta) implementations and an autograd formula
    (``register_autograd``, torch's custom-op form of an ``autograd.Function``), so models
    using them trace under ``torch.compile`` without graph breaks inside the op.

Decode path (:func:`decode_attention_triton`)
    "Flash-decoding": the cache range of every row is cut into ``num_splits`` chunks, each
    handled by its own program (grid = batch x kv-heads x splits) that writes a partial
    (max, sum, unnormalised output); a second kernel merges the partials.  One program holds
    all Tq queries of all query heads of a GQA group as the rows of one tile, so each key/value
    is read once per group.  The split count comes from the cache capacity (its shape, so no
    host sync and CUDA-graph friendly): ``min(64, ceil(Tmax / 256), enough programs to fill the
    GPU twice)``; short caches get one split.  Chunks past a row's length exit at once.

Precision: fp16/bf16 inputs use fp16/bf16 tensor-core dots with fp32 accumulation; fp32
inputs use true fp32 (``input_precision="ieee"``) dots, never TF32, since whoever passes fp32
asked for fp32 accuracy.  All softmax statistics are fp32.

Block sizes: on CUDA ``triton.autotune`` picks from a few configs per kernel (H100-oriented:
e.g. forward BLOCK_M 128 x BLOCK_N 64); under ``TRITON_INTERPRET=1`` each kernel has one small
fixed config (16-wide tiles) so the CPU tests exercise several blocks and ragged tails.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["attention_triton", "decode_attention_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Causal masking below relies on BLOCK_M % BLOCK_N == 0 (forward, dQ) and BLOCK_N % BLOCK_M == 0
# (dK/dV): a block's diagonal then falls inside exactly the blocks the kernels mask.
if _INTERPRET:
    _FWD_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=16)]
    _DKDV_CONFIGS = [_cfg(1, 1, BLOCK_M=16, BLOCK_N=32)]
    _DQ_CONFIGS = [_cfg(1, 1, BLOCK_M=32, BLOCK_N=16)]
else:
    _FWD_CONFIGS = [
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    ]
    _DKDV_CONFIGS = [
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=128),
        _cfg(8, 3, BLOCK_M=64, BLOCK_N=128),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=32, BLOCK_N=64),
    ]
    _DQ_CONFIGS = [
        _cfg(4, 3, BLOCK_M=128, BLOCK_N=32),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
        _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),
    ]
_PRE_BLOCK = 16 if _INTERPRET else 128  # tokens per program in the delta = rowsum(dO*O) kernel
# Decode: keys per inner step, minimum keys per split before splitting pays off, split cap.
_DECODE_BLOCK_N = 16 if _INTERPRET else 64
_DECODE_MIN_SPLIT_KEYS = 16 if _INTERPRET else 256
_DECODE_MAX_SPLITS = 64
_DECODE_WARPS = 1 if _INTERPRET else 4
_TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "DOT_PREC"]


# ============================================================================ forward kernel
@triton.jit
def _sequence_bounds(cu_seqlens, seq):
    """(first token as int64, length) of packed sequence ``seq``: token offset x stride can pass
    2**31, so the start is widened before any address arithmetic."""
    start = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - start
    return start.to(tl.int64), length


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len, offs_m, lo, hi,
               qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) with key blocks [lo, hi); MASK applies the
    causal and sequence-length masks (only needed on diagonal and tail blocks)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=cols[None, :] < seq_len, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=cols[:, None] < seq_len, other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASK:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        # Every row sees key 0 in its first block, so m_new is finite from the first step on.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, cu_seqlens, qk_scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, stride_lh,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks of the longest sequence, sequences, query heads)."""
    # Launch the (causally) most expensive query blocks first so they do not end up in the tail.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_m >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N  # key blocks entirely inside the sequence
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, start_m)  # ...and entirely left of the diagonal
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
    else:
        hi = seq_len
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len,
                               offs_m, 0, full_end, qk_scale, HEAD_DIM, BLOCK_N, False, IS_CAUSAL,
                               DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, seq_len,
                               offs_m, full_end, hi, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL,
                               DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(Out + (seq_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + head * stride_lh + seq_start + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ========================================================================== backward kernels
@triton.jit
def _bwd_preprocess_kernel(Out, DO, Delta, n_tokens, stride_ot, stride_oh, stride_dt, stride_dh,
                           stride_deltah, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]; grid (token blocks, query heads)."""
    offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_t < n_tokens
    o = tl.load(Out + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs_t[:, None] * stride_dt + head * stride_dh + offs_d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + head * stride_deltah + offs_t, tl.sum(o * do, axis=1), mask=ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    seq_len, offs_n, lo, hi, qk_scale, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one head.

    Rows past the sequence end load as zeros (q = dO = 0, lse = delta = 0), which makes their
    dV and dK contributions exactly zero, so only the causal diagonal needs a mask.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seq_len
        qt = tl.load(q_base + rows[None, :] * stride_qt + offs_d[:, None],
                     mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
        if MASK:  # mask the logits, not P: masked logits can exceed lse and overflow exp2
            qkt = tl.where(rows[None, :] >= offs_n[:, None], qkt, float("-inf"))
        pt = tl.exp2(qkt - lse[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, cu_seqlens, qk_scale, sm_scale,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                          stride_lh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (key blocks, sequences, key/value heads); sums over the GQA group in registers."""
    start_n = tl.program_id(0) * BLOCK_N
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_len
    k = tl.load(K + (seq_start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + (seq_start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_base = Q + seq_start * stride_qt + head * stride_qh
        do_base = DO + seq_start * stride_dot + head * stride_doh
        lse_base = Lse + head * stride_lh + seq_start
        delta_base = Delta + head * stride_lh + seq_start
        lo = 0
        if IS_CAUSAL:
            # Queries before start_n never see this block; the next BLOCK_N queries straddle
            # the diagonal and are masked; the rest see the whole block.
            lo = start_n + BLOCK_N
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     stride_qt, stride_dot, seq_len, offs_n, start_n,
                                     tl.minimum(lo, seq_len), qk_scale, HEAD_DIM, BLOCK_M, True,
                                     DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qt, stride_dot, seq_len, offs_n, lo, seq_len, qk_scale,
                                 HEAD_DIM, BLOCK_M, False, DOT_PREC)
    dk = dk * sm_scale
    tl.store(DK + (seq_start + offs_n[:, None]) * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + (seq_start + offs_n[:, None]) * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len, offs_m,
                  lo, hi, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=cols[None, :] < seq_len, other=0.0)
            vt = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None],
                         mask=cols[None, :] < seq_len, other=0.0)
        else:
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])
            vt = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None])
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if MASK:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, cu_seqlens, qk_scale, sm_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (query blocks, sequences, query heads)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seq_len = _sequence_bounds(cu_seqlens, seq)
    if start_m >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q = tl.load(Q + (seq_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + (seq_start + offs_m[:, None]) * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + head * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + head * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (seq_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, start_m)
        hi = tl.minimum(seq_len, start_m + BLOCK_M)
    else:
        hi = seq_len
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len,
                       offs_m, 0, full_end, qk_scale, HEAD_DIM, BLOCK_N, False, IS_CAUSAL, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, seq_len,
                       offs_m, full_end, hi, qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + (seq_start + offs_m[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ============================================================================ host wrappers
def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _grid_m(max_seqlen: int, n_seqs: int, n_heads: int):
    return lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), n_seqs, n_heads)


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int, causal: bool, softmax_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    n_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((n_heads, n_tokens), device=q.device, dtype=torch.float32)
    n_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or n_seqs == 0 or max_seqlen == 0:
        return out, lse
    _attn_fwd_kernel[_grid_m(max_seqlen, n_seqs, n_heads)](
        q, k, v, out, lse, cu_seqlens, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, IS_CAUSAL=causal,
        DOT_PREC=_dot_precision(q.dtype))
    return out, lse


def _flash_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               causal: bool, softmax_scale: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    n_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or n_seqs == 0 or max_seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    _bwd_preprocess_kernel[(triton.cdiv(n_tokens, _PRE_BLOCK), n_heads)](
        out, dout, delta, n_tokens, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), HEAD_DIM=head_dim, BLOCK=_PRE_BLOCK,
        num_warps=1 if _INTERPRET else 4)
    group = n_heads // n_kv_heads
    prec = _dot_precision(q.dtype)
    qk_scale = softmax_scale * _LOG2E
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), n_seqs, n_kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, qk_scale, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), GROUP=group, HEAD_DIM=head_dim, IS_CAUSAL=causal, DOT_PREC=prec)
    _attn_bwd_dq_kernel[_grid_m(max_seqlen, n_seqs, n_heads)](
        q, k, v, dout, lse, delta, dq, cu_seqlens, qk_scale, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        GROUP=group, HEAD_DIM=head_dim, IS_CAUSAL=causal, DOT_PREC=prec)
    return dq, dk, dv


# ------------------------------------------------------------- torch custom ops + autograd
@torch.library.custom_op("fastgpt::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                   max_seqlen: int, causal: bool, softmax_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed varlen forward: q (N, Hq, D), k/v (N, Hkv, D) contiguous -> (out, lse (Hq, N))."""
    return _flash_fwd(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastgpt::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                   causal: bool, softmax_scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`flash_attn_fwd` given dout and its saved (out, lse)."""
    return _flash_bwd(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens,
                                ctx.max_seqlen, ctx.causal, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _check_dtypes_and_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention needs q, k, v of one dtype among fp16/bf16/fp32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim must be a power of two in 16..128, got {head_dim}")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
                         ": same head dim, and query heads a multiple of key/value heads")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_dtypes_and_heads(q, k, v)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, T, H, D) or packed (N, H, D), got {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                     softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                     max_seqlen: int | None = None) -> torch.Tensor:
    """Fused attention, same contract as :func:`reference.attention_reference`.

    Accepts (B, T, H, D) with or without ``cu_seqlens`` (which then indexes the flattened B*T
    tokens) or packed (N, H, D) with ``cu_seqlens``.  ``max_seqlen`` (the longest sequence) sizes
    the launch grid; when omitted it is read from ``cu_seqlens`` (one device->host sync).
    Differentiable in q, k, v; returns q's dtype and shape.
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
                            int(max_seqlen), bool(causal), scale)
    return out.view(shape)


# ============================================================================= decode kernels
@triton.jit
def _decode_split_kernel(Q, K, V, cache_seqlens, cache_batch_idx, MPart, LPart, OPart, qk_scale,
                         chunk, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                         stride_vb, stride_vt, stride_vh, stride_pb, stride_ph, stride_ps,
                         TQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_BATCH_IDX: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (batch, kv heads, splits): partial softmax of all TQ x GROUP query rows of one
    kv head over the keys [split * chunk, (split + 1) * chunk) of the row's cache."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(cache_seqlens + b)
    lo = split * chunk
    if lo >= seq_len:
        return  # the combine kernel never reads this split
    hi = tl.minimum(lo + chunk, seq_len)
    if HAS_BATCH_IDX:
        cache_row = tl.load(cache_batch_idx + b).to(tl.int64)
    else:
        cache_row = b.to(tl.int64)
    r = tl.arange(0, ROWS)  # row r = query head (kv_head * GROUP + r // TQ), query (r % TQ)
    qi = r % TQ
    row_ok = r < TQ * GROUP
    head = kv_head * GROUP + r // TQ
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + qi[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pos = seq_len - TQ + qi
    k_base = K + cache_row * stride_kb + kv_head * stride_kh
    v_base = V + cache_row * stride_vb + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        qk = tl.where(col_ok[None, :] & (cols[None, :] <= q_pos[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A new query may see nothing of this chunk (it lies after the query): keep it finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    part = b * stride_pb + kv_head * stride_ph + split * stride_ps
    tl.store(MPart + part + r, m_i)
    tl.store(LPart + part + r, l_i)
    tl.store(OPart + part * HEAD_DIM + r[:, None] * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _decode_combine_kernel(MPart, LPart, OPart, Out, cache_seqlens, chunk,
                           stride_pb, stride_ph, stride_ps, stride_ob, stride_ot, stride_oh,
                           TQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                           HEAD_DIM: tl.constexpr):
    """Grid (batch, kv heads): merge the partials of the splits that saw any key."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(cache_seqlens + b)
    n_splits = tl.cdiv(seq_len, chunk)
    r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for split in range(0, n_splits):
        part = b * stride_pb + kv_head * stride_ph + split * stride_ps
        m_s = tl.load(MPart + part + r)
        l_s = tl.load(LPart + part + r)
        o_s = tl.load(OPart + part * HEAD_DIM + r[:, None] * HEAD_DIM + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m_i = m_new
    acc = acc / l_i[:, None]
    qi = r % TQ
    head = kv_head * GROUP + r // TQ
    tl.store(Out + b * stride_ob + qi[:, None] * stride_ot + head[:, None] * stride_oh
             + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=(r < TQ * GROUP)[:, None])


def _decode_num_splits(max_len: int, batch: int, n_kv_heads: int,
                       device: torch.device | None = None) -> int:
    """Enough splits to give the GPU ~2 programs per SM, none shorter than the minimum chunk."""
    by_length = triton.cdiv(max_len, _DECODE_MIN_SPLIT_KEYS)
    if _INTERPRET or device is None or device.type != "cuda":
        by_occupancy = by_length
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        by_occupancy = triton.cdiv(2 * sms, max(1, batch * n_kv_heads))
    return max(1, min(_DECODE_MAX_SPLITS, by_length, by_occupancy))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, softmax_scale: float | None = None,
                            cache_batch_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Split-K decode attention, same contract as :func:`reference.decode_attention_reference`.

    q (B, Tq, Hq, D), caches (Bc, Tmax, Hkv, D), cache_seqlens int (B,) including the Tq new
    tokens, optional cache_batch_idx int (B,).  Forward only (no autograd).
    """
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode attention needs q (B, Tq, Hq, D) and equal (Bc, Tmax, Hkv, D) "
                         f"caches, got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    _check_dtypes_and_heads(q, k_cache, v_cache)
    batch, tq, n_heads, head_dim = q.shape
    n_kv_heads, t_max = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    group = n_heads // n_kv_heads
    rows = max(16, triton.next_power_of_2(tq * group))  # tl.dot needs >= 16 rows
    q = q.contiguous()
    # Only the last dim must be dense; batch/time/head strides are passed to the kernel.
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    cache_seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    has_idx = cache_batch_idx is not None
    idx = (cache_batch_idx.to(device=q.device, dtype=torch.int32).contiguous() if has_idx
           else cache_seqlens)  # placeholder pointer, never read
    n_splits = _decode_num_splits(t_max, batch, n_kv_heads, q.device)
    chunk = triton.cdiv(triton.cdiv(t_max, n_splits), _DECODE_BLOCK_N) * _DECODE_BLOCK_N
    n_splits = triton.cdiv(t_max, chunk)
    m_part = torch.empty((batch, n_kv_heads, n_splits, rows), device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty((batch, n_kv_heads, n_splits, rows, head_dim), device=q.device,
                         dtype=torch.float32)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    meta = dict(TQ=tq, GROUP=group, ROWS=rows, HEAD_DIM=head_dim)
    _decode_split_kernel[(batch, n_kv_heads, n_splits)](
        q, k_cache, v_cache, cache_seqlens, idx, m_part, l_part, o_part, scale * _LOG2E, chunk,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        m_part.stride(0), m_part.stride(1), m_part.stride(2),
        BLOCK_N=_DECODE_BLOCK_N, HAS_BATCH_IDX=has_idx, DOT_PREC=_dot_precision(q.dtype),
        num_warps=_DECODE_WARPS, num_stages=1 if _INTERPRET else 3, **meta)
    _decode_combine_kernel[(batch, n_kv_heads)](
        m_part, l_part, o_part, out, cache_seqlens, chunk,
        m_part.stride(0), m_part.stride(1), m_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2), num_warps=_DECODE_WARPS, **meta)
    return out
