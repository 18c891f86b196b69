"""Benchmark: one DPO optimizer step of fastgpt vs a plain PyTorch reference, and LoRA vs full
fine-tuning memory.

Both minimise the same sigmoid DPO loss (beta 0.1) on the same random-weight model and the same
``pairs`` (prompt, chosen, rejected) of varied lengths per step. They differ in how:

* fastgpt: the DPO stage's own task and loss (:class:`fastgpt.stages.dpo.DPOTask`) — every
  response packed once into varlen rows (no padding inside a row), per-token log-probs from the
  fused log-prob kernel (no (tokens x vocabulary) logits kept for backward), reference log-probs
  precomputed once (``precompute_ref``, the default; the ``fastgpt-ref-on-the-fly`` row runs the
  reference every step instead);
* reference: the usual recipe — chosen and rejected padded to the longest sequence of the
  batch, full (B, T, V) logits, ``log_softmax`` + ``gather``, a frozen copy of the model run
  every step for the reference log-probs.

Rows: seconds per step, tokens/s (real tokens, both sides of every pair) and CUDA peak memory;
with ``lora_rank`` > 0 the fastgpt step trains rank-r adapters only and its reference is the
same weights with the adapters off. The CUDA gpt2-small case is skipped without a GPU; a tiny
CPU case runs everywhere. ``run_dpo_benchmarks()`` returns the rows for a script.

    python -m pytest benchmarks/bench_dpo.py -s
"""
from __future__ import annotations

import copy
import tempfile

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

from conftest import peak_memory, time_fn

TINY = ModelConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)


def make_pairs(cfg: ModelConfig, n: int, prompt_len: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
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


# ---------------------------------------------------------------------------------- fastgpt
def fastgpt_step(cfg: ModelConfig, pairs: list, device: torch.device, lora_rank: int = 0,
                 precompute_ref: bool = True) -> dict:
    groups = [RankedGroup([(p + r, response_labels(len(p), r)) for r in (c, w)], ranking_pairs([0, 1]))
              for p, c, w in pairs]
    rows = len(first_fit([len(p) + len(r) for p, c, w in pairs for r in (c, w)], None, cfg.block_size)[1])
    with tempfile.TemporaryDirectory() as d:
        dcfg = DPOConfig(out_dir=d, device=device.type, batch_size=rows, max_steps=10**6, lr=1e-6, warmup_steps=0,
                         lora_rank=lora_rank, lora_alpha=2.0 * max(lora_rank, 1), precompute_ref=precompute_ref,
                         progress=False, resume=False)
        policy = _model(cfg, device)
        ref = reference_model(add_lora(policy, dcfg, "bench"))
        if precompute_ref:
            attach_reference_logprobs(ref, groups, rows, cfg.block_size, 0, device, dcfg.dtype)
        task = DPOTask(dcfg, groups, [], ref, 0, cfg.block_size, device)
        trainer = Trainer(dcfg, Policy(policy), task, stage="dpo", tokenizer=ByteTokenizer(), model_kind="policy")
    tokens = sum(len(p) * 2 + len(c) + len(w) for p, c, w in pairs)

    def step() -> None:
        trainer._backward_step()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step()  # allocator and kernels warm
    with peak_memory(device) as mem:
        t = time_fn(step, device, warmup=1, iters=3)
    return {"seconds": t["median_s"], "tokens_per_s": tokens / t["median_s"], "peak_mb": mem["peak_mb"], "rows": rows}


# -------------------------------------------------------------------------------- reference
def reference_step(cfg: ModelConfig, pairs: list, device: torch.device, beta: float = 0.1) -> dict:
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
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    tokens = sum(len(p) * 2 + len(c) + len(w) for p, c, w in pairs)
    step()
    with peak_memory(device) as mem:
        t = time_fn(step, device, warmup=1, iters=3)
    return {"seconds": t["median_s"], "tokens_per_s": tokens / t["median_s"], "peak_mb": mem["peak_mb"],
            "rows": len(seqs)}


def run_dpo_benchmarks(cfg: ModelConfig | None = None, n_pairs: int = 32, prompt_len: int = 128,
                       device: str = "cuda", lora_rank: int = 16) -> list[dict]:
    """One DPO step per implementation; rows: impl, seconds, tokens/s, peak memory, rows packed."""
    cfg = cfg or ModelConfig(**PRESETS["gpt2-small"]["model"])
    dev = torch.device(device)
    pairs = make_pairs(cfg, n_pairs, prompt_len)
    cases = {"fastgpt": lambda: fastgpt_step(cfg, pairs, dev),
             "fastgpt-ref-on-the-fly": lambda: fastgpt_step(cfg, pairs, dev, precompute_ref=False),
             f"fastgpt-lora-r{lora_rank}": lambda: fastgpt_step(cfg, pairs, dev, lora_rank=lora_rank),
             "reference": lambda: reference_step(cfg, pairs, dev)}
    return run_cases(cases, {"pairs": n_pairs, "prompt_len": prompt_len, "block": cfg.block_size,
                             "vocab": cfg.vocab_size, "device": dev.type}, dev)


def run_cases(cases: dict, common: dict, dev: torch.device) -> list[dict]:
    """One row per case (``impl``, the ``common`` fields, what the case returns, or its error),
    each with its speed-up over the ``reference`` row; GPU memory freed between cases."""
    rows = []
    for impl, fn in cases.items():
        row = {"impl": impl, **common}
        try:
            row.update(fn())
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ref = next((r for r in rows if r["impl"] == "reference" and "seconds" in r), None)
    for r in rows:
        if ref and "seconds" in r:
            r["speedup_vs_reference"] = ref["seconds"] / r["seconds"]
    return rows


def _bench(benchmark, rows: list[dict]) -> None:
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        assert "error" not in r, r["error"]
    benchmark.extra_info.update({r["impl"]: {k: r[k] for k in ("seconds", "tokens_per_s", "peak_mb")} for r in rows})


def test_dpo_step_cpu_tiny(benchmark):
    rows = run_dpo_benchmarks(TINY, n_pairs=8, prompt_len=16, device="cpu", lora_rank=4)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dpo_step_gpt2_small_cuda(benchmark):
    rows = run_dpo_benchmarks()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    _bench(benchmark, rows)


if __name__ == "__main__":
    for r in (run_dpo_benchmarks() if torch.cuda.is_available()
              else run_dpo_benchmarks(TINY, 8, 16, "cpu", 4)):
        print(r)
