"""Benchmark: generation tokens/s -- fastgpt's KV-cache engine, its decode alternatives, and
Hugging Face ``generate`` -- plus the decode-attention kernel on its own.

All rows run the same random-weight GPT-2 (fastgpt's model exported with
:func:`fastgpt.hf.save_hf_gpt2` and loaded as ``GPT2LMHeadModel``), greedy, equal-length prompts
of 64 tokens, 128 new tokens (no stop token), bf16 on CUDA; batches 1 / 64 / 512.

    fastgpt             ``fastgpt.engine.generate``, its CUDA default: the static decode loop, whose
                        fixed-shape step is replayed from a captured CUDA graph (sampling and stop
                        checks stay eager)
    fastgpt_shrinking   the same with ``decode_loop="shrinking"``: finished rows leave the batch,
                        one host sync per step (the CPU default)
    fastgpt_compiled    the static loop with ``compile_decode=True``: the compiled step, captured
                        (cold compile; only if it fits)
    device_loop         A/B: the same model's prefill + decode steps with the next token fed back
                        on the device -- no host sync until the end (all rows run to the end)
    cuda_graph          A/B: device_loop with each decode step replayed from a captured CUDA graph
                        (the launch overhead of ~100 small kernels per token goes away)
    hf                  transformers' ``generate`` on the exported model

Per row: median seconds of >= 3 full generations after a warm-up one, tokens/s (batch x new
tokens / seconds) and MBU -- the bytes a decode step must read (every weight once + the KV cache
so far) per second over 3.35e12 B/s (H100 SXM HBM3).  The decode-kernel rows time
``decode_attention`` alone at gpt2-small's shape (12 heads x 64, 1024 cached tokens): automatic
split count, one split (no combine), and the reference, with GB/s of K/V read.  The rehearsal
runs a tiny model on the CPU (Triton decode kernel through the interpreter; graph capture needs
CUDA, so cuda_graph runs device_loop's uncaptured step there, and says so).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgpt.kernels as K  # noqa: E402
from fastgpt.config import PRESETS, ModelConfig  # noqa: E402
from fastgpt.engine import SamplingParams, capture_step, decode_autocast, generate  # noqa: E402
from fastgpt.model import GPT  # noqa: E402
from measure import Plan, error_text, free_memory, sync, time_ms  # noqa: E402

PEAK_BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s
TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
IMPLS = ("fastgpt", "fastgpt_shrinking", "device_loop", "cuda_graph", "hf", "fastgpt_compiled")
COMPILE_ESTIMATE_S = 60  # a cold torch.compile(model.decode, dynamic=True)


def _hf_model(model: GPT, dtype: torch.dtype, device: torch.device):
    from transformers import GPT2LMHeadModel
    from fastgpt.hf import save_hf_gpt2
    with tempfile.TemporaryDirectory() as d:
        save_hf_gpt2(model, d)
        return GPT2LMHeadModel.from_pretrained(d, torch_dtype=dtype).to(device).eval()


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float, elem: int) -> float:
    """Bytes one decode step reads: every weight once, plus each row's K and V so far."""
    with torch.device("meta"):  # count parameters without allocating them
        n_params = GPT(cfg).num_params(non_embedding=False)
    kv = 2 * cfg.n_layer * batch * context * cfg.kv_heads * cfg.head_dim
    return (n_params + kv) * elem


# ------------------------------------------------------------------- device-side decode loop
@torch.no_grad()
def device_loop(model: GPT, prompts: list[list[int]], new_tokens: int, graph: bool = False
                ) -> torch.Tensor:
    """Greedy continuation (B, new_tokens) of equal-length prompts with no host sync per step:
    each decode step's argmax is written into a static token buffer the next step reads.  With
    ``graph`` (CUDA only) the step is captured once as a CUDA graph and replayed."""
    device = model.wte.weight.device
    B, P = len(prompts), len(prompts[0])
    cache = model.new_cache(B, P + new_tokens, dtype=torch.bfloat16 if device.type == "cuda" else None)
    rows = torch.arange(B, device=device)
    with decode_autocast(device):
        logits = model.prefill(prompts, cache, rows)
    out = torch.empty(B, new_tokens, dtype=torch.long, device=device)
    token = logits.argmax(-1, keepdim=True)  # (B, 1): the static input of every step
    out[:, 0] = token[:, 0]

    def step() -> None:
        with decode_autocast(device):
            token.copy_(model.decode(token, cache, rows)[:, -1].argmax(-1, keepdim=True))

    if graph and device.type == "cuda":
        step = capture_step(step, cache)  # noqa: F811
        token.copy_(out[:, :1])  # the warm-up step overwrote it
    for i in range(1, new_tokens):
        step()
        out[:, i] = token[:, 0]
    return out


# ------------------------------------------------------------------------------------- rows
def _generation_runner(impl: str, model: GPT, hf, prompts: torch.Tensor, new_tokens: int,
                       device: torch.device) -> Callable[[], None]:
    lists = prompts.tolist()
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    if impl in ("fastgpt", "fastgpt_compiled"):
        return lambda: generate(model, lists, params, decode_loop="static",
                                compile_decode=impl == "fastgpt_compiled")
    if impl == "fastgpt_shrinking":
        return lambda: generate(model, lists, params, decode_loop="shrinking")
    if impl in ("device_loop", "cuda_graph"):
        return lambda: device_loop(model, lists, new_tokens, graph=impl == "cuda_graph")
    ids = prompts.to(device)
    return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)


