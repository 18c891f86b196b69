"""Benchmarks: one SFT step and one reward-model step, fastgpt vs a plain PyTorch reference.

    fastgpt    packed varlen rows (``pack_rows`` + ``cu_seqlens``), fastgpt.kernels attention and
               the fused linear cross-entropy (no full logits), as the stages train
    reference  the same weights run the way a plain PyTorch trainer would: one right-padded row per
               sequence, eager attention (softmax(QK^T)V with a causal mask), full (B, T, V) logits
               and F.cross_entropy / a K-wise loss on last-token scores

A step is forward + backward (no optimizer: it is the same for both). Reported per case: median
ms over >= 20 CUDA-event-timed steps after warm-up, peak MB above the model (CUDA allocator;
gradients are dropped by the step), real (non-pad) tokens/s and the padded batch's share of real
tokens.  The CUDA cases (GPT-2 small, bf16, sequences of 64..1024 tokens) skip without a GPU; a
tiny CPU case runs everywhere (in the gpu_check rehearsal, fastgpt's side runs the Triton kernels
through the interpreter).

    python benchmarks/gpu_check.py --only sft_reward
    python -m pytest benchmarks/bench_sft_reward.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgpt.kernels as K  # noqa: E402
from fastgpt.config import ModelConfig  # noqa: E402
from fastgpt.data import IGNORE_INDEX, pack_rows  # noqa: E402
from fastgpt.losses import ranking_loss, ranking_pairs  # noqa: E402
from fastgpt.model import GPT, ScalarModel  # noqa: E402
from measure import Plan, error_text, free_memory, peak_mb, time_ms  # noqa: E402

CASES = {
    "cpu-tiny": dict(model=dict(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32),
                     n_seqs=16, min_len=8, device="cpu", dtype=None, k=4),
    "rehearsal": dict(model=dict(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32),
                      n_seqs=4, min_len=4, device="cpu", dtype=None, k=2),
    "cuda-gpt2-small": dict(model=dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
                            n_seqs=32, min_len=64, device="cuda", dtype=torch.bfloat16, k=4),
}


def _data(case: dict, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Sequences of random lengths; the first third of each is "prompt" (not trained on)."""
    rng = random.Random(seed)
    T, V = case["model"]["block_size"], case["model"]["vocab_size"]
    out = []
    for _ in range(case["n_seqs"]):
        n = rng.randint(case["min_len"], T)
        ids = [rng.randrange(V) for _ in range(n + 1)]
        labels = [IGNORE_INDEX if t < n // 3 else ids[t + 1] for t in range(n)]
        out.append((ids[:n], labels))
    return out


def _padded(data, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(ids) for ids, _ in data)
    idx = torch.zeros(len(data), T, dtype=torch.long)
    labels = torch.full((len(data), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, lab) in enumerate(data):
        idx[r, :len(ids)], labels[r, :len(ids)] = torch.tensor(ids), torch.tensor(lab)
    lengths = torch.tensor([len(ids) for ids, _ in data])
    return idx.to(device), labels.to(device), lengths.to(device)


def reference_hidden(gpt: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The GPT's forward in plain PyTorch with eager attention (learned positions; right padding
    needs only the causal mask)."""
    B, T = idx.shape
    x = gpt.drop(gpt.wte(idx) + gpt.wpe(torch.arange(T, device=idx.device)))
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    for blk in gpt.blocks:
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).view(B, T, -1, a.head_dim).split([a.n_head, a.n_kv_head, a.n_kv_head], 2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.repeat_interleave(a.n_head // a.n_kv_head, 1) for t in (k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + blk.drop(a.proj(y))
        x = x + blk.drop(blk.mlp(blk.norm2(x)))
    return gpt.norm_f(x)


def _steps(case: dict, stage: str, impl: str, seed: int = 0, triton: bool = False
           ) -> tuple[Callable[[], None], int, float]:
    """(step function, real tokens per step, real share of the padded batch); ``triton`` runs
    fastgpt's side on the Triton kernels whatever the device (the interpreter on a CPU)."""
    device = case["device"]
    torch.manual_seed(seed)
    cfg = ModelConfig(**case["model"])
    data = _data(case, seed)
    T = cfg.block_size
    n_real = sum(len(ids) for ids, _ in data)
    padded_share = n_real / (len(data) * max(len(ids) for ids, _ in data))
    autocast = (torch.autocast("cuda", dtype=case["dtype"]) if case["dtype"] is not None
                else contextlib.nullcontext())
    if stage == "sft":
        model = GPT(cfg).to(device)
        if impl == "fastgpt":
            rows = math.ceil(n_real / T) + 2
            batch, used = pack_rows(data, rows, T, pad_id=0)
            assert used == len(data)
            b = batch.to(device)

            def loss_fn():
                return model(b.idx, b.labels, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen)[1]
        else:
            idx, labels, _ = _padded(data, device)

            def loss_fn():
                logits = model.lm_head(reference_hidden(model, idx))
                return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))
    else:
        model = ScalarModel(cfg).to(device)
        k = case["k"]
        n_prompts = len(data) // k
        pairs = [(p * k + b, p * k + w, p) for p in range(n_prompts) for b, w in ranking_pairs(list(range(k)))]
        better, worse, prompt = (torch.tensor(c, device=device) for c in zip(*pairs))
        data = data[:n_prompts * k]
        if impl == "fastgpt":
            rows = math.ceil(n_real / T) + 2
            batch, _ = pack_rows([(ids, None) for ids, _ in data], rows, T, pad_id=0)
            b = batch.to(device)
            last = b.last_positions()

            def loss_fn():
                scores = model(b.idx, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen).reshape(-1)[last]
                return ranking_loss(scores, better, worse, prompt, n_prompts)[0]
        else:
            idx, _, lengths = _padded(data, device)

            def loss_fn():
                values = model.head(reference_hidden(model.gpt, idx)).squeeze(-1).float()
                scores = values[torch.arange(len(data), device=device), lengths - 1]
                return ranking_loss(scores, better, worse, prompt, n_prompts)[0]

    def kernels():
        return K.backend("triton") if triton and impl == "fastgpt" else contextlib.nullcontext()

    def step() -> None:
        with kernels(), autocast:
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step, n_real, padded_share


