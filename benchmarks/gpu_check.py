"""The one-call GPU check: correctness first, then every benchmark section, then (``--tune``) the
launch-configuration sweep -- each in its own process and time slice, results saved as they come.

On a GPU machine (torch, triton, transformers present; nothing downloadable), from the repo root:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # liger-kernel, if carried
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    python3 benchmarks/gpu_check.py --tune --out $OUT          # ~7 min + 2 min of tuning

then commit ``<out>/<date>-<gpu>.json`` and ``.md`` under ``benchmarks/results/`` and refresh the
kernels' launch table from the sweep with ``python benchmarks/gpu_check.py --apply-tune
benchmarks/results/<date>-<gpu>.json``.  ``--only attention`` reruns one section and merges it
into that day's files.  liger-kernel (pure Python) travels as a wheel: ``benchmarks/README.md``.

    python benchmarks/gpu_check.py --rehearse      # the same script on the CPU, tiny shapes

The rehearsal runs every section and every row on the CPU (Triton kernels through the
interpreter in fp32 where the GPU runs bf16; GPU-only peers run their CPU path; each such row
says so in its ``note``) and writes the same JSON / Markdown (default ``runs/gpu_check/``), so a
GPU run can only fail for GPU reasons.  It exits non-zero if any section or row failed; CI runs it.

What is written, and when: after every row and every section, ``<stem>.json`` (environment,
versions, each section's status, seconds and rows, per-test outcomes of the correctness step) and
``<stem>.md`` (the same as tables); the correctness step's full pytest log as ``<stem>-tests.log``.
A section cut by its slice keeps the rows it finished; a run killed from outside keeps every
section it finished.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Section:
    name: str
    module: str      # benchmarks/<module>.py exposing gpu_check_rows(plan) -> Iterator[dict]
    gpu_s: int       # time slice on the GPU
    rehearse_s: int  # time slice in the CPU rehearsal


# The GPU slices sum to 490 s, sized from the first GPU run (H200, 2026-11-27: sections took
# compile 30, losses 47, sft_reward 25, ppo 34, dpo 24, grpo 35 s; pretrain's eager row 17 s;
# generation > 108 s with its cold compile; attention stopped early on a bug), so that the run
# with its start fits one 10-minute command (--tune adds 120 s: run it when the table is stale).
# Optional rows (cold torch.compile) run only if their estimate fits what is left of the slice.
# The rehearsal's slices are ~3x what an idle 2-core machine needs: a cut there is a hang.
SECTIONS = [
    Section("correctness", "", 70, 120),
    Section("compile", "bench_compile", 35, 90),
    Section("attention", "bench_attention", 100, 150),
    Section("losses", "bench_losses", 55, 120),
    Section("pretrain", "bench_pretrain", 30, 120),
    Section("sft_reward", "bench_sft_reward", 30, 120),
    Section("generation", "bench_generation", 70, 120),
    Section("ppo", "bench_ppo", 40, 90),
    Section("dpo", "bench_dpo", 30, 40),
    Section("grpo", "bench_grpo", 40, 40),
]
TUNE = Section("tune", "bench_tune", 120, 120)
# The CUDA-graph decode loops against the plain ones: the benchmark's A/B and the engine's.
GRAPH_TESTS = ["benchmarks/bench_generation.py::test_cuda_graph_loop_matches_device_loop",
               "tests/test_engine.py::test_cuda_graph_decode_matches_uncaptured_step"]
# The rehearsal's correctness step: a few fast kernel tests (the suite itself runs in CI) and
# GPU-only ones that skip, to exercise the per-test outcome records.
REHEARSAL_TESTS = ("test_single_token_sequences_only or test_decode_single_split or "
                   "test_cross_entropy_all_ignored or test_logprobs_no_grad_path or test_gpu_long")


# ------------------------------------------------------------------------- environment
def environment(rehearse: bool) -> dict:
    import torch
    import triton
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "mode": "rehearsal (CPU, tiny shapes)" if rehearse else "gpu",
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda}
    from importlib.metadata import PackageNotFoundError, version
    for name in ("transformers", "numpy", "liger-kernel", "pytest-xdist"):
        try:
            env[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            env[name.replace("-", "_")] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    # The device machine gets a copy of the tree without .git: name the kernels by their bytes.
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.read_bytes())
    env["kernels_sha256"] = digest.hexdigest()[:12]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2**30, 1))
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env.update(gpu="cpu", cpu_threads=torch.get_num_threads())
    return env


def stem_of(env: dict, rehearse: bool) -> str:
    day = env["date"][:10]
    return f"{day}-rehearsal-cpu" if rehearse else f"{day}-{env['gpu'].replace(' ', '-')}"


# ------------------------------------------------------------------------------ results
class Results:
    """The run's JSON/Markdown, rewritten (atomically) after every row and section."""

    def __init__(self, out: Path, stem: str, env: dict, merge: bool) -> None:
        self.out, self.stem = out, stem
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.lock = threading.Lock()
        self.data = {"environment": env, "sections": {}}
        if merge and self.json_path.exists():  # --only: replace one section of an earlier run
            self.data = json.loads(self.json_path.read_text())
            self.data.setdefault("reruns", []).append(env)

    def section(self, name: str, **fields) -> dict:
        with self.lock:
            sec = {"status": "running", "rows": [], **fields}
            self.data["sections"][name] = sec
            return sec

    def save(self) -> None:
        with self.lock:
            self.out.mkdir(parents=True, exist_ok=True)
            for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=str)),
                               (self.md_path, to_markdown(self.data))):
                tmp = path.with_suffix(path.suffix + ".tmp")
                tmp.write_text(text)
                tmp.replace(path)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    # columns in the order of the fullest rows, so the usual fields come first
    keys = list(dict.fromkeys(k for r in sorted(rows, key=len, reverse=True) for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return lines


def to_markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# GPU check {env['date']} ({env['mode']})", "",
             f"Device: {env.get('gpu')} (capability {env.get('capability', '-')}, "
             f"{env.get('sms', '-')} SMs, {env.get('memory_gb', '-')} GB); driver {env.get('driver', '-')}; "
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, transformers "
             f"{env.get('transformers')}, liger-kernel {env.get('liger_kernel')}; commit {env.get('commit')}, "
             f"kernels sha256 {env.get('kernels_sha256')}.",
             ""]
    for name, sec in data["sections"].items():
        lines.append(f"## {name}: {sec['status']} ({sec.get('seconds', 0):.0f} s of a "
                     f"{sec.get('slice_s', '-')} s slice)")
        lines.append("")
        if sec.get("note"):
            lines += [sec["note"], ""]
        if sec.get("error"):
            lines += ["```", sec["error"][-1500:], "```", ""]
        rows = sec["rows"]
        if name == "correctness":
            counts = sec.get("counts", {})
            lines += [f"`{sec.get('cmd', '')}`: " + ", ".join(f"{v} {k}" for k, v in counts.items()), ""]
            rows = [r for r in rows if r["outcome"] != "passed"]
            rows = [{**r, "message": (r.get("message") or "")[-300:]} for r in rows]
        if rows:
            lines += _table(rows) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------- running a slice
def _run_process(cmd: list[str], slice_s: float, env: dict, on_line, log_path: Path | None
                 ) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group for at most ``slice_s`` seconds, feeding each stdout
    line to ``on_line``; returns (exit code or None when cut, the output's tail)."""
    log = open(log_path, "w") if log_path else None
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            if log:
                log.write(line)
                log.flush()
            if not on_line(line):
                tail.append(line)
                del tail[:-200]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(1.0, slice_s))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and anything it started (compile workers)
        proc.wait()
        code = None
    reader.join(timeout=10)
    if log:
        log.close()
    return code, "".join(tail)[-4000:]


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_correctness(results: Results, rehearse: bool, slice_s: float) -> None:
    outcomes = Path(tempfile.mkstemp(prefix="fastgpt-outcomes-", suffix=".jsonl")[1])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_outcomes",
           "-m", "gpu or not slow", "tests/kernels", *GRAPH_TESTS, "--timeout", "120"]
    if rehearse:
        cmd += ["-k", REHEARSAL_TESTS]
    elif importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "6"]  # compile in parallel: the GPU machine has 16 cores
    sec = results.section("correctness", cmd=" ".join(cmd[1:]), slice_s=round(slice_s))
    results.save()
    start = time.time()
    code, tail = _run_process(cmd, slice_s, _child_env({"FASTGPT_OUTCOMES": str(outcomes)}),
                              lambda line: False, results.out / f"{results.stem}-tests.log")
    rows = [json.loads(line) for line in outcomes.read_text().splitlines() if line.strip()]
    outcomes.unlink()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    with results.lock:
        sec.update(rows=rows, counts=counts, seconds=round(time.time() - start, 1), exit_code=code,
                   status="cut" if code is None else ("ok" if code == 0 else "failed"))
        if code != 0:
            sec["error"] = tail
    results.save()


