"""Benchmark: one pre-training optimizer step (forward + backward + clip + AdamW) of the real
model, as the trainer runs it.

Cases
    cpu  ``tiny`` preset (4 layers, d=128, byte vocabulary 320), batch 16 x T=256, fp32 -- the demo's
         pre-training step on a laptop-class CPU;
    gpu  ``gpt2-small`` (124M, vocabulary 50304) at T=1024, bf16 autocast, fused AdamW, eager and
         ``torch.compile`` (skipped without CUDA).

Reported per case (``benchmark.extra_info`` / the rows of :func:`run_pretrain_benchmarks`): ms per
step, tokens/s, peak MB (CUDA), and MFU = tokens/s x FLOPs per token / peak, with FLOPs per token
= 6N + 12 L H Q T (``GPT.flops_per_token``; N = every parameter but the learned position table)
and the peak the dense bf16 tensor-core datasheet number of the GPU found
(``fastgpt.trainer.PEAK_BF16_FLOPS``; H100 SXM: 989 TFLOP/s). MFU is not reported on CPU.

    python -m pytest benchmarks/bench_pretrain.py --benchmark-only
    python benchmarks/bench_pretrain.py            # prints the table
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import peak_memory, time_fn  # noqa: E402

from fastgpt.config import build_config  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.stages.pretrain import PretrainConfig  # noqa: E402
from fastgpt.trainer import PEAK_BF16_FLOPS, make_optimizer, peak_flops  # noqa: E402

CUDA = torch.cuda.is_available()
H100_PEAK = PEAK_BF16_FLOPS["H100"]  # 989e12 dense bf16
GPU_BATCH = int(os.environ.get("FASTGPT_BENCH_BATCH", "16"))
CPU_CASE = dict(preset="tiny", vocab_size=320, batch=16, seqlen=256, device="cpu", bf16=False, compile=False)


def gpu_case(compile: bool) -> dict[str, Any]:
    return dict(preset="gpt2-small", vocab_size=50304, batch=GPU_BATCH, seqlen=1024, device="cuda", bf16=True,
                compile=compile)


def make_step(case: dict[str, Any]):
    """(step function, model, tokens per step) for a case, built as the trainer builds it."""
    torch.manual_seed(0)
    cfg = build_config(PretrainConfig, case["preset"], overrides={"model.vocab_size": case["vocab_size"],
                                                                   "model.block_size": case["seqlen"]})
    device = torch.device(case["device"])
    model = GPT(cfg.model).to(device).train()
    opt = make_optimizer(model, cfg, device)  # fused AdamW on CUDA
    run = torch.compile(model) if case["compile"] else model
    B, T = case["batch"], case["seqlen"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, case["vocab_size"], (B, T), device=device, generator=g)
    y = torch.randint(0, case["vocab_size"], (B, T), device=device, generator=g)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["bf16"]):
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, B * T


def measure(case: dict[str, Any], warmup: int | None = None, iters: int | None = None) -> dict[str, Any]:
    """Time a case; returns one table row."""
    device = torch.device(case["device"])
    on_gpu = device.type == "cuda"
    warmup = warmup if warmup is not None else (5 if case["compile"] else 3) if on_gpu else 1
    iters = iters if iters is not None else 20 if on_gpu else 3
    step, model, tokens = make_step(case)
    with peak_memory(device) as mem:
        t = time_fn(step, device, warmup=warmup, iters=iters)
    tps = tokens / t["median_s"]
    fpt = model.flops_per_token(case["seqlen"])
    row = {"case": f"{case['preset']} B={case['batch']} T={case['seqlen']} "
                   f"{'bf16' if case['bf16'] else 'fp32'}{' compiled' if case['compile'] else ''}",
           "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
           "threads": torch.get_num_threads(), "params": model.num_params(),
           "ms_per_step": 1e3 * t["median_s"], "min_ms": 1e3 * t["min_s"], "tokens_per_s": tps,
           "flops_per_token": fpt, "peak_mb": mem["peak_mb"]}
    if on_gpu:
        peak = peak_flops(device)
        row["mfu"] = tps * fpt / peak if peak else None
        row["peak_flops"] = peak
        row["mfu_vs_h100_989T"] = tps * fpt / H100_PEAK
    return row


def run_pretrain_benchmarks(include_cpu: bool = True) -> list[dict[str, Any]]:
    """Rows for the GPU script: gpt2-small eager and compiled on CUDA (if present), tiny on CPU."""
    rows = []
    if CUDA:
        for compile in (False, True):
            rows.append(measure(gpu_case(compile)))
            torch.cuda.empty_cache()
    if include_cpu:
        rows.append(measure(dict(CPU_CASE)))
    return rows


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, case: dict[str, Any]) -> None:
    row = measure(case, iters=1)  # warm-up (and compile) happen here, outside the timed rounds
    step, model, tokens = make_step(case)
    device = torch.device(case["device"])
    step()

    def timed() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"pretrain step {case['preset']}"
    benchmark.pedantic(timed, rounds=3 if device.type == "cpu" else 10, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing to report
        return
    s = benchmark.stats.stats.median
    row.update(ms_per_step=1e3 * s, tokens_per_s=tokens / s)
    if device.type == "cuda":
        peak = row.get("peak_flops")
        row["mfu"] = tokens / s * row["flops_per_token"] / peak if peak else None
        row["mfu_vs_h100_989T"] = tokens / s * row["flops_per_token"] / H100_PEAK
    benchmark.extra_info.update(row)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bench_pretrain_gpu(benchmark, compile):
    _bench(benchmark, gpu_case(compile))


def test_bench_pretrain_cpu_tiny(benchmark):
    _bench(benchmark, dict(CPU_CASE))


if __name__ == "__main__":
    for r in run_pretrain_benchmarks():
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
        print(f"{r['case']:<45} {r['device']:<24} {r['ms_per_step']:9.1f} ms/step  {r['tokens_per_s']:>10,.0f} tok/s"
              f"{mfu}  peak {r['peak_mb']:.0f} MB")
