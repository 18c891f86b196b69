"""Split-K ("flash-decoding") attention of a few new queries against a KV cache, in Triton.

The cache range of every row is cut into ``num_splits`` chunks, each handled by its own program
(grid = batch x kv-heads x splits).  One program holds all Tq queries of all query heads of a
GQA group as the rows of one tile (padded to 16 rows for ``tl.dot``), so each key/value is read
once per group.  Rows read their cache row through ``cache_batch_idx``, so finished rows cost
nothing and nothing is copied.

* One split (short caches): the split kernel normalises and writes the output itself; no
  partials, no second launch.
* Several splits: each writes a partial (max, sum, unnormalised output) for its real
  Tq x group rows only (the tile's padding rows are never stored), and a combine kernel merges
  the splits that saw any key.

The split count comes from the cache capacity (its shape: no host sync, CUDA-graph friendly):
``min(64, ceil(Tmax / 256), enough programs to fill the GPU twice)``.  Head dims below a power of
two are padded in the kernel, as in :mod:`.triton_attention`.  Launch configuration: the
committed table of :mod:`.launch` (key ``attn_decode/...``); where it has no entry,
``DEFAULT`` below (no autotuning: the split count depends on the key block size).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, LaunchConfig, head_dim_block, lookup, run
from .triton_attention import (_dot_precision, _load_tile, _online_softmax_step, _store_tile,
                               check_dtypes_and_heads)

__all__ = ["decode_attention_op", "decode_attention_triton", "decode_launch"]

_LOG2E = 1.4426950408889634
_MIN_SPLIT_KEYS = 16 if INTERPRET else 256  # fewest keys per split before splitting pays off
_MAX_SPLITS = 64
DEFAULT = LaunchConfig(0, 64, 4, 2)


@triton.jit
def _decode_split_kernel(Q, K, V, cache_seqlens, cache_batch_idx, MPart, LPart, OPart, Out,
                         qk_scale, chunk, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt,
                         stride_kh, stride_vb, stride_vt, stride_vh, stride_pb, stride_ph,
                         stride_ps, stride_ob, stride_ot, stride_oh,
                         TQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
                         DIRECT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (batch, kv heads, splits): softmax of all TQ x GROUP query rows of one kv head over
    the keys [split * chunk, (split + 1) * chunk) of the row's cache.  DIRECT (one split): the
    normalised output goes straight to Out; otherwise a partial per real row."""
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
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + qi[:, None] * stride_qt + head[:, None] * stride_qh
                   + offs_d[None, :], row_ok, d_ok, False, True, PAD_D)
    q_pos = seq_len - TQ + qi
    k_base = K + cache_row * stride_kb + kv_head * stride_kh
    v_base = V + cache_row * stride_vb + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        kt = _load_tile(k_base + cols[None, :] * stride_kt + offs_d[:, None], col_ok, d_ok,
                        True, True, PAD_D)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok,
                       False, True, PAD_D)
        qk = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        # keys < hi and <= each query's position; a query may see none of this chunk
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, cols, q_pos, hi, True, True,
                                             DOT_PREC)
    if DIRECT:
        acc = acc / l_i[:, None]
        _store_tile(Out + b * stride_ob + qi[:, None] * stride_ot + head[:, None] * stride_oh
                    + offs_d[None, :], acc.to(Out.dtype.element_ty), row_ok, d_ok, PAD_D)
    else:
        part = b * stride_pb + kv_head * stride_ph + split * stride_ps
        tl.store(MPart + part + r, m_i, mask=row_ok)
        tl.store(LPart + part + r, l_i, mask=row_ok)
        _store_tile(OPart + part * HEAD_DIM + r[:, None] * HEAD_DIM + offs_d[None, :], acc,
                    row_ok, d_ok, PAD_D)


