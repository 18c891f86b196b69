"""Benchmark: one GRPO iteration (rollout + update) of fastgpt vs a plain PyTorch reference, and
LoRA vs full fine-tuning.

Both run the same algorithm on the same random-weight policy and reward model: ``batch / K``
prompts, K samples each, reward-model scores, group-normalised advantages, the policy's and the
frozen reference's log-probs, then one optimizer step per minibatch of the clipped surrogate
plus beta times the k3 KL (token-level mean). They differ in how:

* fastgpt: the GRPO stage itself (:func:`fastgpt.stages.grpo.build_grpo`) — the KV-cache engine
  (packed prefill, finished rows cost nothing), packed varlen forwards, the fused log-prob
  kernel, its trainer step; with ``lora_rank`` > 0 only adapters train and the reference is the
  same weights with adapters off (one copy of the model);
* reference: no KV cache (the whole sequence recomputed for every new token), padded batches,
  full (B, T, V) logits + ``log_softmax``, a frozen copy of the policy as the reference.

Rows: seconds per iteration and its split, tokens/s, CUDA peak memory. The CUDA gpt2-small case
is skipped without a GPU; a tiny CPU case runs everywhere. ``run_grpo_benchmarks()`` returns the
rows for a script.

    python -m pytest benchmarks/bench_grpo.py -s
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fastgpt.checkpoint import save_checkpoint
from fastgpt.config import PRESETS, ModelConfig
from fastgpt.losses import group_advantages, kl_estimate, masked_mean, ppo_policy_loss
from fastgpt.model import GPT
from fastgpt.stages.grpo import GRPOConfig, build_grpo
from fastgpt.tokenizer import ByteTokenizer

from bench_dpo import run_cases
from bench_ppo import TINY, _models, _prompts, _sync
from conftest import peak_memory


# ---------------------------------------------------------------------------------- fastgpt
def fastgpt_iteration(cfg: ModelConfig, batch: int, k: int, mini: int, prompt_len: int, new_tokens: int,
                      device: torch.device, lora_rank: int = 0) -> dict[str, float]:
    policy, rm = _models(cfg, device)
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_checkpoint(root / "sft", model=policy, model_kind="gpt", model_config=cfg, tokenizer=tok, stage="sft")
        save_checkpoint(root / "rm", model=rm, model_kind="scalar", model_config=cfg, tokenizer=tok, stage="reward",
                        extra={"reward_offset": 0.0, "reward_scale": 1.0})
        (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(batch // k, prompt_len)))
        gcfg = GRPOConfig(out_dir=str(root / "run"), sft_checkpoint=str(root / "sft"), reward_checkpoint=str(root / "rm"),
                          prompts=str(root / "p.jsonl"), device=device.type, group_size=k, rollout_batch_size=batch,
                          mini_batch_size=mini, max_new_tokens=new_tokens, missing_eos_penalty=0.0, lora_rank=lora_rank,
                          lora_alpha=2.0 * max(lora_rank, 1), progress=False, resume=False)
        trainer, task = build_grpo(gcfg)
    del policy, rm
    task.next_batch()  # warm-up rollout (allocator, kernels)
    task.queue.clear()
    _sync(device)
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        for _ in range(batch // mini):  # the trainer's own step: one optimizer step per minibatch
            trainer._backward_step()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        total = time.perf_counter() - t0
    stats = task.rollout["stats"]
    gen = stats["response_len"] * batch / stats["gen_tokens_per_s"]
    return {"seconds": total, "generation_s": gen, "scoring_s": stats["rollout_s"] - gen,
            "training_s": total - stats["rollout_s"], "peak_mb": mem["peak_mb"]}


# -------------------------------------------------------------------------------- reference
def reference_iteration(cfg: ModelConfig, batch: int, k: int, mini: int, prompt_len: int, new_tokens: int,
                        device: torch.device, beta: float = 0.04, lr: float = 1e-5) -> dict[str, float]:
    policy, rm = _models(cfg, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, eps=1e-5, weight_decay=0.0)
    tok = ByteTokenizer()
    prompts = torch.tensor([[tok.role_id("user")] + tok.encode(p)[:prompt_len - 3] + [tok.end_id, tok.role_id("assistant")]
                            for p in _prompts(batch // k, prompt_len) for _ in range(k)], device=device)
    P = prompts.shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    with peak_memory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        seq = prompts
        with torch.no_grad():  # generation without a KV cache: recompute everything for each token
            for _ in range(new_tokens):
                logits, _ = policy(seq)
                seq = torch.cat([seq, torch.multinomial(torch.softmax(logits[:, -1].float(), -1), 1, generator=g)], 1)
        _sync(device)
        t_gen = time.perf_counter() - t0

        def logprobs(model: GPT, s: torch.Tensor) -> torch.Tensor:  # full logits + log_softmax
            logits, _ = model(s)
            return torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, s[:, P:, None]).squeeze(-1)

        with torch.no_grad():
            old_logp, ref_logp = logprobs(policy, seq), logprobs(ref, seq)
            adv = group_advantages(rm(seq)[:, -1].float().view(-1, k)).reshape(-1)
            mask = torch.ones_like(old_logp, dtype=torch.bool)
        _sync(device)
        t_score = time.perf_counter() - t0 - t_gen
        for start in range(0, batch, mini):
            sl = slice(start, start + mini)
            lp = logprobs(policy, seq[sl])
            pg, _, _ = ppo_policy_loss(lp, old_logp[sl], adv[sl, None].expand_as(lp), mask[sl], 0.2)
            loss = pg + beta * masked_mean(kl_estimate(lp, ref_logp[sl], "k3"), mask[sl])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        total = time.perf_counter() - t0
    return {"seconds": total, "generation_s": t_gen, "scoring_s": t_score, "training_s": total - t_gen - t_score,
            "peak_mb": mem["peak_mb"]}


def run_grpo_benchmarks(cfg: ModelConfig | None = None, batch: int = 64, k: int = 4, mini: int = 16,
                        prompt_len: int = 32, new_tokens: int = 64, device: str = "cuda", lora_rank: int = 16
                        ) -> list[dict]:
    """One GRPO iteration per implementation; rows: impl, seconds and its split, tokens/s, peak memory."""
    cfg = cfg or ModelConfig(**{**PRESETS["gpt2-small"]["model"], "vocab_size": 320})
    dev = torch.device(device)
    cases = {"fastgpt": lambda: fastgpt_iteration(cfg, batch, k, mini, prompt_len, new_tokens, dev),
             f"fastgpt-lora-r{lora_rank}": lambda: fastgpt_iteration(cfg, batch, k, mini, prompt_len, new_tokens, dev,
                                                                     lora_rank=lora_rank),
             "reference": lambda: reference_iteration(cfg, batch, k, mini, prompt_len, new_tokens, dev)}
    rows = run_cases(cases, {"batch": batch, "group_size": k, "mini_batch": mini, "new_tokens": new_tokens,
                             "device": dev.type}, dev)
    for r in rows:
        if "seconds" in r:
            r["tokens_per_s"] = batch * (prompt_len + new_tokens) / r["seconds"]
    return rows


def _bench(benchmark, rows: list[dict]) -> None:
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        assert "error" not in r, r["error"]
    benchmark.extra_info.update({r["impl"]: {k: r[k] for k in ("seconds", "generation_s", "training_s", "peak_mb")}
                                 for r in rows})


def test_grpo_iteration_cpu_tiny(benchmark):
    rows = run_grpo_benchmarks(TINY, batch=8, k=4, mini=4, prompt_len=12, new_tokens=12, device="cpu", lora_rank=4)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grpo_iteration_gpt2_small_cuda(benchmark):
    rows = run_grpo_benchmarks()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


if __name__ == "__main__":
    for r in (run_grpo_benchmarks() if torch.cuda.is_available()
              else run_grpo_benchmarks(TINY, 8, 4, 4, 12, 12, "cpu", 4)):
        print(r)
