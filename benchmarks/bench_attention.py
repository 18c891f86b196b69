"""Benchmarks: fused attention forward and forward+backward.

Compared implementations (each skipped where unavailable):
    fastgpt      the Triton kernels (fastgpt.kernels.triton_attention, the "triton" backend)
    eager        the PyTorch reference (materialises the B x H x S x S fp32 scores)
    compiled     the reference under torch.compile
    sdpa_flash   F.scaled_dot_product_attention restricted to the FlashAttention backend
    sdpa_cudnn   F.scaled_dot_product_attention restricted to the cuDNN backend
    flash_attn   flash_attn.flash_attn_func, if the package is installed

Reported per case: milliseconds (CUDA: ``triton.testing.do_bench``, which synchronises and
flushes L2; CPU: wall clock), TFLOP/s with fwd = 4*B*S^2*H*D (halved when causal) and
bwd = 2.5 x fwd, and peak MB (torch.cuda.max_memory_allocated during one call minus what was
allocated before it: the op's own working memory, activations saved for backward included).

The CUDA cases are bf16, causal, H*D = 2048 (hd 64 x 32 heads, hd 128 x 16 heads), sequence
length 1k..16k with B = 16384 // S so every case holds 16k tokens; the eager and compiled
references are skipped where their S x S scores would not fit.  A tiny CPU case (reference only)
runs everywhere.  ``run_attention_benchmarks()`` returns the table's rows for a script:

    python -m pytest benchmarks/bench_attention.py --benchmark-only
    python benchmarks/bench_attention.py        # prints the table
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Must precede the first triton import (see tests/kernels/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgpt.kernels.reference import attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
TOKENS = 16384
MODEL_DIM = 2048  # H * D
GPU_SEQLENS = (1024, 2048, 4096, 8192, 16384)
GPU_HEAD_DIMS = (64, 128)
CPU_CASE = dict(batch=1, seqlen=64, heads=2, head_dim=16, dtype=torch.float32, causal=True,
                device="cpu")
IMPLS = ("fastgpt", "eager", "compiled", "sdpa_flash", "sdpa_cudnn", "flash_attn")
MODES = ("fwd", "fwd_bwd")

# Every (shape, fwd/bwd) pair is a new graph for the compiled reference: let it recompile.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def gpu_case(seqlen: int, head_dim: int) -> dict:
    return dict(batch=TOKENS // seqlen, seqlen=seqlen, heads=MODEL_DIM // head_dim,
                head_dim=head_dim, dtype=torch.bfloat16, causal=True, device="cuda")


def attention_flops(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    """FlashAttention convention: fwd 4*B*S^2*H*D (two GEMMs), halved if causal; bwd 2.5x."""
    fwd = 4.0 * batch * seqlen**2 * heads * head_dim / (2 if causal else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


def _case_name(case: dict) -> str:
    return (f"B{case['batch']}xS{case['seqlen']}xH{case['heads']}xD{case['head_dim']}"
            f"-{str(case['dtype']).removeprefix('torch.')}{'-causal' if case['causal'] else ''}")


# ---------------------------------------------------------------------- implementations
def _fastgpt(q, k, v, causal):
    from fastgpt.kernels.triton_attention import attention_triton
    return attention_triton(q, k, v, causal)


_compiled_reference = torch.compile(attention_reference)


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):  # (B, T, H, D) -> (B, H, T, D) views; no copies
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
    return run


def _available_impls(device: str) -> dict[str, Callable]:
    """Callables (q, k, v, causal) -> out on (B, T, H, D) tensors, by implementation name."""
    impls: dict[str, Callable] = {"eager": attention_reference}
    if device != "cuda":
        return impls  # the Triton kernels and the fused baselines need a GPU to mean anything
    from torch.nn.attention import SDPBackend
    impls.update(fastgpt=_fastgpt, compiled=_compiled_reference,
                 sdpa_flash=_sdpa(SDPBackend.FLASH_ATTENTION))
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        impls["sdpa_cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
    try:
        from flash_attn import flash_attn_func
        impls["flash_attn"] = lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal)
    except ImportError:
        pass
    return impls


def _reference_fits(case: dict, impl: str) -> bool:
    """The references keep ~4 fp32 copies of the B x H x S x S scores alive for backward."""
    if impl not in ("eager", "compiled") or case["device"] != "cuda":
        return True
    need = 4 * 4 * case["batch"] * case["heads"] * case["seqlen"] ** 2
    return need < 0.8 * torch.cuda.mem_get_info()[0]


# ----------------------------------------------------------------------------- measuring
def _inputs(case: dict, seed: int = 0):
    gen = torch.Generator(device=case["device"]).manual_seed(seed)
    shape = (case["batch"], case["seqlen"], case["heads"], case["head_dim"])
    q, k, v, dout = (torch.randn(shape, device=case["device"], generator=gen).to(case["dtype"])
                     for _ in range(4))
    return q, k, v, dout


def _step(fn: Callable, case: dict, mode: str) -> Callable[[], None]:
    q, k, v, dout = _inputs(case)
    causal = case["causal"]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, causal)
        return run
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def run():
        torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
    return run


def _time_ms(run: Callable[[], None], device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mb(run: Callable[[], None], device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(impl: str, case: dict, mode: str, reps: int = 5) -> dict:
    """One implementation x case x mode: {'ms', 'tflops', 'peak_mb'} (raises if it fails)."""
    run = _step(_available_impls(case["device"])[impl], case, mode)
    run()  # warm-up: compilation, autotuning, allocator
    peak = _peak_mb(run, case["device"])
    ms = _time_ms(run, case["device"], reps)
    flops = attention_flops(case["batch"], case["seqlen"], case["heads"], case["head_dim"],
                            case["causal"], mode)
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "peak_mb": peak}


def run_attention_benchmarks(cases: list[dict] | None = None,
                             impls: tuple[str, ...] = IMPLS, reps: int = 5) -> list[dict]:
    """The comparison table: one row per case x implementation with keys shape, impl, fwd_ms,
    fwd_bwd_ms, fwd_tflops, fwd_bwd_tflops, peak_mb (of fwd+bwd) -- or error."""
    if cases is None:
        cases = ([gpu_case(s, d) for d in GPU_HEAD_DIMS for s in GPU_SEQLENS] if CUDA
                 else [CPU_CASE])
    rows = []
    for case in cases:
        available = _available_impls(case["device"])
        for impl in impls:
            if impl not in available:
                continue
            row: dict = {"shape": _case_name(case), "impl": impl}
            if not _reference_fits(case, impl):
                row["error"] = "skipped: S x S scores do not fit in memory"
                rows.append(row)
                continue
            try:
                fwd = measure(impl, case, "fwd", reps)
                both = measure(impl, case, "fwd_bwd", reps)
                row.update(fwd_ms=fwd["ms"], fwd_bwd_ms=both["ms"], fwd_tflops=fwd["tflops"],
                           fwd_bwd_tflops=both["tflops"], peak_mb=both["peak_mb"])
            except Exception as exc:  # one failing baseline (OOM, unsupported) must not stop the rest
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            if case["device"] == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'shape':<34} {'impl':<11} {'fwd ms':>8} {'f+b ms':>8} {'fwd TF/s':>9} " \
             f"{'f+b TF/s':>9} {'peak MB':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<34} {r['impl']:<11} {r['error']}")
        else:
            lines.append(f"{r['shape']:<34} {r['impl']:<11} {r['fwd_ms']:>8.3f} "
                         f"{r['fwd_bwd_ms']:>8.3f} {r['fwd_tflops']:>9.1f} "
                         f"{r['fwd_bwd_tflops']:>9.1f} {r['peak_mb']:>9.0f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, impl: str, case: dict, mode: str) -> None:
    available = _available_impls(case["device"])
    if impl not in available:
        pytest.skip(f"{impl} is not available here")
    if not _reference_fits(case, impl):
        pytest.skip("the reference's S x S scores do not fit in memory")
    device = case["device"]
    benchmark.group = f"attention {mode} {_case_name(case)}"
    try:
        stats = measure(impl, case, mode, reps=1)
    except RuntimeError as exc:  # e.g. a cuDNN/flash backend refusing this shape
        pytest.skip(f"{impl} failed: {exc}"[:200])
    run = _step(available[impl], case, mode)

    def timed():
        run()
        if device == "cuda":
            torch.cuda.synchronize()  # time the kernels, not the launches

    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 20, iterations=1,
                       warmup_rounds=1)
    benchmark.extra_info.update(do_bench_ms=stats["ms"], tflops=stats["tflops"],
                                peak_mb=stats["peak_mb"], shape=_case_name(case))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqlen", GPU_SEQLENS)
@pytest.mark.parametrize("head_dim", GPU_HEAD_DIMS)
def test_bench_attention_gpu(benchmark, head_dim, seqlen, impl, mode):
    _bench(benchmark, impl, gpu_case(seqlen, head_dim), mode)


@pytest.mark.parametrize("mode", MODES)
def test_bench_attention_cpu_tiny(benchmark, mode):
    _bench(benchmark, "eager", CPU_CASE, mode)


if __name__ == "__main__":
    print(format_table(run_attention_benchmarks()))