def run_section(results: Results, section: Section, rehearse: bool, slice_s: float) -> None:
    sec = results.section(section.name, slice_s=round(slice_s))
    results.save()
    start = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section.name,
           "--deadline", str(start + slice_s)] + (["--rehearse"] if rehearse else [])
    extra = {}
    if section.name == "compile":  # cold compile times need a Triton cache of their own
        extra["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastgpt-cold-triton-")

    def on_line(line: str) -> bool:
        if not line.startswith("ROW "):
            return False
        with results.lock:
            sec["rows"].append(json.loads(line[4:]))
        results.save()
        return True

    code, tail = _run_process(cmd, slice_s, _child_env(extra), on_line, None)
    if "TRITON_CACHE_DIR" in extra:
        shutil.rmtree(extra["TRITON_CACHE_DIR"], ignore_errors=True)
    with results.lock:
        sec.update(seconds=round(time.time() - start, 1), exit_code=code)
        if code is None:
            sec["status"] = "cut"
            sec["error"] = f"cut after its {slice_s:.0f} s slice; finished rows kept\n" + tail[-1500:]
        elif code != 0:
            sec["status"] = "error"
            sec["error"] = tail
        else:
            sec["status"] = "ok"
            if any("error" in r for r in sec["rows"]):
                sec["status"] = "ok, with row errors"
    results.save()


