"""Benchmarks: fused linear cross-entropy and fused linear log-probs, fastgpt against its peers.

Compared implementations (each skipped, with the reason, where unavailable):
    fastgpt              the Triton kernels; logits chunks of 256 MiB (the default)
    fastgpt_chunk1GiB    the same with 1 GiB / 2 GiB chunks: the A/B of the issue -- with
    fastgpt_chunk2GiB    K = chunk rows the weight-gradient GEMM stops being memory-bound
    eager                the PyTorch reference (materialises the full N x V logits in fp32)
    compiled             the reference under torch.compile (cold compile: only if it fits the slice)
    liger                Liger-Kernel's LigerFusedLinearCrossEntropyLoss (its default: bf16
    liger_fp32acc        weight-gradient accumulation) and with accum_dtype=fp32 (as fastgpt)
    torch_chunked        torch.nn.functional.linear_cross_entropy (torch >= 2.13)

GPU shape: bf16, N = 16384 tokens, d = 2048, V = 128256 (every 10th target ignored).  Per row:
median ms over >= 20 CUDA-event-timed runs (>= 5 for calls over 100 ms), peak MB above the
inputs (CUDA allocator; the gradients are returned by autograd.grad and dropped, so no earlier
call's gradients sit in the baseline), effective TFLOP/s counting only the lm-head GEMMs (the
formula is in each row: 6*N*d*V for CE fwd+bwd, 8*N*d*V for log-probs fwd+bwd whose backward
recomputes the logits, 2*N*d*V for the no-grad forward) and the first call's seconds.
The rehearsal runs a tiny fp32 shape on the CPU (Triton interpreter).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first triton import: the CPU case runs the kernels interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastgpt.kernels.reference import (  # noqa: E402
    linear_cross_entropy_reference,
    linear_logprobs_reference,
)
from measure import Plan, error_text, first_call_s, free_memory, peak_mb, time_ms  # noqa: E402

GPU_SHAPE = dict(n=16384, d=2048, v=128256, dtype=torch.bfloat16, device="cuda")
CPU_SHAPE = dict(n=24, d=32, v=100, dtype=torch.float32, device="cpu")
OPS = ("linear_ce_fwd_bwd", "logprobs_fwd_bwd", "logprobs_fwd_nograd")
FLOPS_PER_NDV = {"linear_ce_fwd_bwd": 6, "logprobs_fwd_bwd": 8, "logprobs_fwd_nograd": 2}
CHUNK_MIB = {"fastgpt": None, "fastgpt_chunk1GiB": 1024, "fastgpt_chunk2GiB": 2048}
COMPILE_ESTIMATE_S = 60  # a cold torch.compile of one reference, forward and backward


def inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, d, device=device, generator=gen) * d**-0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device, generator=gen)
    targets[::10] = -100
    return hidden, weight, targets


def chunk_rows(mib: int | None, v: int, dtype: torch.dtype) -> int | None:
    """Rows per logits chunk of ``mib`` MiB (None: the kernels' default)."""
    return None if mib is None else max(1, mib * 2**20 // (v * dtype.itemsize))


def _fastgpt_ce(mib: int | None) -> Callable:
    def run(h, w, t):
        from fastgpt.kernels.triton_cross_entropy import linear_cross_entropy_triton
        return linear_cross_entropy_triton(h, w, t, chunk_size=chunk_rows(mib, w.shape[0], w.dtype))
    return run


def _fastgpt_lp(mib: int | None) -> Callable:
    def run(h, w, t):
        from fastgpt.kernels.triton_logprobs import linear_logprobs_triton
        return linear_logprobs_triton(h, w, t, chunk_size=chunk_rows(mib, w.shape[0], w.dtype))
    return run


def _liger(accum_dtype: torch.dtype | None) -> Callable:
    def run(h, w, t):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss(accum_dtype=accum_dtype)(w, h, t)
    return run


def _torch_chunked(h, w, t):
    return torch.nn.functional.linear_cross_entropy(h, w, t, ignore_index=-100)


_compiled: dict[str, Callable] = {}


def _compiled_fn(name: str, fn: Callable, rehearse: bool) -> Callable:
    """torch.compile of a reference (aot_eager in the rehearsal: no C++ toolchain, no minutes)."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, backend="aot_eager" if rehearse else "inductor")
    return _compiled[name]


def impls_for(op: str, rehearse: bool) -> dict[str, Callable]:
    """Callables (hidden, weight, targets) -> loss or (logprobs, entropy), by name; "compiled"
    last because it runs only if its cold compile fits what is left of the slice."""
    if op == "linear_ce_fwd_bwd":
        impls = {name: _fastgpt_ce(mib) for name, mib in CHUNK_MIB.items()}
        impls.update(eager=linear_cross_entropy_reference, liger=_liger(None),
                     liger_fp32acc=_liger(torch.float32), torch_chunked=_torch_chunked)
        impls["compiled"] = _compiled_fn("ce", linear_cross_entropy_reference, rehearse)
        return impls
    impls = {name: _fastgpt_lp(mib) for name, mib in CHUNK_MIB.items()}
    impls["eager"] = linear_logprobs_reference
    impls["compiled"] = _compiled_fn("lp", linear_logprobs_reference, rehearse)
    return impls


def unavailable(impl: str) -> str | None:
    if impl.startswith("liger"):
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "skipped: liger-kernel is not importable (carry its wheel: benchmarks/README.md)"
    if impl == "torch_chunked" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"skipped: torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
    return None


def step(op: str, fn: Callable, hidden, weight, targets) -> Callable[[], None]:
    """One timed call: forward (+ backward) of ``op`` with implementation ``fn``.  Gradients come
    back from autograd.grad and are dropped, so none outlives the call."""
    if op == "logprobs_fwd_nograd":
        def run():
            with torch.no_grad():
                fn(hidden, weight, targets)
        return run
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if op == "linear_ce_fwd_bwd":
        def run():
            torch.autograd.grad(fn(h, w, targets), (h, w))
        return run
    g = torch.randn(2, hidden.shape[0], device=hidden.device)

    def run():
        lp, ent = fn(h, w, targets)
        torch.autograd.grad((lp * g[0]).sum() + (ent * g[1]).sum(), (h, w))
    return run


def measure(run: Callable[[], None], device: str, timing: dict, flops: float) -> dict:
    first = first_call_s(run, device)  # compilation, autotuning, allocator
    peak = peak_mb(run, device)
    t = time_ms(run, device, **timing)
    return {"ms": t["ms"], "runs": t["runs"], "tflops": flops / (t["ms"] * 1e-3) / 1e12,
            "peak_mb": peak, "first_call_s": first}


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    shape = CPU_SHAPE if plan.rehearse else GPU_SHAPE
    n, d, v, device = shape["n"], shape["d"], shape["v"], shape["device"]
    hidden, weight, targets = inputs(**shape)
    for op in OPS:
        for impl, fn in impls_for(op, plan.rehearse).items():
            row = {"op": op, "impl": impl, "n": n, "d": d, "v": v,
                   "dtype": str(shape["dtype"]).removeprefix("torch."),
                   "flop_formula": f"{FLOPS_PER_NDV[op]}*N*d*V"}
            if impl in CHUNK_MIB:
                rows = chunk_rows(CHUNK_MIB[impl], v, shape["dtype"])
                row["chunk_rows"] = rows or "default (256 MiB)"
            reason = unavailable(impl)
            if impl == "compiled" and not plan.rehearse and not plan.fits(COMPILE_ESTIMATE_S):
                reason = f"skipped: a cold torch.compile (~{COMPILE_ESTIMATE_S} s) does not fit the slice"
            if reason:
                yield {**row, "status": reason}
                continue
            try:
                row.update(measure(step(op, fn, hidden, weight, targets), device, plan.timing(),
                                   FLOPS_PER_NDV[op] * n * d * v))
            except Exception as exc:  # one failing peer (OOM, unsupported) must not stop the rest
                row["error"] = error_text(exc)
            if plan.rehearse:
                row["note"] = "rehearsal: CPU fp32 (bf16 on the GPU), interpreter" + (
                    "; compiled with aot_eager" if impl == "compiled" else "")
            free_memory(device)
            yield row


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, op: str, impl: str, shape: dict) -> None:
    rehearse = shape["device"] == "cpu"
    impls = impls_for(op, rehearse)
    if impl not in impls or unavailable(impl):
        pytest.skip(unavailable(impl) or f"{impl} does not run {op}")
    run = step(op, impls[impl], *inputs(**shape))
    n, d, v = shape["n"], shape["d"], shape["v"]
    stats = measure(run, shape["device"], Plan(rehearse, 0).timing(), FLOPS_PER_NDV[op] * n * d * v)

    def timed():
        run()
        if not rehearse:
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=2 if rehearse else 10, iterations=1)
    benchmark.extra_info.update(stats)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["fastgpt", "eager", "liger", "torch_chunked"])
@pytest.mark.parametrize("op", OPS)
def test_bench_losses_gpu(benchmark, op, impl):
    benchmark.group = f"{op} bf16 N=16384 d=2048 V=128256"
    _bench(benchmark, op, impl, GPU_SHAPE)


@pytest.mark.parametrize("impl", ["fastgpt", "eager", "torch_chunked"])
@pytest.mark.parametrize("op", OPS)
def test_bench_losses_cpu_tiny(benchmark, op, impl):
    benchmark.group = f"{op} fp32 tiny CPU"
    _bench(benchmark, op, impl, CPU_SHAPE)
