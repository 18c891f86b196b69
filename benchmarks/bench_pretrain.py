"""Benchmark: one pre-training optimizer step (forward + backward + clip + AdamW) of the real
model, as the trainer runs it.

Cases
    gpu  ``gpt2-small`` (124M, vocabulary 50304) at B 16 x T 1024, bf16 autocast, fused AdamW,
         eager and ``torch.compile`` (the compiled row runs only if its cold compile, estimated
         at ``COMPILE_ESTIMATE_S``, fits what is left of the slice; its compile time is reported)
    cpu  the ``tiny`` preset (4 layers, d=128, byte vocabulary 320), B 16 x T 256, fp32 -- the
         demo's pre-training step on a laptop-class CPU (pytest only)
    rehearsal  a 1-layer, d=32 model, B 2 x T 32, on the Triton kernels through the interpreter;
         "compiled" uses the aot_eager backend and the reference kernels there (Dynamo cannot
         trace the Triton interpreter)

Reported per case: median ms per step over >= 20 CUDA-event-timed steps after warm-up, tokens/s,
peak MB above the model and optimizer state (CUDA allocator; gradients are freed by the step),
MFU = tokens/s x FLOPs per token / peak with FLOPs per token = 6N + 12 L H Q T
(``GPT.flops_per_token``) against both the GPU's datasheet dense bf16 peak
(``fastgpt.trainer.PEAK_BF16_FLOPS``) and 989 TFLOP/s, and the first step's seconds (compile).

    python benchmarks/gpu_check.py --only pretrain
    python -m pytest benchmarks/bench_pretrain.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgpt.kernels as K  # noqa: E402
from fastgpt.config import build_config  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from fastgpt.stages.pretrain import PretrainConfig  # noqa: E402
from fastgpt.trainer import PEAK_BF16_FLOPS, make_optimizer, peak_flops  # noqa: E402
from measure import Plan, error_text, first_call_s, free_memory, peak_mb, time_ms  # noqa: E402

CUDA = torch.cuda.is_available()
H100_PEAK = PEAK_BF16_FLOPS["H100"]  # 989e12 dense bf16
GPU_BATCH = int(os.environ.get("FASTGPT_BENCH_BATCH", "16"))
COMPILE_ESTIMATE_S = 60  # cold inductor compile of gpt2-small forward + backward (a guess: unmeasured)
CPU_CASE = dict(preset="tiny", overrides={}, vocab_size=320, batch=16, seqlen=256, device="cpu",
                bf16=False, compile=False)
REHEARSAL_MODEL = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2}


def gpu_case(compile: bool) -> dict[str, Any]:
    return dict(preset="gpt2-small", overrides={}, vocab_size=50304, batch=GPU_BATCH, seqlen=1024,
                device="cuda", bf16=True, compile=compile)


def rehearsal_case(compile: bool) -> dict[str, Any]:
    # Dynamo cannot trace the Triton interpreter: the compiled rehearsal runs the references.
    return dict(preset="tiny", overrides=REHEARSAL_MODEL, vocab_size=320, batch=2, seqlen=32,
                device="cpu", bf16=False, compile=compile, triton=not compile)


def make_step(case: dict[str, Any]):
    """(step function, model, tokens per step) for a case, built as the trainer builds it."""
    torch.manual_seed(0)
    cfg = build_config(PretrainConfig, case["preset"], overrides={
        **case["overrides"], "model.vocab_size": case["vocab_size"], "model.block_size": case["seqlen"]})
    device = torch.device(case["device"])
    model = GPT(cfg.model).to(device).train()
    opt = make_optimizer(model, cfg, device)  # fused AdamW on CUDA
    run = model
    if case["compile"]:
        run = torch.compile(model, backend="inductor" if device.type == "cuda" else "aot_eager")
    B, T = case["batch"], case["seqlen"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, case["vocab_size"], (B, T), device=device, generator=g)
    y = torch.randint(0, case["vocab_size"], (B, T), device=device, generator=g)
    def kernels():  # the Triton kernels on any device (the interpreter on a CPU) when asked
        return K.backend("triton") if case.get("triton") else contextlib.nullcontext()

    def step() -> None:
        with kernels(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["bf16"]):
            _, loss = run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, B * T


def case_name(case: dict[str, Any]) -> str:
    return (f"{case['preset']}{'-reduced' if case['overrides'] else ''} B={case['batch']} "
            f"T={case['seqlen']} {'bf16' if case['bf16'] else 'fp32'}"
            f"{' compiled' if case['compile'] else ''}")


def measure(case: dict[str, Any], timing: dict) -> dict[str, Any]:
    """Time a case; returns one table row."""
    device = torch.device(case["device"])
    step, model, tokens = make_step(case)
    first = first_call_s(step, device)  # torch.compile / Triton compile, allocator, optimizer state
    t = time_ms(step, device, **timing)
    peak = peak_mb(step, device)
    tps = tokens / (t["ms"] * 1e-3)
    fpt = model.flops_per_token(case["seqlen"])
    row = {"case": case_name(case), "params": model.num_params(), "ms_per_step": t["ms"],
           "runs": t["runs"], "tokens_per_s": tps, "flops_per_token": fpt,
           "flop_formula": "6N + 12*L*H*Q*T per token", "peak_mb": peak, "first_step_s": first,
           "compile_s": max(0.0, first - t["ms"] * 1e-3) if case["compile"] else None}
    if device.type == "cuda":
        peak_rate = peak_flops(device)
        row["mfu"] = tps * fpt / peak_rate if peak_rate else None
        row["mfu_vs_989T"] = tps * fpt / H100_PEAK
    return row


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    for compile in (False, True):
        case = rehearsal_case(compile) if plan.rehearse else gpu_case(compile)
        if compile and not plan.rehearse and not plan.fits(COMPILE_ESTIMATE_S):
            yield {"case": case_name(case), "status": f"skipped: a cold torch.compile (~{COMPILE_ESTIMATE_S} s) "
                                                     f"does not fit the {plan.left():.0f} s left"}
            continue
        try:
            row = measure(case, plan.timing())
        except Exception as exc:
            row = {"case": case_name(case), "error": error_text(exc)}
        if plan.rehearse:
            row["note"] = "rehearsal: reduced tiny model, fp32 on the CPU, " + (
                "torch.compile with aot_eager on the reference kernels" if compile
                else "Triton kernels through the interpreter")
        free_memory(case["device"])
        yield row


# ------------------------------------------------------------------------ pytest-benchmark
def _bench(benchmark, case: dict[str, Any]) -> None:
    device = torch.device(case["device"])
    row = measure(case, Plan(rehearse=device.type == "cpu", deadline=0).timing())
    step, _, tokens = make_step(case)
    step()

    def timed() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = f"pretrain step {case['preset']}"
    benchmark.pedantic(timed, rounds=2 if device.type == "cpu" else 10, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(row)


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bench_pretrain_gpu(benchmark, compile):
    _bench(benchmark, gpu_case(compile))


def test_bench_pretrain_cpu_tiny(benchmark):
    _bench(benchmark, dict(CPU_CASE))
