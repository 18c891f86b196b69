"""Benchmark: one GRPO iteration (rollout + update) of fastgpt vs a plain PyTorch reference, and
LoRA vs full fine-tuning.

Both run the same algorithm on the same random-weight policy and reward model: ``batch / K``
prompts, K samples each, reward-model scores, group-normalised advantages, the policy's and the
frozen reference's log-probs, then one optimizer step per minibatch of the clipped surrogate
plus beta times the k3 KL (token-level mean), gradient norm clipped to 1.0 on both sides. They
differ in how:

* fastgpt: the GRPO stage itself (:func:`fastgpt.stages.grpo.build_grpo`) -- the KV-cache engine
  (packed prefill, finished rows cost nothing), packed varlen forwards, the fused log-prob
  kernel, its trainer step; ``fastgpt-lora-rR`` trains rank-R adapters only, its reference the
  same weights with adapters off (one copy of the model);
* reference: no KV cache (the whole sequence recomputed for every new token), padded batches,
  full (B, T, V) logits + ``log_softmax``, a frozen copy of the policy as the reference.

Reported: the median of ``iterations`` iterations after a warm-up one in seconds and its split
(generation / scoring / training), tokens/s, ``held_mb`` (CUDA memory held between iterations:
weights, reference and reward model, optimizer state) and ``peak_mb`` (one iteration's peak
above that), and the speed-up over the reference. GPU: gpt2-small shape (vocabulary 320, byte
tokens, as the PPO benchmark), 8 prompts x 4 samples, minibatch 16, 32-token prompts, 32 new
tokens. The rehearsal runs a tiny fp32 model on the CPU with the reference kernels.

    python benchmarks/gpu_check.py --only grpo
    python -m pytest benchmarks/bench_grpo.py -s
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from typing import Callable, Iterator

import pytest
import torch

from bench_ppo import (GRAD_CLIP, TINY, _models, build_stage, reference_generate, reference_logprobs,
                       reference_prompts, timed_iteration)
from fastgpt.config import PRESETS, ModelConfig
from fastgpt.losses import group_advantages, kl_estimate, masked_mean, ppo_policy_loss
from fastgpt.model import GPT
from fastgpt.stages.grpo import GRPOConfig, build_grpo
from measure import Plan, error_text, free_memory, record_rows, sync



# ---------------------------------------------------------------------------------- fastgpt
def fastgpt_iteration(cfg: ModelConfig, batch: int, k: int, mini: int, prompt_len: int, new_tokens: int,
                      device: torch.device, lora_rank: int = 0) -> Callable[[], dict[str, float]]:
    """A callable running one GRPO iteration through fastgpt's stage code, timed and split."""
    trainer, task = build_stage(build_grpo, GRPOConfig, cfg, device, batch // k, prompt_len, group_size=k,
                                rollout_batch_size=batch, mini_batch_size=mini, max_new_tokens=new_tokens,
                                lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1))
    return timed_iteration(trainer, task, batch // mini, batch, device)


# -------------------------------------------------------------------------------- reference
def reference_iteration(cfg: ModelConfig, batch: int, k: int, mini: int, prompt_len: int, new_tokens: int,
                        device: torch.device, beta: float = 0.04, lr: float = 1e-5) -> Callable[[], dict[str, float]]:
    """A callable running one plain-PyTorch GRPO iteration, timed and split."""
    policy, rm = _models(cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-5, weight_decay=0.0)
    prompts = reference_prompts(batch, prompt_len, device, repeat=k)
    P = prompts.shape[1]
    g = torch.Generator(device=device).manual_seed(0)

    def logprobs(model: GPT, s: torch.Tensor) -> torch.Tensor:
        return reference_logprobs(model, s, P)

    def iteration() -> dict[str, float]:
        sync(device)
        t0 = time.perf_counter()
        seq = reference_generate(policy, prompts, new_tokens, g)
        sync(device)
        t_gen = time.perf_counter() - t0
        with torch.no_grad():
            old_logp, ref_logp = logprobs(policy, seq), logprobs(ref, seq)
            adv = group_advantages(rm(seq)[:, -1].float().view(-1, k)).reshape(-1)
            mask = torch.ones_like(old_logp, dtype=torch.bool)
        sync(device)
        t_score = time.perf_counter() - t0 - t_gen
        for start in range(0, batch, mini):
            sl = slice(start, start + mini)
            lp = logprobs(policy, seq[sl])
            pg, _, _ = ppo_policy_loss(lp, old_logp[sl], adv[sl, None].expand_as(lp), mask[sl], 0.2)
            loss = pg + beta * masked_mean(kl_estimate(lp, ref_logp[sl], "k3"), mask[sl])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        total = time.perf_counter() - t0
        return {"seconds": total, "generation_s": t_gen, "scoring_s": t_score, "training_s": total - t_gen - t_score,
                "response_len": float(new_tokens)}

    return iteration


# ------------------------------------------------------------------------------------- rows
def run_grpo_benchmarks(cfg: ModelConfig, batch: int, k: int, mini: int, prompt_len: int, new_tokens: int,
                        device: str, lora_rank: int, iterations: int) -> Iterator[dict]:
    """Per implementation, the reference first: medians of ``iterations`` GRPO iterations after a
    warm-up one, memory held and one iteration's peak."""
    dev = torch.device(device)
    builders = {"reference": lambda: reference_iteration(cfg, batch, k, mini, prompt_len, new_tokens, dev),
                "fastgpt": lambda: fastgpt_iteration(cfg, batch, k, mini, prompt_len, new_tokens, dev),
                f"fastgpt-lora-r{lora_rank}": lambda: fastgpt_iteration(cfg, batch, k, mini, prompt_len, new_tokens,
                                                                        dev, lora_rank)}
    reference_s = None
    for impl, build in builders.items():
        row = {"impl": impl, "batch": batch, "group_size": k, "mini_batch": mini, "prompt_len": prompt_len,
               "new_tokens": new_tokens, "grad_clip": GRAD_CLIP}
        try:
            iteration = build()
            row["first_iteration_s"] = iteration()["seconds"]  # warm-up: compilation, allocator, optimizer state
            if dev.type == "cuda":
                gc.collect()
                row["held_mb"] = torch.cuda.memory_allocated(dev) / 2**20
                torch.cuda.reset_peak_memory_stats(dev)
            runs = [iteration() for _ in range(iterations)]
            if dev.type == "cuda":
                row["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 - row["held_mb"]
            row.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
            row.update(iterations=iterations, tokens_per_s=batch * (prompt_len + row["response_len"]) / row["seconds"],
                       generation_share=row["generation_s"] / row["seconds"])
            if impl == "reference":
                reference_s = row["seconds"]
            elif reference_s:
                row["speedup_vs_reference"] = reference_s / row["seconds"]
            del iteration
        except Exception as exc:
            row["error"] = error_text(exc)
        free_memory(dev)
        yield row


GPU_CASE = dict(cfg=ModelConfig(**{**PRESETS["gpt2-small"]["model"], "vocab_size": 320}), batch=32, k=4, mini=16,
                prompt_len=32, new_tokens=32, device="cuda", lora_rank=16, iterations=3)
CPU_CASE = dict(cfg=TINY, batch=8, k=4, mini=4, prompt_len=12, new_tokens=12, device="cpu", lora_rank=4, iterations=1)


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    if not plan.rehearse:
        yield from run_grpo_benchmarks(**GPU_CASE)
        return
    for row in run_grpo_benchmarks(**CPU_CASE):
        yield {**row, "note": "rehearsal: tiny fp32 model on the CPU, reference kernels"}


def test_grpo_iteration_cpu_tiny(benchmark):
    rows = list(run_grpo_benchmarks(**CPU_CASE))
    record_rows(benchmark, rows, positive=("training_s", "generation_s"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grpo_iteration_gpt2_small_cuda(benchmark):
    rows = list(run_grpo_benchmarks(**GPU_CASE))
    record_rows(benchmark, rows)
