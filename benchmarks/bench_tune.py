"""gpu_check section "tune" (``--tune``): time every launch-configuration candidate of the
attention kernels at the benchmark shapes, and turn a run's results into the committed table.

Grid: :func:`fastgpt.kernels.launch.candidates` (block sizes x warps x stages, less the tiles that
spill or overflow shared memory on sm_90) for the forward, the TMA forward, the dK/dV and dQ
kernels, the fused atomic-dQ backward and the decode kernel; head dims 64 and 128, bf16, causal,
16k tokens per launch (B = 16384 // S, H = 2048 // hd): every candidate at S = 8192 ("long"
bucket), the 4 fastest of each head dim again at S = 1024 ("short"); decode with H = 2048 // hd
heads, batch 8 with 8192 cached tokens (long) and batch 64 with 1024 (short).  A backward kernel
is timed inside the whole backward (the other backward kernels at their table configuration),
so its rows compare configurations of that one kernel.

Compilation dominates a sweep, so kernel by kernel, every candidate is first compiled in parallel
worker processes (each launches it once; Triton's on-disk cache then serves the timing process),
then timed one by one: median of >= 20 CUDA-event-timed runs with the L2 flushed.  A sweep cut
by its time slice keeps the kernels it finished (most important first: forward, dK/dV, dQ,
decode, fused backward, TMA forward).

    python benchmarks/gpu_check.py --tune                # benchmarks, then this sweep
    python benchmarks/gpu_check.py --only tune
    python benchmarks/gpu_check.py --apply-tune benchmarks/results/<date>-<gpu>.json

``--apply-tune`` rewrites ``kernels/launch_table.py``'s TABLE (:mod:`table_file`): per (kernel, head-dim class, dtype class,
arch, bucket) the fastest measured configuration, plus a bucket-free entry for the configuration
with the best summed time relative to each bucket's best; entries it did not measure stay.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import table_file  # noqa: E402
from measure import Plan, error_text, time_ms  # noqa: E402

# Swept in this order (a sweep cut by its slice keeps the kernels it finished).
KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_decode", "attn_bwd_fused", "attn_fwd_tma")
# Every candidate is timed in the first bucket; the next buckets time the ``finalists`` fastest.
GPU_GRID = dict(head_dims=(64, 128), seqlens={"long": 8192, "short": 1024}, tokens=16384,
                model_dim=2048, dtype="bfloat16", decode={"long": (8, 8192), "short": (64, 1024)},
                finalists=4)
REHEARSAL_GRID = dict(head_dims=(16,), seqlens={"long": 40, "short": 16}, tokens=80, model_dim=32,
                      dtype="float32", decode={"long": (2, 40), "short": (2, 16)}, per_kernel=2,
                      finalists=1)


def _tasks(grid: dict, kernel: str, bucket: str, fields: list[tuple] | None = None) -> list[tuple]:
    """(kernel, head_dim, bucket, config fields) for the candidates of ``kernel`` to time in
    ``bucket``: all of them, or per head dim only those in ``fields`` {head_dim: [fields]}."""
    from fastgpt.kernels.launch import candidates
    dtype = getattr(torch, grid["dtype"])
    tasks = []
    for hd in grid["head_dims"]:
        cands = [(c.block_m, c.block_n, c.num_warps, c.num_stages)
                 for c in candidates(kernel, hd, dtype, gqa=False)[:grid.get("per_kernel")]]
        tasks += [(kernel, hd, bucket, f) for f in cands if fields is None or f in fields.get(hd, ())]
    return tasks


def _runner(task: tuple, grid: dict, device: str) -> tuple[Callable[[], object], float]:
    """(a call of the task's kernel with its candidate configuration, its FLOPs or bytes)."""
    from fastgpt.kernels.launch import LaunchConfig
    from fastgpt.kernels.triton_attention import _flash_bwd, _flash_fwd
    from fastgpt.kernels.triton_decode import decode_attention_triton
    kernel, hd, bucket, fields = task
    cfg = LaunchConfig(*fields)
    dtype = getattr(torch, grid["dtype"])
    heads = max(1, grid["model_dim"] // hd)
    gen = torch.Generator(device=device).manual_seed(0)
    if kernel == "attn_decode":
        batch, context = grid["decode"][bucket]
        q = torch.randn(batch, 1, heads, hd, device=device, generator=gen).to(dtype)
        kc, vc = (torch.randn(batch, context, heads, hd, device=device, generator=gen).to(dtype)
                  for _ in range(2))
        lengths = torch.full((batch,), context, device=device, dtype=torch.int32)
        return (lambda: decode_attention_triton(q, kc, vc, lengths, config=cfg),
                2 * batch * context * heads * hd * kc.element_size())
    seqlen = grid["seqlens"][bucket]
    n = grid["tokens"]
    q, k, v, dout = (torch.randn(n, heads, hd, device=device, generator=gen).to(dtype) for _ in range(4))
    cu = torch.arange(0, n + 1, seqlen, device=device, dtype=torch.int32)
    scale = hd ** -0.5
    fwd_flops = 2.0 * (n // seqlen) * seqlen**2 * heads * hd  # causal: 4 B S^2 H D / 2
    if kernel in ("attn_fwd", "attn_fwd_tma"):
        return (lambda: _flash_fwd(q, k, v, cu, seqlen, True, scale, kernel == "attn_fwd_tma",
                                   {kernel: cfg}), fwd_flops)
    out, lse = _flash_fwd(q, k, v, cu, seqlen, True, scale)
    return (lambda: _flash_bwd(dout, q, k, v, out, lse, cu, seqlen, True, scale,
                               kernel != "attn_bwd_fused", {kernel: cfg}), 2.5 * fwd_flops)


def _compile_one(task: tuple, grid: dict, device: str) -> float:
    """Worker: launch the candidate once (its compile lands in Triton's on-disk cache)."""
    t0 = time.perf_counter()
    run, _ = _runner(task, grid, device)
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def precompile(pool, tasks: list[tuple], grid: dict, device: str) -> dict[tuple, str]:
    """Compile ``tasks`` in the worker pool; {task: error} for the ones that failed."""
    failures: dict[tuple, str] = {}
    futures = {pool.submit(_compile_one, t, grid, device): t for t in tasks}
    for fut in concurrent.futures.as_completed(futures):
        try:
            fut.result()
        except Exception as exc:  # an over-full config fails here: record it, time the rest
            failures[futures[fut]] = error_text(exc)
    return failures


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    grid = REHEARSAL_GRID if plan.rehearse else GPU_GRID
    workers = 1 if plan.rehearse else min(8, os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for kernel in KERNELS:
            finalists = None
            for i, bucket in enumerate(grid["seqlens"]):
                tasks = _tasks(grid, kernel, bucket, finalists)
                t0 = time.time()
                failures = precompile(pool, tasks, grid, plan.device.type)
                yield {"kernel": kernel, "bucket": bucket, "config": f"(compile {len(tasks)} candidates)",
                       "workers": workers, "seconds": time.time() - t0, "failed": len(failures)}
                rows = []
                for row in _timed_rows(plan, grid, tasks, failures):
                    rows.append(row)
                    yield row
                if i == 0:  # the next buckets time the fastest few only
                    finalists = {}
                    for r in sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"]):
                        if len(finalists.setdefault(r["head_dim"], [])) < grid["finalists"]:
                            finalists[r["head_dim"]].append(tuple(r["fields"]))


def _timed_rows(plan: Plan, grid: dict, tasks: list[tuple], failures: dict) -> Iterator[dict]:
    from fastgpt.kernels.launch import LaunchConfig
    device = plan.device.type
    for task in tasks:
        kernel, hd, bucket, fields = task
        row = {"kernel": kernel, "head_dim": hd, "dtype": grid["dtype"], "bucket": bucket,
               "seqlen": grid["seqlens"][bucket] if kernel != "attn_decode" else grid["decode"][bucket][1],
               "config": str(LaunchConfig(*fields)), "fields": list(fields)}
        if task in failures:
            yield {**row, "error": failures[task]}
            continue
        try:
            run, work = _runner(task, grid, device)
            t = time_ms(run, device, **plan.timing(), flush_l2=True)
            row.update(ms=t["ms"], runs=t["runs"])
            if kernel == "attn_decode":
                row["kv_gbs"] = work / (t["ms"] * 1e-3) / 1e9
            else:
                row["tflops"] = work / (t["ms"] * 1e-3) / 1e12
        except Exception as exc:
            row["error"] = error_text(exc)
        if plan.rehearse:
            row["note"] = "rehearsal: interpreter, fp32, two candidates per kernel"
        yield row


# ------------------------------------------------------------------------- --apply-tune
def best_entries(rows: list[dict], arch: str, source: str, exclude: frozenset[str] = frozenset()
                 ) -> dict[str, dict]:
    """Table entries from a sweep's rows: the fastest candidate per bucket, and per kernel the
    candidate with the least summed time relative to each bucket's fastest.  Candidates in
    ``exclude`` (the offline compile's OVER_SM90_LIMITS: "kernel/d64 64x64 w4 s3", or with a
    trailing " gqa" when only a GQA group is over) are left out; for the GQA-sensitive kernels
    the ones over only at a GQA group may still make their MHA-only entries (``.../mha``)."""
    from fastgpt.kernels.launch import GQA_SENSITIVE, LaunchConfig, head_dim_class

    def name(r: dict) -> str:
        return f"{r['kernel']}/{head_dim_class(r['head_dim'])} {LaunchConfig(*r['fields'])}"

    timed = [r for r in rows if "ms" in r and "fields" in r and name(r) not in exclude]
    entries = _best_of([r for r in timed if f"{name(r)} gqa" not in exclude], arch, source, mha=False)
    mha = _best_of([r for r in timed if r["kernel"] in GQA_SENSITIVE], arch, source, mha=True)
    # an MHA-only entry is only worth its key where it differs from the entry for every group
    for key, entry in mha.items():
        plain = entries.get(key.replace("/mha", ""))
        if plain is None or _fields(plain) != _fields(entry):
            entries[key] = entry
    return entries


def _fields(entry: dict) -> tuple:
    return entry["block_m"], entry["block_n"], entry["num_warps"], entry["num_stages"]


def _best_of(timed: list[dict], arch: str, source: str, mha: bool) -> dict[str, dict]:
    from fastgpt.kernels.launch import table_key
    groups: dict[tuple, list[dict]] = {}
    for r in timed:
        groups.setdefault((r["kernel"], r["head_dim"], r["dtype"]), []).append(r)
    entries = {}
    for (kernel, hd, dtype_name), group in groups.items():
        dtype = getattr(torch, dtype_name)
        fastest = {}
        for r in group:
            if r["bucket"] not in fastest or r["ms"] < fastest[r["bucket"]]["ms"]:
                fastest[r["bucket"]] = r
        for bucket, r in fastest.items():
            entries[table_key(kernel, hd, dtype, arch, bucket, mha=mha)] = _entry(
                r["fields"], f"{source}: {r['ms']:.4g} ms at S={r['seqlen']}")
        score: dict[tuple, float] = {}
        for r in group:
            score[tuple(r["fields"])] = score.get(tuple(r["fields"]), 0.0) + r["ms"] / fastest[r["bucket"]]["ms"]
        complete = {f: s for f, s in score.items()
                    if sum(tuple(r["fields"]) == f for r in group) == len(fastest)}
        if complete:
            best = min(complete, key=complete.get)
            entries[table_key(kernel, hd, dtype, arch, mha=mha)] = _entry(
                list(best), f"{source}: {complete[best] / len(fastest):.3f}x the per-bucket best on average")
    return entries


def _entry(fields: list[int], source: str) -> dict:
    block_m, block_n, warps, stages = fields
    return {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages,
            "source": source}


def apply_tune(results_json: Path, table_path: Path = table_file.TABLE_PATH) -> str:
    """Merge a ``--tune`` run's best configurations into ``kernels/launch_table.py``."""
    data = json.loads(Path(results_json).read_text())
    env = data["environment"]
    rows = data["sections"].get("tune", {}).get("rows", [])
    if "capability" not in env:
        raise SystemExit(f"{results_json}: not a GPU run (a rehearsal's timings would not mean anything)")
    arch = "sm" + env["capability"].replace(".", "")
    source = f"measured {env['date'][:10]} on {env['gpu']} (triton {env['triton']})"
    table, over = table_file.load(table_path)
    new = best_entries(rows, arch, source, over)
    if not new:
        raise SystemExit(f"{results_json}: no timed tune rows")
    table = {**table, **new}
    table_file.write(table, path=table_path)
    return f"{table_path}: {len(new)} entries from {results_json} ({len(table)} in all)"


def test_best_entries_pick_the_fastest_per_bucket():
    rows = [{"kernel": "attn_fwd", "head_dim": 64, "dtype": "bfloat16", "bucket": b, "seqlen": s,
             "fields": list(f), "ms": ms}
            for b, s, f, ms in (("short", 1024, (128, 64, 4, 3), 1.0), ("short", 1024, (64, 64, 4, 2), 0.9),
                                ("long", 8192, (128, 64, 4, 3), 5.0), ("long", 8192, (64, 64, 4, 2), 6.0))]
    entries = best_entries(rows, "sm90", "test")
    assert entries["attn_fwd/d64/16bit/sm90/short"]["block_m"] == 64
    assert entries["attn_fwd/d64/16bit/sm90/long"]["block_m"] == 128
    # summed relative time: (128,64): 1/0.9 + 1 = 2.11; (64,64): 1 + 6/5 = 2.2
    assert entries["attn_fwd/d64/16bit/sm90"]["block_m"] == 128
    entries = best_entries(rows, "sm90", "test", exclude=frozenset({"attn_fwd/d64 64x64 w4 s2"}))
    assert entries["attn_fwd/d64/16bit/sm90/short"]["block_m"] == 128  # the faster one is excluded


def test_best_entries_keep_mha_only_picks_apart():
    """A backward configuration over the limits only at a GQA group may make the MHA-only entry,
    never the entry that holds at any group."""
    rows = [{"kernel": "attn_bwd_fused", "head_dim": 64, "dtype": "bfloat16", "bucket": "long", "seqlen": 8192,
             "fields": list(f), "ms": ms} for f, ms in (((64, 64, 4, 3), 5.0), ((64, 128, 8, 2), 5.5))]
    entries = best_entries(rows, "sm90", "test", exclude=frozenset({"attn_bwd_fused/d64 64x64 w4 s3 gqa"}))
    assert entries["attn_bwd_fused/d64/16bit/sm90/long"]["block_n"] == 128
    assert entries["attn_bwd_fused/d64/16bit/sm90/mha/long"]["block_n"] == 64
    same = best_entries(rows, "sm90", "test")  # nothing excluded: no separate MHA entry
    assert not [k for k in same if "/mha" in k]


def test_table_file_round_trips(tmp_path):
    from fastgpt.kernels.launch_table import OVER_SM90_LIMITS, TABLE
    path = tmp_path / "launch_table.py"
    path.write_text(table_file.TABLE_PATH.read_text())
    table_file.write({**TABLE, "attn_fwd/d64/16bit/sm80": _entry([64, 64, 4, 2], "test")}, path=path)
    table_file.write(over=OVER_SM90_LIMITS | {"attn_fwd/d64 64x64 w4 s2"}, path=path)
    table, over = table_file.load(path)
    assert table["attn_fwd/d64/16bit/sm80"]["num_stages"] == 2 and len(table) == len(TABLE) + 1
    assert over == OVER_SM90_LIMITS | {"attn_fwd/d64 64x64 w4 s2"}
    assert path.read_text().startswith('"""Committed launch configurations')


def test_apply_tune_merges_a_gpu_run_into_a_table_copy(tmp_path):
    path = tmp_path / "launch_table.py"
    path.write_text(table_file.TABLE_PATH.read_text())
    rows = [{"kernel": "attn_decode", "head_dim": 128, "dtype": "bfloat16", "bucket": "long", "seqlen": 8192,
             "fields": [0, 128, 8, 2], "ms": 0.5}]
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"environment": {"capability": "9.0", "date": "2026-12-01T00:00:00",
                                                   "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0"},
                                   "sections": {"tune": {"rows": rows}}}))
    assert "2 entries" in apply_tune(results, path)
    table, _ = table_file.load(path)
    assert table["attn_decode/d128/16bit/sm90/long"]["block_n"] == 128
    assert table["attn_decode/d128/16bit/sm90"]["source"].startswith("measured 2026-12-01 on NVIDIA H100")


def test_merge_calls_replaces_rerun_sections(tmp_path):
    """gpu_check --merge: a later call's section replaces the first call's, with a note."""
    from gpu_check import merge_calls
    env = {"date": "2026-11-27T10:00:00+00:00", "mode": "gpu", "gpu": "NVIDIA H200", "torch": "2.11",
           "triton": "3.6.0", "cuda": "13.0"}
    first = {"environment": env, "sections": {
        "ppo": {"status": "cut", "rows": [], "slice_s": 25},
        "dpo": {"status": "ok", "rows": [{"impl": "fastgpt", "ms": 53.0}], "slice_s": 15}}}
    later = {"environment": {**env, "date": "2026-11-27T10:05:00+00:00"}, "sections": {
        "ppo": {"status": "ok", "rows": [{"impl": "fastgpt", "seconds": 1.4}], "slice_s": 60}}}
    paths = []
    for i, data in enumerate((first, later)):
        paths.append(tmp_path / f"call{i}.json")
        paths[-1].write_text(json.dumps(data))
    merge_calls(paths, tmp_path / "out")
    merged = json.loads((tmp_path / "out" / "2026-11-27-NVIDIA-H200.json").read_text())
    assert merged["sections"]["ppo"]["rows"] == [{"impl": "fastgpt", "seconds": 1.4}]
    assert "replaces call 1's cut section (0 rows, 25 s slice)" in merged["sections"]["ppo"]["note"]
    assert merged["sections"]["dpo"] == first["sections"]["dpo"]
    assert merged["reruns"] == [later["environment"]]
    assert "## ppo: ok" in (tmp_path / "out" / "2026-11-27-NVIDIA-H200.md").read_text()
