"""Launch configurations of the attention kernels: candidates, limits, and the committed table.

A configuration is block sizes plus ``num_warps`` / ``num_stages``.  Which one a launch uses:

1. Under ``TRITON_INTERPRET=1``: one small fixed configuration per kernel (16-wide tiles), so the
   CPU tests cross several blocks and ragged tails.
2. On a GPU: the committed table (:mod:`.launch_table`), keyed by
   ``kernel / head-dim class / dtype class / GPU arch``, optionally refined by a sequence-length
   bucket (``.../short`` for max_seqlen <= 2048, ``.../long`` above); the backward kernels that
   sum over a GQA group may also have MHA-only entries (``.../mha[/bucket]``), used at group 1,
   while their plain entries must hold at any group.  Head-dim class: ``d64``
   for padded head dims up to 64, ``d128`` up to 128; dtype class: ``16bit`` (fp16 and bf16) or
   ``fp32``; arch: ``sm90`` for an H100/H200.  ``gpu_check.py --tune`` measures a grid on a GPU
   and ``gpu_check.py --apply-tune RESULTS.json`` rewrites the table from it.
3. Fallback, for a GPU / dtype / head dim the table lacks: ``triton.autotune`` over
   :func:`candidates` (the grid less what sm_90 cannot hold), keyed by head dim, dtype,
   causality, GQA group and the sequence-length bucket, with results cached on disk across
   processes (``cache_results``).  Its first call per key costs one compile and a few timed runs
   per candidate.

Every kernel launch of the package goes through :func:`run`, so that :func:`recording` can collect
the launches a call would make instead of making them: benchmarks/sm90_compile.py compiles
exactly those for sm_90 on a machine without a GPU.

Causal masking relies on BLOCK_M % BLOCK_N == 0 for the forward and dQ kernels and
BLOCK_N % BLOCK_M == 0 for the dK/dV and fused backward kernels: a block's diagonal then falls
inside exactly the blocks the kernels mask.  :func:`candidates` only yields such pairs.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from dataclasses import dataclass
from typing import Iterator

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNELS = ("attn_fwd", "attn_fwd_tma", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused", "attn_decode")
SHORT_SEQ = 2048  # the "short" / "long" sequence bucket boundary


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per tile (decode: unused, 0)
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def blocks(self, kernel: str) -> dict:
        """The kernel's block-size constexprs."""
        if kernel == "attn_decode":
            return {"BLOCK_N": self.block_n}
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}

    def meta(self, kernel: str) -> dict:
        """Keyword arguments of the kernel launch."""
        return {**self.blocks(kernel), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        tile = f"{self.block_n}" if self.block_m == 0 else f"{self.block_m}x{self.block_n}"
        return f"{tile} w{self.num_warps} s{self.num_stages}"


def head_dim_block(head_dim: int) -> int:
    """The padded (power-of-two, >= 16) head dim the kernels tile over."""
    return max(16, 1 << (head_dim - 1).bit_length())


def head_dim_class(block_d: int) -> str:
    return "d64" if block_d <= 64 else "d128"


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def seq_bucket(max_seqlen: int) -> str:
    return "short" if max_seqlen <= SHORT_SEQ else "long"


# Kernels whose registers grow with the GQA group (they sum dK/dV over the group's query heads):
# a configuration fast at group 1 may spill at group 4, so the table can hold MHA-only entries.
GQA_SENSITIVE = frozenset({"attn_bwd_dkdv", "attn_bwd_fused"})


def table_key(kernel: str, block_d: int, dtype: torch.dtype, arch: str, bucket: str | None = None,
              *, mha: bool = False) -> str:
    key = f"{kernel}/{head_dim_class(block_d)}/{dtype_class(dtype)}/{arch}" + ("/mha" if mha else "")
    return f"{key}/{bucket}" if bucket else key


@functools.lru_cache(maxsize=None)
def gpu_arch(index: int = 0) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


# Fixed configurations under the interpreter: small tiles, one warp (it ignores warps/stages).
_INTERPRETER = {
    "attn_fwd": LaunchConfig(16, 16, 1, 1), "attn_fwd_tma": LaunchConfig(16, 16, 1, 1),
    "attn_bwd_dkdv": LaunchConfig(16, 32, 1, 1), "attn_bwd_dq": LaunchConfig(32, 16, 1, 1),
    "attn_bwd_fused": LaunchConfig(16, 32, 1, 1), "attn_decode": LaunchConfig(0, 16, 1, 1),
}


def candidates(kernel: str, block_d: int, dtype: torch.dtype, *, exclude: bool = True,
               gqa: bool = True) -> list[LaunchConfig]:
    """The grid the autotune fallback and ``--tune`` choose from.  16-bit: block pairs x warps x
    stages, without the ones the offline sm_90 compile reports found over the limits
    (``launch_table.OVER_SM90_LIMITS``; ``exclude=False`` keeps them, for that report).  With
    ``gqa=False`` (the sweep, which times group 1) the ones over the limits only at a GQA group
    (tagged `` gqa`` there) stay in."""
    rows_major = kernel in ("attn_fwd", "attn_fwd_tma", "attn_bwd_dq")  # BLOCK_M % BLOCK_N == 0
    if kernel == "attn_decode":
        grid = [LaunchConfig(0, n, w, s) for n, w, s in itertools.product((32, 64, 128), (2, 4, 8), (2, 3))]
    elif dtype == torch.float32:
        # ieee fp32 dots run on the FMA units with their operands in registers: 16-32 row tiles
        # only (the sm_90 compile report shows kilobytes of spills from 32 x 32 up).
        pairs = [(16, 16), (32, 16)] if rows_major else [(16, 16), (16, 32)]
        return [LaunchConfig(m, n, w, s) for (m, n), w, s in itertools.product(pairs, (4, 8), (1, 2))]
    else:
        if rows_major:
            pairs = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)]
        else:  # dK/dV-style: one program per key block, BLOCK_N % BLOCK_M == 0
            pairs = [(32, 64), (32, 128), (64, 64), (64, 128), (16, 128)]
        grid = [LaunchConfig(m, n, w, s) for (m, n), w, s in itertools.product(pairs, (4, 8), (2, 3, 4))]
    if not exclude:
        return grid
    from .launch_table import OVER_SM90_LIMITS
    name = f"{kernel}/{head_dim_class(block_d)}"
    return [c for c in grid if f"{name} {c}" not in OVER_SM90_LIMITS
            and not (gqa and f"{name} {c} gqa" in OVER_SM90_LIMITS)]


