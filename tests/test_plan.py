"""`fastgpt plan`: real models' sizes from their public configs, and the memory estimate checked
against what a CPU training step really holds (the process's peak resident memory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgpt.config import ModelConfig
from fastgpt.plan import GB, KNOWN_MODELS, PlanError, model_config, num_params, parse_size, plan

# parameter counts the model authors publish
PUBLISHED = {"SmolLM2-135M": 134.5e6, "SmolLM2-360M": 361.8e6, "SmolLM2-1.7B": 1.711e9, "Qwen2.5-0.5B": 494.0e6,
             "Qwen2.5-1.5B": 1.544e9, "Qwen2.5-7B": 7.616e9, "Llama-3.2-1B": 1.236e9, "Llama-3.2-3B": 3.213e9,
             "Llama-3.1-8B": 8.030e9, "Mistral-7B": 7.248e9}


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_known_models_have_their_published_size(name):
    assert num_params(model_config(name)) == pytest.approx(PUBLISHED[name], rel=2e-3)


def test_largest_micro_batch_is_the_largest_that_fits():
    cfg = model_config("Qwen2.5-0.5B")
    for stage in ("sft", "reward", "ppo"):
        p = plan(cfg, stage, seq_len=2048, budget=80 * GB)
        assert p.max_rows > 0 and p.total(p.max_rows) <= 80 * GB < p.total(p.max_rows + 1)
    assert plan(model_config("Llama-3.1-8B"), "sft", budget=80 * GB).max_rows == 0  # 16 bytes/param: 128 GB
    sft, ckpt = plan(cfg, "sft"), plan(cfg, "sft", grad_checkpointing=True)
    assert ckpt.per_row["activations"] < sft.per_row["activations"] / 3 and ckpt.max_rows > 3 * sft.max_rows
    ppo = plan(cfg, "ppo")
    assert ppo.max_rollout_rows > ppo.max_rows and "frozen reference and reward model (bf16)" in ppo.static


def test_sharded_plan_splits_what_fsdp_splits():
    """--fsdp N: the trained models' weights, AdamW state and gradients split N ways, activations
    and the frozen PPO models whole, plus the policy's generation copy; an 8B model that does not
    fit one 80 GB GPU fits each of 8."""
    cfg = model_config("Llama-3.1-8B")
    one, eight = plan(cfg, "sft"), plan(cfg, "sft", fsdp=8)
    key = "fp32 weights and AdamW state"
    assert eight.static[key] == pytest.approx(one.static[key] / 8)
    assert one.gradients / 8 < eight.gradients < one.gradients / 2
    assert eight.weight_copies < one.weight_copies / 4 and eight.per_row == one.per_row
    assert one.max_rows == 0 < eight.max_rows and plan(cfg, "sft", fsdp=1).total(1) == one.total(1)
    ppo_one, ppo = plan(cfg, "ppo", seq_len=1024), plan(cfg, "ppo", seq_len=1024, fsdp=8)
    frozen = "frozen reference and reward model (bf16)"
    assert ppo.static[frozen] == ppo_one.static[frozen] and ppo.generation_copy == 2 * ppo.params
    assert ppo_one.generation_copy == 0


def test_sizes_and_model_names():
    assert parse_size("80GB") == 80e9 and parse_size("24GiB") == 24 * 2**30 and parse_size("80") == 80e9
    with pytest.raises(PlanError, match="expected a size"):
        parse_size("lots")
    with pytest.raises(PlanError, match="not a known model"):
        model_config("GPT-5")
    assert model_config("tiny").n_layer == 4


CASES = [  # (stage, model overrides, grad_checkpointing)
    ("sft", {}, False),
    ("sft", {}, True),
    ("reward", {"tie_embeddings": False}, False),
    ("sft", {"norm": "layernorm", "mlp": "gelu", "position": "learned", "bias": True, "n_kv_head": 0}, False),
]
BASE = dict(vocab_size=4096, block_size=256, n_layer=3, n_head=8, n_kv_head=2, n_embd=256, mlp_hidden=704,
            norm="rmsnorm", mlp="swiglu", position="rope", bias=False)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_estimate_matches_measured_cpu_memory():
    """The CPU (reference-path, fp32) estimate of a step against its measured peak: the growth of
    the process's resident high-water mark during one step (gradients, activations and the
    loss's temporaries; the weights and AdamW state exist before it)."""
    rows, seq_len = 4, 256
    cases = [dict(model={**BASE, **extra}, stage=stage, rows=rows, seq_len=seq_len, grad_checkpointing=gc)
             for stage, extra, gc in CASES]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "memory_probe.py"), *map(json.dumps, cases)],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    measured = [json.loads(line)["growth"] for line in out.stdout.strip().splitlines()]
    for case, growth in zip(cases, measured):
        cfg = ModelConfig(**case["model"])
        p = plan(cfg, case["stage"], seq_len=seq_len, amp=False, backend="reference", dropout=0.0,
                 grad_checkpointing=case["grad_checkpointing"])
        estimate = p.total(rows) - sum(p.static.values())  # weights and AdamW state exist before the step
        assert 0.9 <= estimate / growth <= 1.15, (case, estimate, growth)


GPU_CASES = [  # (known model, stage, rows, seq_len, grad_checkpointing); head sizes 64 all
    ("SmolLM2-135M", "sft", 4, 1024, False),
    ("SmolLM2-135M", "sft", 4, 1024, True),
    ("Qwen2.5-0.5B", "reward", 4, 1024, False),
    ("Llama-3.2-1B", "sft", 2, 1024, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name, stage, rows, seq_len, gc", GPU_CASES)
def test_estimate_matches_cuda_peak(name, stage, rows, seq_len, gc):
    """The GPU (fused kernels, bf16 autocast) estimate against CUDA's peak allocation during one
    training step of the real model's shape (random weights), as the trainer runs it."""
    import torch
    from fastgpt.model import GPT, ScalarModel
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cfg = model_config(name)
    cfg.block_size = seq_len
    torch.manual_seed(0)
    model = (ScalarModel(cfg) if stage == "reward" else GPT(cfg)).cuda()
    (model.gpt if stage == "reward" else model).grad_checkpointing = gc
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    idx = torch.randint(0, cfg.vocab_size, (rows, seq_len), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx)[:, -1].float().pow(2).mean() if stage == "reward" else model(idx, idx)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    growth = torch.cuda.max_memory_allocated() - before
    p = plan(cfg, stage, seq_len=seq_len, grad_checkpointing=gc, dropout=0.0)
    estimate = p.total(rows) - sum(p.static.values())  # weights and AdamW state exist before the step
    print(f"\n{name} {stage} {rows}x{seq_len} checkpointing={gc}: step peak {growth / GB:.3f} GB, "
          f"estimate {estimate / GB:.3f} GB, ratio {estimate / growth:.3f} ({torch.cuda.get_device_name()}, "
          f"torch {torch.__version__})")
    assert 0.9 <= estimate / growth <= 1.2