@triton.jit
def _decode_combine_kernel(MPart, LPart, OPart, Out, cache_seqlens, chunk,
                           stride_pb, stride_ph, stride_ps, stride_ob, stride_ot, stride_oh,
                           TQ: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr):
    """Grid (batch, kv heads): merge the partials of the splits that saw any key."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(cache_seqlens + b)
    n_splits = tl.cdiv(seq_len, chunk)
    r = tl.arange(0, ROWS)
    row_ok = r < TQ * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for split in range(0, n_splits):
        part = b * stride_pb + kv_head * stride_ph + split * stride_ps
        m_s = tl.load(MPart + part + r, mask=row_ok, other=float("-inf"))
        l_s = tl.load(LPart + part + r, mask=row_ok, other=0.0)
        o_s = _load_tile(OPart + part * HEAD_DIM + r[:, None] * HEAD_DIM + offs_d[None, :],
                         row_ok, d_ok, False, True, PAD_D)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m_i = m_new
    acc = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    qi = r % TQ
    head = kv_head * GROUP + r // TQ
    _store_tile(Out + b * stride_ob + qi[:, None] * stride_ot + head[:, None] * stride_oh
                + offs_d[None, :], acc.to(Out.dtype.element_ty), row_ok, d_ok, PAD_D)


def decode_num_splits(max_len: int, batch: int, n_kv_heads: int,
                      device: torch.device | None = None) -> int:
    """Enough splits to give the GPU ~2 programs per SM, none shorter than the minimum chunk."""
    by_length = triton.cdiv(max_len, _MIN_SPLIT_KEYS)
    if INTERPRET or device is None or device.type != "cuda":
        by_occupancy = by_length
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        by_occupancy = triton.cdiv(2 * sms, max(1, batch * n_kv_heads))
    return max(1, min(_MAX_SPLITS, by_length, by_occupancy))


def decode_launch(head_dim: int, dtype: torch.dtype, device: torch.device, t_max: int
                  ) -> tuple[LaunchConfig, str]:
    """(configuration, its source) of the decode kernels for this cache."""
    cfg, source = lookup("attn_decode", head_dim_block(head_dim), dtype, device, t_max)
    return (cfg, source) if cfg is not None else (DEFAULT, "default (no table entry)")


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_seqlens: torch.Tensor, softmax_scale: float | None = None,
                            cache_batch_idx: torch.Tensor | None = None, *,
                            num_splits: int | None = None, config: LaunchConfig | None = None
                            ) -> torch.Tensor:
    """Split-K decode attention, same contract as :func:`reference.decode_attention_reference`.

    q (B, Tq, Hq, D), caches (Bc, Tmax, Hkv, D), cache_seqlens int (B,) including the Tq new
    tokens, optional cache_batch_idx int (B,).  ``num_splits`` overrides the split count and
    ``config`` the launch configuration (A/B measurements, the tuning sweep).  Forward only.
    """
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode attention needs q (B, Tq, Hq, D) and equal (Bc, Tmax, Hkv, D) "
                         f"caches, got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    check_dtypes_and_heads(q, k_cache, v_cache)
    batch, tq, n_heads, head_dim = q.shape
    n_kv_heads, t_max = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    group = n_heads // n_kv_heads
    real_rows = tq * group
    rows = max(16, triton.next_power_of_2(real_rows))  # tl.dot needs >= 16 rows
    block_d = head_dim_block(head_dim)
    cfg = config or decode_launch(head_dim, q.dtype, q.device, t_max)[0]
    q = q.contiguous()
    # Only the last dim must be dense; batch/time/head strides are passed to the kernel.
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    cache_seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    has_idx = cache_batch_idx is not None
    idx = (cache_batch_idx.to(device=q.device, dtype=torch.int32).contiguous() if has_idx
           else cache_seqlens)  # placeholder pointer, never read
    n_splits = num_splits or decode_num_splits(t_max, batch, n_kv_heads, q.device)
    chunk = triton.cdiv(triton.cdiv(t_max, n_splits), cfg.block_n) * cfg.block_n
    n_splits = triton.cdiv(t_max, chunk)
    direct = n_splits == 1
    if direct:  # no partials: the split kernel writes the output
        m_part = l_part = o_part = out
        part_strides = (0, 0, 0)
    else:
        m_part = torch.empty((batch, n_kv_heads, n_splits, real_rows), device=q.device,
                             dtype=torch.float32)
        l_part = torch.empty_like(m_part)
        o_part = torch.empty((batch, n_kv_heads, n_splits, real_rows, head_dim), device=q.device,
                             dtype=torch.float32)
        part_strides = (m_part.stride(0), m_part.stride(1), m_part.stride(2))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    meta = dict(TQ=tq, GROUP=group, ROWS=rows, HEAD_DIM=head_dim, BLOCK_D=block_d,
                PAD_D=head_dim != block_d)
    run(_decode_split_kernel, (batch, n_kv_heads, n_splits),
        q, k_cache, v_cache, cache_seqlens, idx, m_part, l_part, o_part, out, scale * _LOG2E, chunk,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *part_strides,
        out.stride(0), out.stride(1), out.stride(2), HAS_BATCH_IDX=has_idx, DIRECT=direct,
        DOT_PREC=_dot_precision(q.dtype), **meta, **cfg.meta("attn_decode"))
    if not direct:
        run(_decode_combine_kernel, (batch, n_kv_heads),
            m_part, l_part, o_part, out, cache_seqlens, chunk, *part_strides,
            out.stride(0), out.stride(1), out.stride(2), num_warps=cfg.num_warps, **meta)
    return out


# torch.compile cannot trace into this launcher (its split count and block choice are host-side
# Python, and Inductor's re-compilation of the kernels failed on the H200, see
# benchmarks/results/2026-11-27-NVIDIA-H200.md), so compiled code calls it as one opaque op.
@torch.library.custom_op("fastgpt::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cache_seqlens: torch.Tensor, softmax_scale: Optional[float],
                        cache_batch_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`decode_attention_triton` as a torch custom op (for graphs traced by torch.compile)."""
    return decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale, cache_batch_idx)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, cache_batch_idx):
    return torch.empty_like(q)
