"""How every benchmark in this folder measures: one timer, one peak-memory probe, one plan.

Timing (:func:`time_ms`).  On CUDA each timed run sits between its own pair of CUDA events, after
untimed warm-up runs (compilation, autotuning, allocator growth stay out); the result is the
median of at least ``min_runs`` runs (20 by default: the floor for sub-millisecond kernels; 5 for
calls over 100 ms), more while ``budget_s`` lasts.  ``flush_l2`` zeroes a 256 MB buffer before each run (outside the
events) so a kernel whose inputs fit in the 50 MB L2 is not timed on a warm cache.  On CPU (the
rehearsal) the same loop uses ``time.perf_counter``; those times only show that the code runs.

Peak memory (:func:`peak_mb`).  The CUDA caching allocator's ``max_memory_allocated`` during one
call, minus what was allocated just before it, after ``gc.collect`` -- so a step must not keep
its previous call's outputs or gradients alive (use ``torch.autograd.grad``, or drop them).

Plan (:class:`Plan`).  What ``gpu_check.py`` hands a section: GPU or CPU rehearsal, and the
wall-clock deadline of its time slice, so optional rows (cold ``torch.compile``) can be skipped
with a note instead of cutting the section.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # > the 50 MB (H100) / 60 MB (H200) L2


@dataclass
class Plan:
    """How one gpu_check section should run: ``rehearse`` = tiny CPU shapes, no GPU."""

    rehearse: bool
    deadline: float  # time.time() by which the section must have finished

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.rehearse else "cuda")

    def timing(self) -> dict:
        """:func:`time_ms` arguments: >= 20 timed runs after 3 warm-ups on a GPU (more while 0.1 s
        lasts); in the rehearsal one run after the first call (the interpreter's times mean
        nothing)."""
        if self.rehearse:
            return {"warmup": 0, "min_runs": 1, "budget_s": 0.0}
        return {"warmup": 3, "min_runs": 20, "budget_s": 0.1}

    def left(self) -> float:
        return self.deadline - time.time()

    def fits(self, seconds: float) -> bool:
        """Whether an optional step estimated at ``seconds`` still fits, with a 10% margin."""
        return self.left() > 1.1 * seconds


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_l2_buffer: dict[str, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    key = str(device)
    if key not in _l2_buffer:
        _l2_buffer[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    _l2_buffer[key].zero_()


def time_ms(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3,
            min_runs: int = 20, max_runs: int = 1000, budget_s: float = 1.0,
            flush_l2: bool = False) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over >= ``min_runs`` timed runs (see the
    module docstring); keys ``ms``, ``min_ms``, ``max_ms``, ``runs``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        # Calls over 100 ms (model steps, generation) are their own averages: 5 runs suffice.
        enough = len(times) >= min_runs or (len(times) >= 5 and statistics.median(times) > 100.0)
        if enough and (len(times) >= max_runs or time.perf_counter() - start >= budget_s):
            break
        if cuda:
            if flush_l2:
                _flush_l2(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "runs": len(times)}


def first_call_s(fn: Callable[[], object], device: torch.device | str) -> float:
    """Seconds of one synchronised call: the first call's compile / autotune cost."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak CUDA memory (MB) allocated during one call above what was allocated before it;
    None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def free_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    """One line for a row's ``error`` field: its start and, for a long one (a compiler's
    traceback), its end, where the cause is."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 1800 else f"{text[:300]} [...] {text[-1500:]}"


def record_rows(benchmark: Any, rows: list[dict], positive: tuple[str, ...] = ()) -> None:
    """Keep a section's rows in a pytest-benchmark record (their timings are our own, so the
    benchmark fixture times nothing); every row must have run, and each ``positive`` field of
    it must be > 0."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for r in rows:
        assert "error" not in r, r["error"]
        for key in positive:
            assert r[key] > 0, (key, r)
    benchmark.extra_info.update({r["impl"]: r for r in rows})
