"""Committed launch configurations of the attention kernels (see :mod:`.launch` for the keys).

TABLE is rewritten by ``python benchmarks/gpu_check.py --apply-tune RESULTS.json`` from a GPU
run's ``--tune`` sweep; each entry says where it came from.  Entries whose source starts with
"offline" were chosen without a GPU, from the sm_90 compile report (registers, spills, shared
memory in benchmarks/results/sm90-compile-*.md): no timing stands behind them yet.

OVER_SM90_LIMITS lists the 16-bit tuning candidates ("kernel/head-dim class config") that, under
triton 3.6 or 3.9, need more than 227 KiB of shared memory per block or spill more than 128 B of
registers on sm_90; :func:`.launch.candidates` leaves them out.  Rewritten by
``python benchmarks/sm90_compile.py --write-exclusions`` from the committed compile reports.
"""

OVER_SM90_LIMITS: frozenset[str] = frozenset({
    'attn_bwd_dkdv/d128 64x128 w8 s2',
    'attn_bwd_dkdv/d128 64x128 w8 s4',
    'attn_bwd_dkdv/d128 64x64 w4 s2',
    'attn_bwd_dkdv/d64 64x128 w4 s2',
    'attn_bwd_dkdv/d64 64x128 w4 s3',
    'attn_bwd_dkdv/d64 64x128 w4 s4',
    'attn_bwd_dq/d128 128x128 w8 s3',
    'attn_bwd_dq/d128 128x32 w4 s2',
    'attn_bwd_dq/d128 128x32 w4 s3',
    'attn_bwd_dq/d128 128x32 w4 s4',
    'attn_bwd_dq/d128 128x64 w4 s2',
    'attn_bwd_dq/d128 128x64 w4 s3',
    'attn_bwd_dq/d128 128x64 w4 s4',
    'attn_bwd_dq/d64 128x128 w4 s2',
    'attn_bwd_dq/d64 128x128 w4 s3',
    'attn_bwd_dq/d64 128x128 w4 s4',
    'attn_bwd_fused/d128 64x128 w8 s2',
    'attn_bwd_fused/d128 64x128 w8 s3',
    'attn_bwd_fused/d128 64x128 w8 s4',
    'attn_bwd_fused/d128 64x64 w4 s2',
    'attn_bwd_fused/d128 64x64 w4 s3',
    'attn_bwd_fused/d128 64x64 w4 s4',
    'attn_bwd_fused/d64 32x128 w4 s2',
    'attn_bwd_fused/d64 32x128 w4 s3',
    'attn_bwd_fused/d64 32x128 w4 s4',
    'attn_bwd_fused/d64 64x128 w4 s2',
    'attn_bwd_fused/d64 64x128 w4 s3',
    'attn_bwd_fused/d64 64x128 w4 s4',
    'attn_fwd/d128 128x128 w8 s4',
    'attn_fwd/d128 128x64 w4 s2',
    'attn_fwd/d128 128x64 w4 s3',
    'attn_fwd/d128 128x64 w4 s4',
})

TABLE: dict[str, dict] = {
    'attn_bwd_dkdv/d128/16bit/sm90': {'block_m': 32, 'block_n': 64, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dkdv/d128/fp32/sm90': {'block_m': 16, 'block_n': 32, 'num_warps': 8, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dkdv/d64/16bit/sm90': {'block_m': 32, 'block_n': 128, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dkdv/d64/fp32/sm90': {'block_m': 16, 'block_n': 32, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dq/d128/16bit/sm90': {'block_m': 64, 'block_n': 32, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dq/d128/fp32/sm90': {'block_m': 16, 'block_n': 16, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dq/d64/16bit/sm90': {'block_m': 128, 'block_n': 32, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_dq/d64/fp32/sm90': {'block_m': 32, 'block_n': 16, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_fused/d128/16bit/sm90': {'block_m': 32, 'block_n': 64, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_fused/d128/fp32/sm90': {'block_m': 16, 'block_n': 16, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_fused/d64/16bit/sm90': {'block_m': 32, 'block_n': 128, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_bwd_fused/d64/fp32/sm90': {'block_m': 16, 'block_n': 32, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_decode/d128/16bit/sm90': {'block_m': 0, 'block_n': 64, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_decode/d128/fp32/sm90': {'block_m': 0, 'block_n': 32, 'num_warps': 4, 'num_stages': 2, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_decode/d64/16bit/sm90': {'block_m': 0, 'block_n': 64, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_decode/d64/fp32/sm90': {'block_m': 0, 'block_n': 32, 'num_warps': 4, 'num_stages': 2, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd/d128/16bit/sm90': {'block_m': 128, 'block_n': 64, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd/d128/fp32/sm90': {'block_m': 32, 'block_n': 16, 'num_warps': 8, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd/d64/16bit/sm90': {'block_m': 128, 'block_n': 64, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd/d64/fp32/sm90': {'block_m': 32, 'block_n': 16, 'num_warps': 4, 'num_stages': 1, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd_tma/d128/16bit/sm90': {'block_m': 128, 'block_n': 64, 'num_warps': 8, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
    'attn_fwd_tma/d64/16bit/sm90': {'block_m': 128, 'block_n': 64, 'num_warps': 4, 'num_stages': 3, 'source': 'offline: no heavy spills on sm_90 (benchmarks/results/sm90-compile-*.md), untimed'},
}