def measure(case_name: str, stage: str, impl: str, timing: dict, triton: bool = False) -> dict:
    """Median step time, peak memory and real tokens/s of one case."""
    case = CASES[case_name]
    step, n_real, share = _steps(case, stage, impl, triton=triton)
    step()  # warm-up: compilation, allocator
    t = time_ms(step, case["device"], **timing)
    return {"case": case_name, "stage": stage, "impl": impl, "ms": t["ms"], "runs": t["runs"],
            "real_tokens_per_s": n_real / (t["ms"] * 1e-3), "real_tokens": n_real,
            "padded_real_share": share, "peak_mb": peak_mb(step, case["device"])}


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    name = "rehearsal" if plan.rehearse else "cuda-gpt2-small"
    for stage in ("sft", "reward"):
        for impl in ("fastgpt", "reference"):
            try:
                row = measure(name, stage, impl, plan.timing(), triton=plan.rehearse)
            except Exception as exc:
                row = {"case": name, "stage": stage, "impl": impl, "error": error_text(exc)}
            if plan.rehearse:
                row["note"] = "rehearsal: tiny fp32 model on the CPU" + (
                    ", Triton kernels through the interpreter" if impl == "fastgpt" else "")
            free_memory(CASES[name]["device"])
            yield row


# --------------------------------------------------------------------------- pytest
@pytest.mark.parametrize("impl", ["fastgpt", "reference"])
@pytest.mark.parametrize("stage", ["sft", "reward"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_step(benchmark, case_name, stage, impl):
    case = CASES[case_name]
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    step, n_real, share = _steps(case, stage, impl)
    cuda = case["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(lambda: (step(), sync()), rounds=5, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a smoke test, nothing to report
        return
    benchmark.extra_info.update(real_tokens=n_real, padded_real_share=share,
                                real_tokens_per_s=n_real / benchmark.stats.stats.median,
                                peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def test_reference_matches_fastgpt_loss():
    """Both paths compute the same SFT loss (fp32, CPU), so the timings compare like with like."""
    case = CASES["cpu-tiny"]
    torch.manual_seed(0)
    cfg = ModelConfig(**case["model"])
    model = GPT(cfg)
    data = _data(case)
    batch, _ = pack_rows(data, 16, cfg.block_size, 0)
    with torch.no_grad():
        _, packed = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        idx, labels, _ = _padded(data, "cpu")
        logits = model.lm_head(reference_hidden(model, idx))
    ref = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
