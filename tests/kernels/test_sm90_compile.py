"""The kernels compile for sm_90 (H100 / H200) within its limits -- checked without a GPU.

A fast subset of ``benchmarks/sm90_compile.py``: the committed 16-bit launch configurations of
every attention kernel and the cross-entropy kernel, compiled with ``triton.compile`` for
sm_90a in a subprocess (the interpreter this folder runs under would replace the kernels), each
within 227 KiB of shared memory and without heavy register spills.  Skipped where the installed
Triton cannot compile for CUDA offline.  The committed full reports (both Triton versions) are
checked too: no table entry over the limits, and no tuning candidate over them left unpruned.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
REPORTS = sorted((ROOT / "benchmarks" / "results").glob("sm90-compile-triton*.json"))


@pytest.mark.slow  # ~30 s of ptxas; CI runs it, the GPU script's correctness step does not
def test_committed_configs_compile_for_sm90_within_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/sm90_compile.py", "--subset", "fast", "--check"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "attn_bwd_fused" in proc.stdout and "cross_entropy" in proc.stdout


@pytest.mark.parametrize("report", REPORTS, ids=lambda p: p.stem)
def test_full_report_agrees_with_the_table_and_the_candidates(report):
    from fastgpt.kernels.launch import candidates
    rows = json.loads(report.read_text())["rows"]
    assert rows, f"{report} is empty"
    over = [r for r in rows if r["verdict"].startswith("over")]
    assert not [r for r in over if r["plan"] != "tune"], "a committed configuration is over the limits"
    offered = set()  # in the report's "what" format: "<kernel> hd<d> bf16 <LaunchConfig>"
    for kernel in ("attn_fwd", "attn_fwd_tma", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused", "attn_decode"):
        for hd in (64, 128):
            offered |= {f"{kernel} hd{hd} bf16 {c}" for c in candidates(kernel, hd, torch.bfloat16)}
    # tune rows name the GQA group ("... bf16 g4 64x64 w4 s3") since the backward kernels are
    # compiled at groups 1 and 4; a configuration over the limits at either must not be offered
    names = {re.sub(r" bf16 g\d+ ", " bf16 ", r["what"].split(" [")[0]) for r in over}
    still_offered = sorted(names & offered)
    assert not still_offered, (f"candidates over the sm_90 limits still offered (run benchmarks/sm90_compile.py "
                               f"--write-exclusions): {still_offered}")
