"""Benchmark: one DPO optimizer step of fastgpt vs a plain PyTorch reference, and LoRA vs full
fine-tuning memory.

Both minimise the same sigmoid DPO loss (beta 0.1) on the same random-weight model and the same
``pairs`` (prompt, chosen, rejected) of varied lengths per step, gradient norm clipped to 1.0 on
both sides. They differ in how:

* fastgpt: the DPO stage's own task and trainer step (:class:`fastgpt.stages.dpo.DPOTask`) --
  every response packed once into varlen rows (no padding inside a row), per-token log-probs
  from the fused log-prob kernel (no (tokens x vocabulary) logits kept for backward), reference
  log-probs precomputed once (``precompute_ref``, the default); ``fastgpt-lora-rR`` trains
  rank-R adapters only, its reference the same weights with the adapters off;
* reference: the usual recipe -- chosen and rejected right-padded to the longest sequence of the
  batch, full (B, T, V) logits, ``log_softmax`` + ``gather``, a frozen copy of the model run
  every step for the reference log-probs, torch's AdamW.

Reported per implementation: median ms per step (:func:`measure.time_ms`), real tokens/s (both
sides of every pair), ``held_mb`` (CUDA memory held between steps: weights, the reference copy,
optimizer state) and ``step_peak_mb`` (the step's peak above that), and the speed-up over the
reference. GPU: gpt2-small (vocabulary 50,304) at a 512-token context, 16 pairs. The rehearsal
and the CPU pytest case run a tiny fp32 model with the reference kernels.

    python benchmarks/gpu_check.py --only dpo
    python -m pytest benchmarks/bench_dpo.py -s
"""
from __future__ import annotations

import copy
import tempfile
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from fastgpt.config import PRESETS, ModelConfig
from fastgpt.data import first_fit
from fastgpt.losses import ranking_pairs
from fastgpt.model import GPT
from fastgpt.stages.common import Policy, add_lora, reference_model
from fastgpt.stages.dpo import DPOConfig, DPOTask, attach_reference_logprobs
from fastgpt.stages.reward import RankedGroup, response_labels
from fastgpt.tokenizer import ByteTokenizer
from fastgpt.trainer import Trainer
from measure import Plan, error_text, free_memory, peak_mb, record_rows, time_ms

TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
GPU_MODEL = ModelConfig(**{**PRESETS["gpt2-small"]["model"], "block_size": 512})
GRAD_CLIP = 1.0
Pairs = list[tuple[list[int], list[int], list[int]]]


def make_pairs(cfg: ModelConfig, n: int, prompt_len: int, seed: int = 0) -> Pairs:
    """(prompt, chosen, rejected) random ids; response lengths vary between a quarter and all of
    what the context leaves, as real answers do."""
    g = torch.Generator().manual_seed(seed)
    room = cfg.block_size - prompt_len
    out = []
    for _ in range(n):
        prompt = torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist()
        lens = torch.randint(max(1, room // 4), room + 1, (2,), generator=g).tolist()
        out.append((prompt, *(torch.randint(0, cfg.vocab_size, (k,), generator=g).tolist() for k in lens)))
    return out


def _model(cfg: ModelConfig, device: torch.device) -> GPT:
    torch.manual_seed(0)
    return GPT(cfg).to(device)


def real_tokens(pairs: Pairs) -> int:
    return sum(2 * len(p) + len(c) + len(w) for p, c, w in pairs)


# ---------------------------------------------------------------------------------- fastgpt
def fastgpt_step(cfg: ModelConfig, pairs: Pairs, device: torch.device, lora_rank: int = 0) -> Callable[[], None]:
    """One optimizer step of the DPO stage's task on its trainer, the step's batch always ``pairs``."""
    groups = [RankedGroup([(p + r, response_labels(len(p), r)) for r in (c, w)], ranking_pairs([0, 1]))
              for p, c, w in pairs]
    rows = len(first_fit([len(p) + len(r) for p, c, w in pairs for r in (c, w)], None, cfg.block_size)[1])
    with tempfile.TemporaryDirectory() as d:
        dcfg = DPOConfig(out_dir=d, device=device.type, batch_size=rows, max_steps=10**6, lr=1e-6, warmup_steps=0,
                         lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1), grad_clip=GRAD_CLIP,
                         progress=False, resume=False)
        policy = _model(cfg, device)
        ref = reference_model(add_lora(policy, dcfg, "bench"))
        attach_reference_logprobs(ref, groups, rows, cfg.block_size, 0, device, dcfg.dtype)
        task = DPOTask(dcfg, groups, [], ref, 0, cfg.block_size, device)
        trainer = Trainer(dcfg, Policy(policy), task, stage="dpo", tokenizer=ByteTokenizer(), model_kind="policy")

    def step() -> None:
        trainer._backward_step()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), GRAD_CLIP)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


