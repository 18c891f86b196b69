"""Compile every fastgpt Triton kernel, at every configuration the benchmarks, the tuning sweep
and training launch on an H100/H200, for sm_90 -- on a machine without a GPU.

How: the kernel wrappers are called on CPU tensors inside :func:`fastgpt.kernels.launch.recording`,
which collects the launches they would make; each is compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (sm_90a, the ptxas inside the triton wheel), specialised exactly as
the JIT would specialise it.  Reported per kernel and configuration: registers per thread, spill
stores / loads and stack bytes (ptxas), shared memory per block (Triton's metadata), compile
seconds, and a verdict against the H100's limits: at most 227 KiB of shared memory per block, and
no heavy spills (more than ``SPILL_LIMIT`` bytes of spill stores per thread).

    python benchmarks/sm90_compile.py                 # everything -> benchmarks/results/sm90-compile-triton<v>.{json,md}
    python benchmarks/sm90_compile.py --subset fast --check   # what CI runs (tests/kernels/test_sm90_compile.py)

Plans: ``table`` -- every entry of kernels/launch_table.py at its head dims (64 / 128, and 80 for
the padded path) and dtypes, causal, GQA groups 1 and 4 for bf16; ``tune`` -- every candidate of
kernels/launch.py's grid that ``gpu_check.py --tune`` times (bf16, hd 64 / 128; the backward
kernels that sum over a GQA group at groups 1 and 4, since the sweep times group 1); ``losses`` --
the cross-entropy and log-prob kernels at V = 128256 (BLOCK_V 4096) with each option flag.
Exit status with ``--check``: 1 if a table or loss configuration is over the limits; 3 if this
triton cannot compile for sm_90 offline (no CUDA backend).  Tune candidates over the limits are
listed in the report; ``--write-exclusions`` collects them from every committed report (both
triton versions) into ``kernels/launch_table.py``'s OVER_SM90_LIMITS, which
``launch.candidates`` leaves out.  The full run always compiles the whole grid.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Iterator

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("sm90_compile: unset TRITON_INTERPRET (the interpreter replaces the kernels it compiles)")

import torch  # noqa: E402
import triton  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED_LIMIT = 227 * 1024  # bytes per block, H100 / H200
SPILL_LIMIT = 128          # bytes of spill stores per thread tolerated ("no heavy spills")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


# ------------------------------------------------------------------------------ launches
def attention_launches(kernel: str, head_dim: int, dtype: torch.dtype, cfg, group: int = 1,
                       causal: bool = True) -> list[tuple]:
    """The launches one attention kernel makes for one configuration (CPU tensors, recorded)."""
    from fastgpt.kernels.launch import recording
    from fastgpt.kernels.triton_attention import _flash_bwd, _flash_fwd
    from fastgpt.kernels.triton_decode import decode_attention_triton
    heads = 2048 // max(64, head_dim)
    kv_heads = heads // group
    if kernel == "attn_decode":
        q = torch.empty(64, 1, heads, head_dim, dtype=dtype)
        cache = torch.empty(64, 1024, kv_heads, head_dim, dtype=dtype)
        lengths = torch.full((64,), 1024, dtype=torch.int32)
        with recording() as launches:
            decode_attention_triton(q, cache, cache, lengths, config=cfg, num_splits=1)
            decode_attention_triton(q, cache, cache, lengths, config=cfg, num_splits=4)
        return launches
    n = 4096
    q, out, dout = (torch.empty(n, heads, head_dim, dtype=dtype) for _ in range(3))
    k, v = (torch.empty(n, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    lse = torch.empty(heads, n)
    cu = torch.tensor([0, 1000, n], dtype=torch.int32)
    with recording() as launches:
        if kernel in ("attn_fwd", "attn_fwd_tma"):
            _flash_fwd(q, k, v, cu, 3096, causal, 0.1, kernel == "attn_fwd_tma", {kernel: cfg})
        else:
            _flash_bwd(dout, q, k, v, out, lse, cu, 3096, causal, 0.1, kernel != "attn_bwd_fused",
                       {kernel: cfg})
    # the backward records the preprocess kernel too, and the dQ / dK-dV kernel not under test
    name = {"attn_bwd_dkdv": "_attn_bwd_kv_kernel", "attn_bwd_fused": "_attn_bwd_kv_kernel",
            "attn_bwd_dq": "_attn_bwd_dq_kernel"}.get(kernel)
    return [launch for launch in launches if name is None or launch[0].__name__ == name]


def loss_launches(dtype: torch.dtype, options: dict, op: str) -> list[tuple]:
    from fastgpt.kernels.launch import recording
    from fastgpt.kernels.triton_cross_entropy import cross_entropy_triton
    from fastgpt.kernels.triton_logprobs import linear_logprobs_triton
    n, d, v = 64, 64, 128256
    with recording() as launches:
        if op == "cross_entropy":
            logits = torch.empty(n, v, dtype=dtype, requires_grad=options.pop("grad"))
            cross_entropy_triton(logits, torch.zeros(n, dtype=torch.long), **options)
        else:
            h = torch.empty(n, d, dtype=dtype, requires_grad=True)
            w = torch.empty(v, d, dtype=dtype, requires_grad=True)
            lp, ent = linear_logprobs_triton(h, w, torch.zeros(n, dtype=torch.long))
    if op == "logprobs":  # the backward's launch: record it by running the backward
        with recording() as back:
            torch.autograd.grad(lp.sum() + ent.sum(), (h, w), allow_unused=True)
        launches += back
    return launches


def plans(subset: str, kernels: tuple[str, ...] | None = None) -> Iterator[tuple[str, str, list[tuple]]]:
    """(plan, description, launches) for every configuration to compile (of ``kernels`` only,
    if given: attention kernel names, or "losses")."""
    from fastgpt.kernels.launch import GQA_SENSITIVE, LaunchConfig, candidates, head_dim_block, table_key
    from fastgpt.kernels.launch_table import TABLE
    fast = subset == "fast"
    for key, entry in sorted(TABLE.items()):
        kernel, d_class, dtype_class, arch, *rest = key.split("/")
        mha = "mha" in rest  # an MHA-only entry: checked at group 1 only
        bucket = [part for part in rest if part != "mha"]
        if arch != "sm90" or (kernels and kernel not in kernels):
            continue
        cfg = LaunchConfig(entry["block_m"], entry["block_n"], entry["num_warps"], entry["num_stages"])
        head_dims = (64,) if d_class == "d64" else (128, 80)
        dtypes = ("bf16",) if dtype_class == "16bit" else ("fp32",)
        if fast and (dtype_class != "16bit" or bucket):
            continue
        for hd in head_dims[:1] if fast else head_dims:
            if kernel == "attn_fwd_tma" and head_dim_block(hd) != hd:
                continue  # TMA runs unpadded head dims only
            for dt_name in dtypes:
                # A GQA group loop adds registers to the kernels that sum over it (dK/dV):
                # the fast subset checks those at group 4 too.
                gqa = kernel in GQA_SENSITIVE or not fast
                groups = (1, 4) if dt_name == "bf16" and gqa and kernel != "attn_decode" and not mha else (1,)
                for group in groups:
                    yield ("table", f"{kernel} hd{hd} {dt_name} g{group} [{key}] {cfg}",
                           attention_launches(kernel, hd, DTYPES[dt_name], cfg, group))
    if not fast:
        for kernel in ("attn_fwd", "attn_fwd_tma", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused",
                       "attn_decode"):
            if kernels and kernel not in kernels:
                continue
            # the kernels that loop over a GQA group are checked at group 4 too: the sweep times
            # group 1, and a configuration it picks must not spill where training uses GQA
            groups = (1, 4) if kernel in GQA_SENSITIVE else (1,)
            for hd in (64, 128):
                for cfg in candidates(kernel, hd, torch.bfloat16, exclude=False):
                    for group in groups:
                        yield ("tune", f"{kernel} hd{hd} bf16 g{group} {cfg} "
                                       f"[{table_key(kernel, hd, torch.bfloat16, 'sm90')}]",
                               attention_launches(kernel, hd, torch.bfloat16, cfg, group))
    if kernels and "losses" not in kernels:
        return
    loss_options = [{"grad": True}] if fast else [
        {"grad": True}, {"grad": False}, {"grad": True, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}]
    for dt_name in ("bf16",) if fast else ("bf16", "fp32"):
        for options in loss_options:
            yield ("losses", f"cross_entropy {dt_name} {options}", loss_launches(DTYPES[dt_name], dict(options), "cross_entropy"))
        if not fast:
            yield ("losses", f"linear_logprobs {dt_name} fwd+bwd", loss_launches(DTYPES[dt_name], {}, "logprobs"))


# ------------------------------------------------------------------------------ compiling
_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def jit_function(fn):
    """The JITFunction under an Autotuner (a JITFunction's own ``.fn`` is the Python function)."""
    while not hasattr(fn, "params"):
        fn = fn.fn
    return fn


def compile_launch(fn, args: tuple, kwargs: dict) -> dict:
    """Compile one recorded launch for sm_90 exactly as the JIT would specialise it."""
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = jit_function(fn)
    backend = make_backend(target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target(),
                                  options=options.__dict__)
    seconds = time.perf_counter() - t0
    spills = _PTXAS.search(log.getvalue())
    regs = _REGS.search(log.getvalue())
    stack, stores, loads = (int(x) for x in spills.groups()) if spills else (None, None, None)
    return {"kernel": fn.__name__, "warps": options.num_warps, "stages": options.num_stages,
            "registers": int(regs.group(1)) if regs else None, "spill_stores": stores,
            "spill_loads": loads, "stack": stack, "shared_bytes": compiled.metadata.shared,
            "compile_s": round(seconds, 2)}


def verdict(row: dict) -> str:
    if row["shared_bytes"] > SHARED_LIMIT:
        return f"over: {row['shared_bytes'] / 1024:.0f} KiB shared > 227 KiB"
    if row["spill_stores"] is None:
        return "unknown: no ptxas report"
    if row["spill_stores"] > SPILL_LIMIT:
        return f"over: {row['spill_stores']} B spill stores > {SPILL_LIMIT}"
    return "ok" if row["spill_stores"] == 0 else f"ok ({row['spill_stores']} B spilled)"


def compile_plans(subset: str, kernels: tuple[str, ...] | None = None) -> Iterator[dict]:
    triton.knobs.nvidia.dump_ptxas_log = True      # ptxas's -v report goes to stdout
    triton.knobs.compilation.always_compile = True  # no cache hit may skip the report
    for plan, description, launches in plans(subset, kernels):
        seen = set()
        for fn, args, kwargs in launches:
            name = jit_function(fn).__name__
            key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            row = {"plan": plan, "what": description}
            try:
                row.update(compile_launch(fn, args, kwargs))
                row["verdict"] = verdict(row)
            except Exception as exc:  # a config Triton itself rejects (e.g. out of resources)
                row.update(kernel=name, verdict=f"over: {type(exc).__name__}: {str(exc)[:200]}")
            yield row


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# sm_90 offline compile report: triton {env['triton']}, torch {env['torch']}", "",
             f"Compiled on {env['host']} (no GPU) with `triton.compile` for GPUTarget('cuda', 90, 32) "
             f"(sm_90a) on {env['date']}.  Limits: shared memory <= 227 KiB per block, spill stores <= "
             f"{SPILL_LIMIT} B per thread.  `python benchmarks/sm90_compile.py` regenerates this.", "",
             "| plan | what | kernel | warps | stages | registers | spill st/ld B | stack B | shared KiB | compile s | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['what']} | {r['kernel']} | {r.get('warps', '')} | {r.get('stages', '')} | "
                     f"{r.get('registers', '')} | {r.get('spill_stores', '')}/{r.get('spill_loads', '')} | "
                     f"{r.get('stack', '')} | {r.get('shared_bytes', 0) / 1024:.1f} | {r.get('compile_s', '')} | "
                     f"{r['verdict']} |")
    over = [r for r in rows if r["verdict"].startswith("over")]
    lines += ["", f"{len(rows)} compiles; {len(over)} over the limits"
              + (" (tune candidates only: launch.candidates leaves them out)"
                 if all(r["plan"] == "tune" for r in over) else ""), ""]
    return "\n".join(lines)


