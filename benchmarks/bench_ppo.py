"""Benchmark: one PPO iteration (rollout + update) of fastgpt vs a plain PyTorch reference.

Both run the same algorithm on the same random-weight models at the same batch: generate
``batch`` responses, score them with a reward model, per-token KL penalty, GAE, then one
optimizer step per minibatch of clipped policy + value loss.  They differ in how:

* fastgpt: the KV-cache engine (packed prefill, finished rows cost nothing), packed varlen
  forwards and the fused log-prob kernel, its trainer step;
* reference: no KV cache (the whole sequence is recomputed for every new token), padded batches,
  full (B, T, V) logits + log_softmax, a hand-written AdamW step.

Reported: seconds per iteration and its split (generation / scoring / training) in extra_info.
The CUDA gpt2-small case is skipped without a GPU; a tiny CPU case runs everywhere.
``run_ppo_benchmarks()`` returns the rows for a script.

    python -m pytest benchmarks/bench_ppo.py -s
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
from fastgpt.losses import gae, kl_estimate, ppo_policy_loss, ppo_value_loss, whiten
from fastgpt.model import GPT, ScalarModel
from fastgpt.stages.ppo import PPOConfig, build_ppo
from fastgpt.tokenizer import ByteTokenizer

TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(cfg: ModelConfig, device: torch.device) -> tuple[GPT, ScalarModel]:
    torch.manual_seed(0)
    return GPT(cfg).to(device), ScalarModel(cfg).to(device)


def _prompts(n: int, length: int) -> list[str]:
    return ["x" * (length - 4) + f"{i:03d}"[-3:] for i in range(n)]  # byte prompts of equal length


# ---------------------------------------------------------------------------------- fastgpt
def fastgpt_iteration(cfg: ModelConfig, batch: int, mini: int, prompt_len: int, new_tokens: int,
                      device: torch.device) -> dict[str, float]:
    policy, rm = _models(cfg, device)
    tok = ByteTokenizer()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_checkpoint(root / "sft", model=policy, model_kind="gpt", model_config=cfg, tokenizer=tok, stage="sft")
        save_checkpoint(root / "rm", model=rm, model_kind="scalar", model_config=cfg, tokenizer=tok, stage="reward",
                        extra={"reward_offset": 0.0, "reward_scale": 1.0})
        (root / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _prompts(batch, prompt_len)))
        pcfg = PPOConfig(out_dir=str(root / "run"), sft_checkpoint=str(root / "sft"), reward_checkpoint=str(root / "rm"),
                         prompts=str(root / "p.jsonl"), eval_prompts=str(root / "p.jsonl"), device=device.type,
                         rollout_batch_size=batch, mini_batch_size=mini, ppo_epochs=1, max_new_tokens=new_tokens,
                         missing_eos_penalty=0.0, progress=False, resume=False)
        trainer, task = build_ppo(pcfg)
    task.next_batch()  # warm-up rollout and step (allocator, kernels)
    task.queue.clear()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batch // mini):  # the trainer's own step: one optimizer step per minibatch
        trainer._backward_step()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    _sync(device)
    total = time.perf_counter() - t0
    rollout = task.rollout["stats"]["rollout_s"]
    gen = task.rollout["stats"]["response_len"] * batch / task.rollout["stats"]["gen_tokens_per_s"]
    return {"seconds": total, "generation_s": gen, "scoring_s": rollout - gen, "training_s": total - rollout}


# -------------------------------------------------------------------------------- reference
def reference_iteration(cfg: ModelConfig, batch: int, mini: int, prompt_len: int, new_tokens: int,
                        device: torch.device, beta: float = 0.05, lr: float = 1e-5) -> dict[str, float]:
    policy, rm = _models(cfg, device)
    ref, value = copy.deepcopy(policy).eval(), copy.deepcopy(rm)
    params = list(policy.parameters()) + list(value.parameters())
    opt = torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=0.0)
    tok = ByteTokenizer()
    prompts = torch.tensor([[tok.role_id("user")] + tok.encode(p)[:prompt_len - 3] + [tok.end_id, tok.role_id("assistant")]
                            for p in _prompts(batch, prompt_len)], device=device)
    P = prompts.shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    _sync(device)
    t0 = time.perf_counter()
    seq = prompts
    with torch.no_grad():  # generation without a KV cache: recompute everything for each token
        for _ in range(new_tokens):
            logits, _ = policy(seq)
            probs = torch.softmax(logits[:, -1].float(), -1)
            seq = torch.cat([seq, torch.multinomial(probs, 1, generator=g)], 1)
    _sync(device)
    t_gen = time.perf_counter() - t0

    def logprobs(model: GPT, s: torch.Tensor) -> torch.Tensor:  # full logits + log_softmax
        logits, _ = model(s)
        lp = torch.log_softmax(logits[:, P - 1:-1].float(), -1)
        return lp.gather(-1, s[:, P:, None]).squeeze(-1)

    with torch.no_grad():
        old_logp, ref_logp = logprobs(policy, seq), logprobs(ref, seq)
        old_values = value(seq)[:, P - 1:-1]
        score = rm(seq)[:, -1]
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        rewards = -beta * kl_estimate(old_logp, ref_logp)
        rewards[:, -1] += score
        adv, returns = gae(rewards, old_values, mask, 1.0, 0.95)
        adv = whiten(adv, mask)
    _sync(device)
    t_score = time.perf_counter() - t0 - t_gen
    for start in range(0, batch, mini):
        sl = slice(start, start + mini)
        s = seq[sl]
        pg, _, _ = ppo_policy_loss(logprobs(policy, s), old_logp[sl], adv[sl], mask[sl], 0.2)
        vf, _ = ppo_value_loss(value(s)[:, P - 1:-1], old_values[sl], returns[sl], mask[sl], 0.2)
        (pg + 0.1 * vf).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    total = time.perf_counter() - t0
    return {"seconds": total, "generation_s": t_gen, "scoring_s": t_score, "training_s": total - t_gen - t_score}


def run_ppo_benchmarks(cfg: ModelConfig | None = None, batch: int = 64, mini: int = 16, prompt_len: int = 32,
                       new_tokens: int = 64, device: str = "cuda",
                       impls: tuple[str, ...] = ("fastgpt", "reference")) -> list[dict]:
    """One PPO iteration per implementation; rows: impl, seconds and its split, tokens/s."""
    cfg = cfg or ModelConfig(**{**PRESETS["gpt2-small"]["model"], "vocab_size": 320})
    dev = torch.device(device)
    fns = {"fastgpt": fastgpt_iteration, "reference": reference_iteration}
    rows = []
    for impl in impls:
        row = {"impl": impl, "batch": batch, "mini_batch": mini, "new_tokens": new_tokens, "device": dev.type}
        try:
            row.update(fns[impl](cfg, batch, mini, prompt_len, new_tokens, dev))
            row["tokens_per_s"] = batch * (prompt_len + new_tokens) / row["seconds"]
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
    return rows


def _bench(benchmark, rows: list[dict]) -> None:
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        assert "error" not in r, r["error"]
    benchmark.extra_info.update({r["impl"]: {k: r[k] for k in ("seconds", "generation_s", "scoring_s", "training_s")}
                                 for r in rows})


def test_ppo_iteration_cpu_tiny(benchmark):
    rows = run_ppo_benchmarks(TINY, batch=8, mini=4, prompt_len=12, new_tokens=12, device="cpu")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ppo_iteration_gpt2_small_cuda(benchmark):
    rows = run_ppo_benchmarks()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


if __name__ == "__main__":
    for r in (run_ppo_benchmarks() if torch.cuda.is_available()
              else run_ppo_benchmarks(TINY, 8, 4, 12, 12, "cpu")):
        print(r)
