"""Benchmark: one PPO iteration (rollout + update) of fastgpt vs a plain PyTorch reference.

Both run the same algorithm on the same random-weight models at the same batch: generate
``batch`` responses, score them with a reward model, per-token KL penalty, GAE, then one
optimizer step per minibatch of clipped policy + value loss, with the gradient norm clipped to
1.0 on both sides (fastgpt: the trainer's ``grad_clip``; reference: ``clip_grad_norm_``).  They
differ in how:

* fastgpt: the KV-cache engine (packed prefill, finished rows cost nothing), packed varlen
  forwards and the fused log-prob kernel, its trainer step;
* reference: no KV cache (the whole sequence is recomputed for every new token), padded batches,
  full (B, T, V) logits + log_softmax, torch's AdamW.

Reported: the median of >= 3 iterations (after a warm-up one) in seconds, its split (generation
/ scoring / training, medians) and the generation share.  GPU: gpt2-small shape (vocabulary
320, byte tokens), batch 64, minibatch 16, 32-token prompts, 64 new tokens.  The rehearsal runs
a tiny model on the CPU with the reference kernels (the interpreter would take minutes here;
the kernels PPO uses are rehearsed in the losses and generation sections).

    python benchmarks/gpu_check.py --only ppo
    python -m pytest benchmarks/bench_ppo.py -s
"""
from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from fastgpt.checkpoint import save_checkpoint
from fastgpt.config import PRESETS, ModelConfig
from fastgpt.losses import gae, kl_estimate, ppo_policy_loss, ppo_value_loss, whiten
from fastgpt.model import GPT, ScalarModel
from fastgpt.stages.ppo import PPOConfig, build_ppo
from fastgpt.tokenizer import ByteTokenizer
from measure import Plan, error_text, free_memory, record_rows, sync

TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
GRAD_CLIP = 1.0


def _models(cfg: ModelConfig, device: torch.device) -> tuple[GPT, ScalarModel]:
    torch.manual_seed(0)
    return GPT(cfg).to(device), ScalarModel(cfg).to(device)


def _prompts(n: int, length: int) -> list[str]:
    return ["x" * (length - 4) + f"{i:03d}"[-3:] for i in range(n)]  # byte prompts of equal length


# ---------------------------------------------------------------------------------- fastgpt
def build_stage(build: Callable, config: Callable, cfg: ModelConfig, device: torch.device, n_prompts: int,
                prompt_len: int, **settings) -> tuple:
    """``build(config(...))`` of an on-policy stage (PPO, GRPO) on random-weight SFT and reward
    checkpoints and ``n_prompts`` byte prompts, written to a folder that is gone afterwards."""
    policy, rm = _models(cfg, device)
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_checkpoint(root / "sft", model=policy, model_kind="gpt", model_config=cfg, tokenizer=tok, stage="sft")
        save_checkpoint(root / "rm", model=rm, model_kind="scalar", model_config=cfg, tokenizer=tok, stage="reward",
                        extra={"reward_offset": 0.0, "reward_scale": 1.0})
        (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(n_prompts, prompt_len)))
        return build(config(out_dir=str(root / "run"), sft_checkpoint=str(root / "sft"),
                            reward_checkpoint=str(root / "rm"), prompts=str(root / "p.jsonl"),
                            eval_prompts=str(root / "p.jsonl"), device=device.type, missing_eos_penalty=0.0,
                            progress=False, resume=False, grad_clip=GRAD_CLIP, **settings))


def timed_iteration(trainer: Any, task: Any, steps: int, batch: int, device: torch.device
                    ) -> Callable[[], dict[str, float]]:
    """A callable running one iteration of an on-policy stage: a fresh rollout, then ``steps``
    trainer steps (gradient clipping included), timed and split from the rollout's own stats."""
    def iteration() -> dict[str, float]:
        task.queue.clear()  # the first minibatch rolls out afresh
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer._backward_step()
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), GRAD_CLIP)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        sync(device)
        total = time.perf_counter() - t0
        stats = task.rollout["stats"]
        gen = stats["response_len"] * batch / stats["gen_tokens_per_s"]
        return {"seconds": total, "generation_s": gen, "scoring_s": stats["rollout_s"] - gen,
                "training_s": total - stats["rollout_s"], "response_len": stats["response_len"]}

    return iteration


