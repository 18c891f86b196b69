"""The one-call GPU check: correctness first, then the benchmark table, in well under 8 minutes.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 420]

1. GPU correctness: ``pytest -m gpu`` over the kernel tests plus the CUDA paths of the whole
   suite's kernel tests (bf16, 128k vocabularies, int64 offsets, long sequences).
2. Benchmarks, each section in its own process and time slice (an overrun is cut and noted):
   attention, fused losses, pre-training step, SFT / reward steps, generation, PPO iteration
   (defaults: 100 s of tests + 360 s of benchmarks, under 8 minutes with start-up).
3. Writes ``<out>/<date>-<gpu>.json`` and ``.md`` (device, torch and triton versions, every row),
   to commit under ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = [  # (module in benchmarks/, function returning rows, seconds it may take)
    ("bench_attention", "run_attention_benchmarks", 100),
    ("bench_losses", "run_loss_benchmarks", 80),
    ("bench_pretrain", "run_pretrain_benchmarks", 50),
    ("bench_sft_reward", "run_sft_reward_benchmarks", 40),
    ("bench_generation", "run_generation_benchmarks", 50),
    ("bench_ppo", "run_ppo_benchmarks", 40),
]


def environment() -> dict:
    import triton
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
    return env


def run_correctness(timeout_s: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu or not slow", "tests/kernels",
           "-p", "no:cacheprovider"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"cmd": " ".join(cmd), "returncode": proc.returncode, "seconds": time.time() - start, "tail": tail}
    except subprocess.TimeoutExpired:
        return {"cmd": " ".join(cmd), "returncode": None, "seconds": timeout_s, "tail": "timed out"}


def run_section(module: str, function: str, timeout_s: int) -> dict:
    """One benchmark section in its own process: its time slice is enforced (an overrun is cut
    and noted) and its GPU memory is freed before the next section starts."""
    start = time.time()
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
            f"print('ROWS=' + json.dumps({module}.{function}(), default=str))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"section": module, "error": f"cut after its {timeout_s}s time slice", "seconds": timeout_s}
    rows = [line[5:] for line in proc.stdout.splitlines() if line.startswith("ROWS=")]
    if proc.returncode != 0 or not rows:
        return {"section": module, "error": f"exit {proc.returncode}", "trace": (proc.stdout + proc.stderr)[-2000:],
                "seconds": time.time() - start}
    return {"section": module, "rows": json.loads(rows[-1]), "seconds": time.time() - start}


def to_markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU check {env['date']}", "",
             f"Device: {env.get('gpu', 'cpu')}; torch {env['torch']}; triton {env['triton']}; CUDA {env['cuda']}", "",
             f"Correctness (`{result['correctness']['cmd']}`): return code {result['correctness']['returncode']} "
             f"in {result['correctness']['seconds']:.0f}s", "", "```", result["correctness"]["tail"][-800:], "```", ""]
    for sec in result["sections"]:
        lines.append(f"## {sec['section']} ({sec['seconds']:.0f}s)")
        if "error" in sec:
            lines += ["", f"FAILED: {sec['error']}", ""]
            continue
        rows = sec["rows"]
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for r in rows:
                cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", str(HERE / "results")))
    parser.add_argument("--correctness-timeout", type=int, default=100)
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time slice")
    parser.add_argument("--skip", nargs="*", default=[], help="section modules to skip")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    result = {"environment": environment(), "correctness": run_correctness(args.correctness_timeout), "sections": []}
    print(f"correctness: rc={result['correctness']['returncode']} ({result['correctness']['seconds']:.0f}s)", flush=True)
    for module, function, seconds in SECTIONS:
        if module in args.skip:
            continue
        sec = run_section(module, function, int(seconds * args.time_scale))
        print(f"{module}: {'error ' + sec['error'] if 'error' in sec else str(len(sec['rows'])) + ' rows'} "
              f"({sec['seconds']:.0f}s)", flush=True)
        result["sections"].append(sec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = result["environment"]["gpu"].replace(" ", "-")
    stem = f"{dt.date.today().isoformat()}-{gpu}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    md = to_markdown(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0 if result["correctness"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
