"""Benchmarks: fused linear cross-entropy and fused linear log-probs.

Compared implementations (each skipped where unavailable):
    fastgpt        the Triton kernels (fastgpt.kernels with the "triton" backend)
    eager          the PyTorch reference (materialises the full N x V logits)
    compiled       the reference under torch.compile
    liger          Liger-Kernel's LigerFusedLinearCrossEntropyLoss (linear CE only)
    torch_chunked  torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions
                   (linear CE only)

Reported per case: median milliseconds, peak MB (torch.cuda.max_memory_allocated during the
call minus what was allocated before it: the op's own working memory) and effective TFLOP/s
counting only the lm_head GEMMs -- 6*N*d*V for CE fwd+bwd, 8*N*d*V for log-probs fwd+bwd
(forward GEMM recomputed in backward) and 2*N*d*V for the no-grad forward.

The CUDA cases (bf16, N=16384, d=2048, V=128256; the eager reference needs ~8+ GB of logits)
are skipped without a GPU; a tiny CPU case runs everywhere (under the Triton interpreter, so its
times only show that the code runs).  ``run_loss_benchmarks()`` returns the rows for a script.

    python -m pytest benchmarks/bench_losses.py --benchmark-only
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first triton import: the CPU case runs the kernels interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgpt.kernels as K  # noqa: E402
from fastgpt.kernels.reference import (  # noqa: E402
    linear_cross_entropy_reference,
    linear_logprobs_reference,
)

GPU_SHAPE = dict(n=16384, d=2048, v=128256, dtype=torch.bfloat16, device="cuda")
CPU_SHAPE = dict(n=24, d=32, v=100, dtype=torch.float32, device="cpu")
OPS = ("linear_ce_fwd_bwd", "logprobs_fwd_bwd", "logprobs_fwd_nograd")
FLOPS_PER_NDV = {"linear_ce_fwd_bwd": 6, "logprobs_fwd_bwd": 8, "logprobs_fwd_nograd": 2}


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, d, device=device, generator=gen) * d**-0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    targets[::10] = -100
    return hidden, weight, targets


def _fastgpt_ce(h, w, t):
    with K.backend("triton"):
        return K.linear_cross_entropy(h, w, t)


def _fastgpt_lp(h, w, t):
    with K.backend("triton"):
        return K.linear_logprobs(h, w, t)


_compiled: dict[str, Callable] = {}


def _compiled_fn(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _ce_impls(device: str) -> dict[str, Callable]:
    """Callables (hidden, weight, targets) -> scalar loss, by implementation name."""
    impls: dict[str, Callable] = {
        "fastgpt": _fastgpt_ce,
        "eager": linear_cross_entropy_reference,
        "compiled": _compiled_fn("ce", linear_cross_entropy_reference),
    }
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss()
            impls["liger"] = lambda h, w, t: liger(w, h, t)
        except ImportError:
            pass
    if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(
            torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        impls["torch_chunked"] = lambda h, w, t: torch.nn.functional.linear_cross_entropy(
            h, w, t, ignore_index=-100, options=options)
    return impls


def _lp_impls() -> dict[str, Callable]:
    return {
        "fastgpt": _fastgpt_lp,
        "eager": linear_logprobs_reference,
        "compiled": _compiled_fn("lp", linear_logprobs_reference),
    }


def _step(op: str, fn: Callable, hidden, weight, targets) -> Callable[[], None]:
    """One timed call: forward (+ backward) of ``op`` with implementation ``fn``."""
    if op == "logprobs_fwd_nograd":
        def run():
            with torch.no_grad():
                fn(hidden, weight, targets)
        return run
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if op == "linear_ce_fwd_bwd":
        def run():
            h.grad = w.grad = None
            fn(h, w, targets).backward()
        return run
    g = torch.randn(2, hidden.shape[0], device=hidden.device)

    def run():
        h.grad = w.grad = None
        lp, ent = fn(h, w, targets)
        ((lp * g[0]).sum() + (ent * g[1]).sum()).backward()
    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _measure(run: Callable[[], None], device: str, reps: int) -> tuple[float, float]:
    """(median ms, peak MB above the memory in use before the call)."""
    run()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    peak_mb = float("nan")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak_mb


def _impls_for(op: str, device: str) -> dict[str, Callable]:
    return _ce_impls(device) if op == "linear_ce_fwd_bwd" else _lp_impls()


def run_loss_benchmarks(n: int = 16384, d: int = 2048, v: int = 128256,
                        dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                        reps: int = 5, impls: tuple[str, ...] | None = None) -> list[dict]:
    """Time every op x implementation; rows: op, impl, ms, peak_mb, tflops (or error)."""
    hidden, weight, targets = _inputs(n, d, v, dtype, device)
    rows = []
    for op in OPS:
        for name, fn in _impls_for(op, device).items():
            if impls is not None and name not in impls:
                continue
            row = {"op": op, "impl": name, "n": n, "d": d, "v": v, "dtype": str(dtype)}
            try:
                ms, peak = _measure(_step(op, fn, hidden, weight, targets), device, reps)
                row.update(ms=ms, peak_mb=peak,
                           tflops=FLOPS_PER_NDV[op] * n * d * v / (ms * 1e-3) / 1e12)
            except Exception as exc:  # one failing baseline (e.g. OOM) must not stop the rest
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, op: str, impl: str, shape: dict) -> None:
    impls = _impls_for(op, shape["device"])
    if impl not in impls:
        pytest.skip(f"{impl} is not available here")
    if impl == "compiled" and shape["device"] == "cpu":
        pytest.skip("torch.compile on CPU needs a C++ toolchain and minutes; GPU only")
    hidden, weight, targets = _inputs(**shape)
    run = _step(op, impls[impl], hidden, weight, targets)
    ms, peak = _measure(run, shape["device"], reps=1)
    device = shape["device"]

    def timed():
        run()
        _sync(device)

    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 10, iterations=1)
    n, d, v = shape["n"], shape["d"], shape["v"]
    benchmark.extra_info.update(peak_mb=peak,
                                tflops=FLOPS_PER_NDV[op] * n * d * v / (ms * 1e-3) / 1e12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["fastgpt", "eager", "compiled", "liger", "torch_chunked"])
@pytest.mark.parametrize("op", OPS)
def test_bench_losses_gpu(benchmark, op, impl):
    benchmark.group = f"{op} bf16 N=16384 d=2048 V=128256"
    _bench(benchmark, op, impl, GPU_SHAPE)


@pytest.mark.parametrize("impl", ["fastgpt", "eager", "torch_chunked"])
@pytest.mark.parametrize("op", OPS)
def test_bench_losses_cpu_tiny(benchmark, op, impl):
    benchmark.group = f"{op} fp32 tiny CPU"
    _bench(benchmark, op, impl, CPU_SHAPE)


if __name__ == "__main__":
    for r in run_loss_benchmarks(**({} if torch.cuda.is_available() else
                                    dict(CPU_SHAPE, reps=1, impls=("fastgpt", "eager")))):
        print(r)