def over_limit_candidates(reports: list[Path]) -> frozenset[str]:
    """"kernel/head-dim class config" of every tune candidate over the limits at group 1 in
    ``reports``, and "kernel/head-dim class config gqa" of those over only at a GQA group."""
    from fastgpt.kernels.launch import head_dim_class
    over, over_gqa = set(), set()
    for report in reports:
        for r in json.loads(report.read_text())["rows"]:
            if r["plan"] == "tune" and r["verdict"].startswith("over"):
                kernel, hd, _, config = r["what"].split(" [")[0].split(" ", 3)
                group = 1
                if re.match(r"g\d+ ", config):  # the GQA group, in reports since 2026-11-27
                    group_text, config = config.split(" ", 1)
                    group = int(group_text[1:])
                (over if group == 1 else over_gqa).add(f"{kernel}/{head_dim_class(int(hd[2:]))} {config}")
    return frozenset(over | {f"{name} gqa" for name in over_gqa - over})


def can_compile_offline() -> str | None:
    """None if this triton can compile for sm_90 without a GPU, else why not."""
    try:
        from triton.compiler.compiler import make_backend
        make_backend(target())
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("fast", "full"), default="full")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the full report goes")
    parser.add_argument("--check", action="store_true", help="exit 1 if a table/loss config is over the limits")
    parser.add_argument("--kernels", nargs="+", metavar="KERNEL",
                        help="only these (attn_fwd, ..., attn_decode, losses); with the full subset their "
                             "rows replace the same rows of this triton's report in --out")
    parser.add_argument("--write-exclusions", action="store_true",
                        help="only rewrite OVER_SM90_LIMITS in kernels/launch_table.py from the committed reports")
    args = parser.parse_args(argv)
    if args.write_exclusions:
        import table_file
        reports = sorted((HERE / "results").glob("sm90-compile-triton*.json"))
        over = over_limit_candidates(reports)
        table_file.write(over=over)
        print(f"{table_file.TABLE_PATH}: {len(over)} candidates over the sm_90 limits in {len(reports)} reports")
        return 0
    reason = can_compile_offline()
    if reason:
        print(f"sm90_compile: this triton ({triton.__version__}) cannot compile for sm_90 offline: {reason}")
        return 3
    import platform
    import datetime as dt
    env = {"triton": triton.__version__, "torch": torch.__version__, "host": platform.machine(),
           "date": dt.date.today().isoformat()}
    rows = []
    for row in compile_plans(args.subset, tuple(args.kernels) if args.kernels else None):
        rows.append(row)
        print(f"{row['verdict'][:40]:<40} {row.get('registers', '-'):>4} regs {row.get('spill_stores', '-'):>5} B spilled "
              f"{row.get('shared_bytes', 0) / 1024:6.1f} KiB {row.get('compile_s', 0):5.1f} s  {row['what']}", flush=True)
    if args.subset == "full":
        out = Path(args.out)
        stem = f"sm90-compile-triton{triton.__version__}"
        if args.kernels:  # replace those kernels' rows of the existing report
            old = json.loads((out / f"{stem}.json").read_text())["rows"]
            mine = set(args.kernels)
            kept = [r for r in old if not (r["what"].split()[0] in mine or
                                           (r["plan"] == "losses" and "losses" in mine))]
            rows = kept + rows
        (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (out / f"{stem}.md").write_text(to_markdown(rows, env))
        print(f"wrote {out / stem}.json and .md")
    bad = [r for r in rows if r["verdict"].startswith("over") and r["plan"] != "tune"]
    for r in bad:
        print(f"OVER THE LIMITS: {r['what']}: {r['verdict']}")
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