def generation_rows(plan: Plan, cfg: ModelConfig, batches: tuple[int, ...], prompt_len: int,
                    new_tokens: int) -> Iterator[dict]:
    dev = plan.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = GPT(cfg).to(dev).eval()
    hf = _hf_model(model, dtype, dev)
    model.to(dtype)
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
        for impl in IMPLS:
            row = {"impl": impl, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "dtype": str(dtype).removeprefix("torch.")}
            if impl == "fastgpt_compiled" and (plan.rehearse or not plan.fits(COMPILE_ESTIMATE_S)):
                row["status"] = ("skipped: compile_decode is CUDA-only" if plan.rehearse else
                                 f"skipped: a cold torch.compile (~{COMPILE_ESTIMATE_S} s) does not fit the slice")
                yield row
                continue
            try:
                run = _generation_runner(impl, model, hf, prompts, new_tokens, dev)
                with (K.backend("triton") if plan.rehearse else contextlib.nullcontext()), torch.no_grad():
                    t0 = time.perf_counter()
                    run()  # warm-up: compilation, graph capture, allocator
                    sync(dev)
                    row["first_call_s"] = time.perf_counter() - t0
                    t = time_ms(run, dev, warmup=0, min_runs=1 if plan.rehearse else 3,
                                budget_s=0.0 if plan.rehearse else 1.0)
                seconds = t["ms"] * 1e-3
                row.update(seconds=seconds, runs=t["runs"], tokens_per_s=batch * new_tokens / seconds)
                if dev.type == "cuda":
                    step_bytes = decode_bytes_per_step(cfg, batch, prompt_len + new_tokens / 2, 2)
                    row["mbu"] = step_bytes * new_tokens / seconds / PEAK_BANDWIDTH
            except Exception as exc:  # e.g. OOM at batch 512 must not stop the other rows
                row["error"] = error_text(exc)
            if plan.rehearse:
                row["note"] = "rehearsal: tiny fp32 model on the CPU, Triton decode through the interpreter" + (
                    "; no CUDA: the uncaptured step" if impl in ("cuda_graph", "fastgpt") else "")
            free_memory(dev)
            yield row


def decode_kernel_rows(plan: Plan, batches: tuple[int, ...], heads: int, head_dim: int,
                       context: int) -> Iterator[dict]:
    from fastgpt.kernels.reference import decode_attention_reference
    from fastgpt.kernels.triton_decode import decode_attention_triton, decode_launch, decode_num_splits
    dev = plan.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    for batch in batches:
        gen = torch.Generator(device=dev).manual_seed(batch)
        q = torch.randn(batch, 1, heads, head_dim, device=dev, generator=gen).to(dtype)
        kc, vc = (torch.randn(batch, context, heads, head_dim, device=dev, generator=gen).to(dtype)
                  for _ in range(2))
        lengths = torch.full((batch,), context, device=dev, dtype=torch.int32)
        auto = decode_num_splits(context, batch, heads, dev)
        variants = {"fastgpt": None, "fastgpt_one_split": 1, "reference": "reference"}
        for impl, splits in variants.items():
            row = {"impl": f"decode_attention/{impl}", "batch": batch, "context": context,
                   "heads": heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                   "splits": auto if splits is None else splits}
            if splits == "reference":
                run = lambda: decode_attention_reference(q, kc, vc, lengths)  # noqa: E731
            else:
                run = lambda s=splits: decode_attention_triton(q, kc, vc, lengths, num_splits=s)  # noqa: E731
                cfg, source = decode_launch(head_dim, dtype, dev, context)
                row["config"] = f"{cfg} [{source}]"
            try:
                t = time_ms(run, dev, **plan.timing(), flush_l2=True)
                row.update(ms=t["ms"], runs=t["runs"],
                           kv_gbs=2 * batch * context * heads * head_dim * kc.element_size() / (t["ms"] * 1e-3) / 1e9)
            except Exception as exc:
                row["error"] = error_text(exc)
            if plan.rehearse:
                row["note"] = "rehearsal: fp32 on the CPU, interpreter"
            yield row


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    if plan.rehearse:
        yield from decode_kernel_rows(plan, (2,), 2, 16, 40)
        yield from generation_rows(plan, TINY, (1, 3), 8, 6)
        return
    yield from decode_kernel_rows(plan, (1, 64, 512), 12, 64, 1024)
    yield from generation_rows(plan, ModelConfig(**PRESETS["gpt2-small"]["model"]), (1, 64, 512), 64, 128)


# ------------------------------------------------------------------------------- pytest
def test_device_loop_matches_engine_cpu():
    """The A/B loop computes what the engine computes: same greedy tokens (tiny model, CPU)."""
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    prompts = torch.randint(0, TINY.vocab_size, (3, 5)).tolist()
    ref = generate(model, prompts, SamplingParams(max_new_tokens=7, temperature=0))
    assert device_loop(model, prompts, 7).tolist() == [g.tokens for g in ref]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_loop_matches_device_loop():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**PRESETS["gpt2-small"]["model"], "n_layer": 2})).cuda().eval().to(torch.bfloat16)
    prompts = torch.randint(0, 50000, (4, 16)).tolist()
    assert torch.equal(device_loop(model, prompts, 12, graph=True), device_loop(model, prompts, 12))