def fastgpt_iteration(cfg: ModelConfig, batch: int, mini: int, prompt_len: int, new_tokens: int,
                      device: torch.device) -> Callable[[], dict[str, float]]:
    """A callable running one PPO iteration through fastgpt's stage code, timed and split."""
    trainer, task = build_stage(build_ppo, PPOConfig, cfg, device, batch, prompt_len, rollout_batch_size=batch,
                                mini_batch_size=mini, ppo_epochs=1, max_new_tokens=new_tokens)
    return timed_iteration(trainer, task, batch // mini, batch, device)


# -------------------------------------------------------------------------------- reference
def reference_prompts(batch: int, prompt_len: int, device: torch.device, repeat: int = 1) -> torch.Tensor:
    """The benchmark prompts through the chat template, each ``repeat`` times in a row, (B, P)."""
    tok = ByteTokenizer()
    return torch.tensor([[tok.role_id("user")] + tok.encode(p)[:prompt_len - 3] + [tok.end_id, tok.role_id("assistant")]
                         for p in _prompts(batch // repeat, prompt_len) for _ in range(repeat)], device=device)


def reference_generate(policy: GPT, prompts: torch.Tensor, new_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Plain sampling at temperature 1 without a KV cache: everything recomputed for each token."""
    seq = prompts
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = policy(seq)
            probs = torch.softmax(logits[:, -1].float(), -1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], 1)
    return seq


def reference_logprobs(model: GPT, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Per-token log-probs of the response tokens from full logits and log_softmax, (B, T)."""
    logits, _ = model(seq)
    lp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
    return lp.gather(-1, seq[:, prompt_len:, None]).squeeze(-1)


def reference_iteration(cfg: ModelConfig, batch: int, mini: int, prompt_len: int, new_tokens: int,
                        device: torch.device, beta: float = 0.05, lr: float = 1e-5
                        ) -> Callable[[], dict[str, float]]:
    """A callable running one plain-PyTorch PPO iteration, timed and split."""
    policy, rm = _models(cfg, device)
    ref, value = copy.deepcopy(policy).eval(), copy.deepcopy(rm)
    params = list(policy.parameters()) + list(value.parameters())
    opt = torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0)
    prompts = reference_prompts(batch, prompt_len, device)
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
            old_values = value(seq)[:, P - 1:-1]
            score = rm(seq)[:, -1]
            mask = torch.ones_like(old_logp, dtype=torch.bool)
            rewards = -beta * kl_estimate(old_logp, ref_logp)
            rewards[:, -1] += score
            adv, returns = gae(rewards, old_values, mask, 1.0, 0.95)
            adv = whiten(adv, mask)
        sync(device)
        t_score = time.perf_counter() - t0 - t_gen
        for start in range(0, batch, mini):
            sl = slice(start, start + mini)
            s = seq[sl]
            pg, _, _ = ppo_policy_loss(logprobs(policy, s), old_logp[sl], adv[sl], mask[sl], 0.2)
            vf, _ = ppo_value_loss(value(s)[:, P - 1:-1], old_values[sl], returns[sl], mask[sl], 0.2)
            (pg + 0.1 * vf).backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        total = time.perf_counter() - t0
        return {"seconds": total, "generation_s": t_gen, "scoring_s": t_score,
                "training_s": total - t_gen - t_score, "response_len": float(new_tokens)}

    return iteration


BUILDERS = {"fastgpt": fastgpt_iteration, "reference": reference_iteration}


def run_ppo_benchmarks(cfg: ModelConfig | None = None, batch: int = 64, mini: int = 16, prompt_len: int = 32,
                       new_tokens: int = 64, device: str = "cuda", iterations: int = 3,
                       impls: tuple[str, ...] = ("fastgpt", "reference")) -> Iterator[dict]:
    """Per implementation: medians of ``iterations`` PPO iterations after a warm-up one."""
    cfg = cfg or ModelConfig(**{**PRESETS["gpt2-small"]["model"], "vocab_size": 320})
    dev = torch.device(device)
    for impl in impls:
        row = {"impl": impl, "batch": batch, "mini_batch": mini, "prompt_len": prompt_len,
               "new_tokens": new_tokens, "grad_clip": GRAD_CLIP}
        try:
            iteration = BUILDERS[impl](cfg, batch, mini, prompt_len, new_tokens, dev)
            row["first_iteration_s"] = iteration()["seconds"]  # warm-up: compilation, allocator
            runs = [iteration() for _ in range(iterations)]
            row.update({k: statistics.median(r[k] for r in runs) for k in runs[0]})
            row.update(iterations=iterations, tokens_per_s=batch * (prompt_len + row["response_len"]) / row["seconds"],
                       generation_share=row["generation_s"] / row["seconds"])
        except Exception as exc:
            row["error"] = error_text(exc)
        free_memory(dev)
        yield row


def gpu_check_rows(plan: Plan) -> Iterator[dict]:
    if not plan.rehearse:
        yield from run_ppo_benchmarks()
        return
    for row in run_ppo_benchmarks(TINY, batch=8, mini=4, prompt_len=12, new_tokens=12, device="cpu",
                                  iterations=1):
        yield {**row, "note": "rehearsal: tiny fp32 model on the CPU, reference kernels"}


def test_ppo_iteration_cpu_tiny(benchmark):
    rows = list(run_ppo_benchmarks(TINY, batch=8, mini=4, prompt_len=12, new_tokens=12, device="cpu",
                                   iterations=1))
    record_rows(benchmark, rows, positive=("training_s", "generation_s"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_iteration_gpt2_small_cuda(benchmark):
    rows = list(run_ppo_benchmarks())
    record_rows(benchmark, rows)