def section_child(name: str, deadline: float, rehearse: bool) -> int:
    """Inside the section's own process: stream ``ROW {json}`` lines as rows finish."""
    from measure import Plan
    section = next(s for s in SECTIONS + [TUNE] if s.name == name)
    module = importlib.import_module(section.module)
    t0 = time.time()
    for row in module.gpu_check_rows(Plan(rehearse=rehearse, deadline=deadline)):
        row["wall_s"] = round(time.time() - t0, 2)  # this row's cost, compilation included
        print("ROW " + json.dumps(row, default=str), flush=True)
        t0 = time.time()
    return 0


def merge_calls(paths: list[Path], out: Path) -> str:
    """One results file from the calls of one lease: the first call's file, each section of a
    later call replacing the earlier one (with a note saying so and what it replaced)."""
    base = json.loads(paths[0].read_text())
    for call, path in enumerate(paths[1:], start=2):
        later = json.loads(path.read_text())
        base.setdefault("reruns", []).append(later["environment"])
        for name, sec in later["sections"].items():
            first = base["sections"].get(name)
            if first is not None:
                note = (f"rerun in call {call} of {len(paths)} ({later['environment']['date']}); replaces "
                        f"call 1's {first['status']} section ({len(first['rows'])} rows, "
                        f"{first.get('slice_s', '-')} s slice).")
                sec["note"] = note + (" " + sec["note"] if sec.get("note") else "")
            base["sections"][name] = sec
    stem = stem_of(base["environment"], base["environment"].get("mode") != "gpu")
    results = Results(out, stem, base["environment"], merge=False)
    results.data = base
    results.save()
    return f"merged {len(paths)} calls into {results.json_path} and {results.md_path.name}"


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="run everything on the CPU, tiny shapes")
    parser.add_argument("--tune", action="store_true", help="after the benchmarks, the launch-config sweep")
    parser.add_argument("--only", nargs="+", metavar="SECTION",
                        help="run only these sections (merged into the day's files): "
                             + ", ".join(s.name for s in SECTIONS + [TUNE]))
    parser.add_argument("--out", help="results folder (default $OUT, else benchmarks/results; "
                                      "rehearsal: runs/gpu_check)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget for all sections (default: the slices' sum)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every time slice")
    parser.add_argument("--apply-tune", metavar="RESULTS_JSON",
                        help="rewrite kernels/launch_table.py from a --tune run's results")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="merge the JSON of several calls of one lease (later sections replace "
                             "earlier ones, noted) into <stem>.json/.md in --out")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.section:
        return section_child(args.section, args.deadline, args.rehearse)
    if args.merge:
        print(merge_calls([Path(p) for p in args.merge], Path(args.out or HERE / "results")))
        return 0
    if args.apply_tune:
        from bench_tune import apply_tune
        print(apply_tune(Path(args.apply_tune)))
        return 0

    import torch
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --rehearse for the CPU rehearsal", file=sys.stderr)
        return 2
    try:
        importlib.import_module("fastgpt.kernels")
    except ImportError:
        print("gpu_check: fastgpt is not installed: pip install --no-deps --no-build-isolation -e .",
              file=sys.stderr)
        return 2
    sections = SECTIONS + ([TUNE] if args.tune else [])
    if args.only:
        known = {s.name: s for s in SECTIONS + [TUNE]}
        unknown = [n for n in args.only if n not in known]
        if unknown:
            parser.error(f"unknown section(s) {unknown}; expected among {list(known)}")
        sections = [known[n] for n in args.only]
    env = environment(args.rehearse)
    default_out = ROOT / "runs" / "gpu_check" if args.rehearse else HERE / "results"
    out = Path(args.out or (None if args.rehearse else os.environ.get("OUT")) or default_out)
    results = Results(out, stem_of(env, args.rehearse), env, merge=bool(args.only))
    slices = [(s, (s.rehearse_s if args.rehearse else s.gpu_s) * args.time_scale) for s in sections]
    budget = args.budget_s if args.budget_s is not None else sum(t for _, t in slices)
    start = time.time()
    print(f"gpu_check ({env['mode']}): {len(slices)} sections, budget {budget:.0f} s -> "
          f"{results.json_path}", flush=True)
    for section, slice_s in slices:
        left = budget - (time.time() - start)
        if left < 10:
            results.section(section.name, status="skipped", note=f"no time left in the {budget:.0f} s budget")
            results.save()
            continue
        slice_s = min(slice_s, left)
        if section.name == "correctness":
            run_correctness(results, args.rehearse, slice_s)
        else:
            run_section(results, section, args.rehearse, slice_s)
        sec = results.data["sections"][section.name]
        print(f"  {section.name:<12} {sec['status']:<20} {len(sec['rows']):>4} rows "
              f"{sec.get('seconds', 0):>6.1f} s", flush=True)
    print(f"done in {time.time() - start:.0f} s: {results.json_path} and {results.md_path.name}")
    failed = [s.name for s, _ in slices if results.data["sections"][s.name]["status"] != "ok"]
    if failed:
        print(f"not clean: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