# -------------------------------------------------------------------------------- reference
def reference_step(cfg: ModelConfig, pairs: Pairs, device: torch.device, beta: float = 0.1) -> Callable[[], None]:
    policy = _model(cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    seqs = [(p + r, len(p)) for p, c, w in pairs for r in (c, w)]  # chosen, rejected, chosen, ...
    T = max(len(s) for s, _ in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (s, p) in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
        labels[i, p - 1:len(s) - 1] = torch.tensor(s[p:])
    idx, labels = idx.to(device), labels.to(device)
    mask = labels != -100
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def seq_logps(model: GPT) -> torch.Tensor:
        logits, _ = model(idx)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * mask).sum(-1)

    def step() -> None:
        with autocast:
            with torch.no_grad():
                ref_lp = seq_logps(ref)
            h = seq_logps(policy) - ref_lp
            loss = -F.logsigmoid(beta * (h[0::2] - h[1::2])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------- rows
def run_dpo_benchmarks(cfg: ModelConfig, n_pairs: int, prompt_len: int, device: str, lora_rank: int,
                       timing: dict) -> Iterator[dict]:
    """One row per implementation, the reference first (the others' speed-up is over it)."""
    dev = torch.device(device)
    pairs = make_pairs(cfg, n_pairs, prompt_len)
    builders = {"reference": lambda: reference_step(cfg, pairs, dev),
                "fastgpt": lambda: fastgpt_step(cfg, pairs, dev),
                f"fastgpt-lora-r{lora_rank}": lambda: fastgpt_step(cfg, pairs, dev, lora_rank)}
    reference_ms = None
    for impl, build in builders.items():
        row = {"impl": impl, "pairs": n_pairs, "prompt_len": prompt_len, "block": cfg.block_size,
               "vocab": cfg.vocab_size, "layers": cfg.n_layer, "width": cfg.n_embd}
        try:
            step = build()
            step()  # allocator, optimizer state, kernels
            row["held_mb"] = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
            t = time_ms(step, dev, **timing)
            row.update(ms_per_step=t["ms"], runs=t["runs"], tokens_per_s=real_tokens(pairs) / (t["ms"] * 1e-3),
                       step_peak_mb=peak_mb(step, dev))
            if impl == "reference":
                reference_ms = t["ms"]
            elif reference_ms:
                row["speedup_vs_reference"] = reference_ms / t["ms"]
            del step
        except Exception as exc:
            row["error"] = error_text(exc)
        free_memory(dev)
        yield row


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    if not plan.rehearse:
        yield from run_dpo_benchmarks(GPU_MODEL, 16, 64, "cuda", 16, plan.timing())
        return
    for row in run_dpo_benchmarks(TINY, 8, 16, "cpu", 4, plan.timing()):
        yield {**row, "note": "rehearsal: tiny fp32 model on the CPU, reference kernels"}


def test_dpo_step_cpu_tiny(benchmark):
    rows = list(run_dpo_benchmarks(TINY, 8, 16, "cpu", 4, Plan(rehearse=True, deadline=0).timing()))
    record_rows(benchmark, rows, positive=("ms_per_step", "tokens_per_s"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpo_step_gpt2_small_cuda(benchmark):
    rows = list(run_dpo_benchmarks(GPU_MODEL, 16, 64, "cuda", 16, Plan(rehearse=False, deadline=0).timing()))
    record_rows(benchmark, rows)