def lookup(kernel: str, block_d: int, dtype: torch.dtype, device: torch.device,
           max_seqlen: int, group: int = 1) -> tuple[LaunchConfig | None, str]:
    """(configuration, where it came from) for one launch; (None, "autotune") when the table has
    no entry for this GPU and the caller should autotune.  Without GQA (``group`` 1) a
    GQA-sensitive kernel first looks for its MHA-only entries (``.../mha[/bucket]``)."""
    if INTERPRET or device.type != "cuda":
        return _INTERPRETER[kernel], "interpreter"
    from .launch_table import TABLE
    arch = gpu_arch(device.index or 0)
    bucket = seq_bucket(max_seqlen)
    keys = [table_key(kernel, block_d, dtype, arch, bucket), table_key(kernel, block_d, dtype, arch)]
    if group == 1 and kernel in GQA_SENSITIVE:
        keys = [table_key(kernel, block_d, dtype, arch, bucket, mha=True),
                table_key(kernel, block_d, dtype, arch, mha=True)] + keys
    for key in keys:
        entry = TABLE.get(key)
        if entry is not None:
            cfg = LaunchConfig(entry["block_m"], entry["block_n"], entry["num_warps"], entry["num_stages"])
            return cfg, f"table {key} ({entry['source']})"
    return None, "autotune"


_recorded: list | None = None


def run(kernel, grid, *args, **kwargs) -> None:
    """Launch a ``@triton.jit`` kernel on ``grid`` -- or, inside :func:`recording`, only note the
    launch (kernel, args, kwargs)."""
    if _recorded is not None:
        _recorded.append((kernel, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """``with recording() as launches:`` -- kernel wrappers called inside launch nothing (their
    outputs stay uninitialised) and ``launches`` lists what they would have launched."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
