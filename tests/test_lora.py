"""LoRA: the base model's outputs at init, only adapters train, merged checkpoints load as plain
models, exact resume, the adapters-off reference, and a LoRA run of every training stage."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from fastgpt.checkpoint import load_model, save_checkpoint
from fastgpt.config import ModelConfig
from fastgpt.lora import (LoRAError, LoRALinear, adapters_off, apply_lora, lora_layers, merge_lora, strip_adapters,
                          trainable_parameters)
from fastgpt.model import GPT, ScalarModel
from tests.helpers import TINY, TOK, tiny_checkpoint, write_jsonl


def _gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **kw}))


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_rank_r_adapters_give_the_base_outputs_at_init_and_train_alone(rank, arch):
    kw = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, n_kv_head=1) if arch == "modern" else {}
    base = _gpt(**kw)
    model = copy.deepcopy(base)
    assert apply_lora(model, rank, 8.0) == 4 * TINY["n_layer"]
    x = torch.randint(0, 320, (2, 16))
    y = torch.randint(0, 320, (2, 16))
    assert torch.equal(model(x)[0], base(x)[0])  # B = 0: exactly the base model
    trainable, total = trainable_parameters(model)
    per_layer = [rank * (m.in_features + m.out_features) for m in lora_layers(model)]
    assert trainable == sum(per_layer) and total == trainable + sum(p.numel() for p in base.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    for name, p in base.named_parameters():  # every base weight is untouched
        assert torch.equal(frozen[name], p), name
    assert not torch.equal(model(x)[0], base(x)[0])
    with adapters_off(model):  # the reference: the same module, adapters off
        assert torch.equal(model(x)[0], base(x)[0])


def test_state_dict_is_the_merged_plain_model_and_resumes_exactly():
    model = _gpt()
    apply_lora(model, 4, 16.0, "qkv,up")
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.normal_(std=0.05)
    x = torch.randint(0, 320, (2, 16))
    state = model.state_dict()
    plain = _gpt(seed=3)
    plain.load_state_dict(strip_adapters(state))
    assert torch.allclose(plain(x)[0], model(x)[0], atol=1e-5)
    resumed = _gpt(seed=5)
    apply_lora(resumed, 4, 16.0, "qkv,up")
    resumed.load_state_dict(state)  # the frozen base comes back from lora_base, bit for bit
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    merged = merge_lora(copy.deepcopy(model))
    assert not lora_layers(merged) and torch.allclose(merged(x)[0], model(x)[0], atol=1e-5)


def test_bad_settings():
    with pytest.raises(LoRAError, match="lm_head: the output head takes no adapter"):
        apply_lora(_gpt(), 4, 8.0, "qkv,lm_head")
    with pytest.raises(LoRAError, match="subset of"):
        apply_lora(_gpt(), 4, 8.0, "qkv,wte")
    with pytest.raises(LoRAError, match="lora_rank=0"):
        apply_lora(_gpt(), 0, 8.0)
    assert isinstance(LoRALinear(torch.nn.Linear(4, 3), 2, 2.0), torch.nn.Linear)


# --------------------------------------------------------------------- every stage
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    sft = tiny_checkpoint(root / "sft", stage="sft")
    torch.manual_seed(1)
    rm = ScalarModel(ModelConfig(**TINY))
    save_checkpoint(root / "rm", model=rm, model_kind="scalar", model_config=rm.config, tokenizer=TOK,
                    stage="reward", extra={"reward_offset": 0.0, "reward_scale": 1.0})
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(8)])
    convs = write_jsonl(root / "sft.jsonl", [{"prompt": f"Question {i}?", "response": "Yes."} for i in range(16)])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes.", "rejected": "no."}
                                               for i in range(16)])
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the cat sat on the mat {i}. " * 4}) + "\n" for i in range(30)))
    from fastgpt.data import prepare
    prepare([docs], root / "data", TOK, val_fraction=0.1, progress=False)
    return {"sft": sft, "rm": str(root / "rm"), "prompts": prompts, "convs": convs, "pairs": pairs,
            "data": str(root / "data")}


def _run(stage: str, f: dict, out, **lora):
    common = {**dict(out_dir=str(out), device="cpu", progress=False, max_steps=2, batch_size=4, seed=0), **lora}
    if stage == "pretrain":
        from fastgpt.stages.pretrain import PretrainConfig, pretrain
        return pretrain(PretrainConfig(init_from=f["sft"], data=f["data"], eval_batches=1, **common))
    if stage == "sft":
        from fastgpt.stages.sft import SFTConfig, sft
        return sft(SFTConfig(init_from=f["sft"], data=f["convs"], eval_format_prompts=0, **common))
    if stage == "reward":
        from fastgpt.stages.reward import RewardConfig, train_reward
        return train_reward(RewardConfig(init_from=f["sft"], data=f["pairs"], epochs=0, **common))
    rl = dict(sft_checkpoint=f["sft"], reward_checkpoint=f["rm"], prompts=f["prompts"], eval_prompts=f["prompts"],
              rollout_batch_size=8, mini_batch_size=4, max_new_tokens=4, eval_max_prompts=2, **common)
    if stage == "ppo":
        from fastgpt.stages.ppo import PPOConfig, ppo
        return ppo(PPOConfig(ppo_epochs=1, **rl))
    if stage == "grpo":
        from fastgpt.stages.grpo import GRPOConfig, grpo
        return grpo(GRPOConfig(missing_eos_penalty=0.0, **rl))  # a random model never ends: no flat groups
    from fastgpt.stages.dpo import DPOConfig, dpo
    return dpo(DPOConfig(init_from=f["sft"], data=f["pairs"], epochs=0, **common))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"])
def test_every_stage_trains_adapters_only_and_saves_a_plain_model(files, tmp_path, stage, capsys):
    summary = _run(stage, files, tmp_path / "run", lora_rank=2, lora_alpha=4.0, lora_targets="qkv,down")
    assert summary["steps"] == 2
    assert "LoRA rank 2" in capsys.readouterr().out
    kind = "scalar" if stage == "reward" else "gpt"
    model, _, ckpt = load_model(tmp_path / "run", kind=kind)  # merged: a plain model
    gpt = model.gpt if kind == "scalar" else model
    assert not lora_layers(gpt)
    prefix = {"ppo": "policy.", "dpo": "policy.", "grpo": "policy.", "reward": "gpt."}.get(stage, "")
    start = load_model(files["sft"])[0].state_dict()
    saved = ckpt["model"]
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"):
        assert torch.equal(saved[prefix + name.replace("weight", "lora_base")], start[name])  # base frozen
    assert torch.equal(saved[prefix + "blocks.0.attn.proj.weight"], start["blocks.0.attn.proj.weight"])  # not a target
    assert not torch.equal(saved[prefix + "blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # merged


def test_a_lora_run_resumes_bit_for_bit(files, tmp_path):
    _run("sft", files, tmp_path / "full", lora_rank=2, max_steps=4)
    _run("sft", files, tmp_path / "cut", lora_rank=2, max_steps=2)
    _run("sft", files, tmp_path / "cut", lora_rank=2, max_steps=4)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_adapters_needs_a_start_model(files, tmp_path):
    from fastgpt.config import ConfigError
    from fastgpt.stages.pretrain import PretrainConfig, pretrain
    with pytest.raises(ConfigError, match="lora_rank needs init_from"):
        pretrain(PretrainConfig(data=files["data"], out_dir=str(tmp_path), device="cpu", lora_rank=2))
