"""Issue 11's end-to-end check: a SmolLM2-style (Llama), a Qwen2-style and a Mistral-style random
Hugging Face model each go through import -> SFT -> reward -> PPO -> export, and transformers
reloads the exported policy and reward model with the same outputs (tiny sizes, few steps)."""
from __future__ import annotations

import pytest
import torch

from fastgpt.checkpoint import load_model
from fastgpt.cli import main
from fastgpt.stages.ppo import PPOConfig, ppo
from fastgpt.stages.reward import RewardConfig, train_reward
from fastgpt.stages.sft import SFTConfig, sft
from fastgpt.tokenizer import encode_chat, load_tokenizer

from helpers import write_jsonl
from hf_models import WORDS, write_model

transformers = pytest.importorskip("transformers")

COMMON = dict(device="cpu", progress=False, log_interval=1, warmup_steps=0)


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        out.append({"messages": [{"role": "user", "content": f"what is {a}"},
                                 {"role": "assistant", "content": f"{a} is {b}"}]})
    return out


@pytest.mark.parametrize("arch", ["smollm", "qwen2", "mistral"])
def test_import_sft_reward_ppo_export(tmp_path, arch, capsys):
    folder = tmp_path / "hf"
    write_model(folder, arch, seed=7)
    data = write_jsonl(tmp_path / "sft.jsonl", conversations(24))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"what is {w}", "chosen": f"{w} is the cat", "rejected": "thanks"} for w in WORDS[:12]])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {w}"} for w in WORDS[:6]])

    summary = sft(SFTConfig(init_from=f"hf:{folder}", data=str(data), out_dir=str(tmp_path / "sft"), max_steps=3,
                            block_size=80, batch_size=4, eval_interval=0, eval_format_prompts=2,
                            eval_max_new_tokens=6, **COMMON))
    assert summary["steps"] == 3 and "micro-batch 4 rows x 80 tokens" in capsys.readouterr().out
    train_reward(RewardConfig(init_from=str(tmp_path / "sft"), data=str(pairs), out_dir=str(tmp_path / "rm"),
                              epochs=0, max_steps=2, batch_size=4, eval_interval=0, **COMMON))
    result = ppo(PPOConfig(sft_checkpoint=str(tmp_path / "sft"), reward_checkpoint=str(tmp_path / "rm"),
                           prompts=str(prompts), eval_prompts=str(prompts), out_dir=str(tmp_path / "ppo"),
                           rollout_batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6, max_steps=2,
                           eval_max_prompts=2, **COMMON))
    assert result["steps"] == 2

    tok = load_tokenizer(folder)
    policy, ppo_tok, _ = load_model(tmp_path / "ppo", kind="gpt")
    assert ppo_tok.to_dict() == tok.to_dict()  # the folder's chat format went through every stage
    assert main(["export", str(tmp_path / "ppo"), "--hf", str(tmp_path / "out")]) == 0
    assert main(["export", str(tmp_path / "rm"), "--hf", str(tmp_path / "out_rm")]) == 0

    msgs = conversations(1)[0]["messages"]
    ids = torch.tensor([encode_chat(tok, msgs)[0]])
    hf_policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (hf_policy(ids).logits - policy(ids)[0]).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"] == ids[0].tolist()

    rm, _, ckpt = load_model(tmp_path / "rm", kind="scalar")
    hf_rm = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out_rm").eval()
    with torch.no_grad():
        bias = float(rm.head.bias)
        assert abs(float(hf_rm(ids).logits[0, 0]) + bias - float(rm(ids)[0, -1])) <= 1e-4


def test_dpo_and_grpo_start_from_an_import_with_lora_and_export_merged(tmp_path):
    """The preference stages take a Hugging Face folder as their start (its tokenizer and chat
    template carried through), train LoRA adapters only, and export the merged model:
    transformers reloads it with the same outputs as fastgpt's checkpoint, and they differ from
    the imported base (the adapters are in the weights)."""
    from fastgpt.hf import load_hf_model
    from fastgpt.stages.dpo import DPOConfig, dpo
    from fastgpt.stages.grpo import GRPOConfig, grpo
    folder = tmp_path / "hf"
    write_model(folder, "smollm", seed=3)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"what is {w}", "chosen": f"{w} is the cat", "rejected": "thanks"} for w in WORDS[:12]])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {w}"} for w in WORDS[:8]])
    lora = dict(lora_rank=2, lora_alpha=4.0, lr=1e-2)
    dpo(DPOConfig(init_from=f"hf:{folder}", data=str(pairs), out_dir=str(tmp_path / "dpo"), epochs=0, max_steps=2,
                  batch_size=4, block_size=80, eval_interval=0, **lora, **COMMON))

    def longer_is_better(prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([float(len(r)) for r in responses])
    grpo(GRPOConfig(sft_checkpoint=f"hf:{folder}", prompts=str(prompts), out_dir=str(tmp_path / "grpo"),
                    group_size=2, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=6, max_steps=2,
                    eval_max_prompts=2, **lora, **COMMON), reward_fn=longer_is_better)

    tok = load_tokenizer(folder)
    base, _ = load_hf_model(folder)
    ids = torch.tensor([encode_chat(tok, conversations(1)[0]["messages"])[0]])
    for stage in ("dpo", "grpo"):
        policy, stage_tok, ckpt = load_model(tmp_path / stage, kind="gpt")
        assert stage_tok.to_dict() == tok.to_dict() and ckpt["model_kind"] == "policy"
        assert main(["export", str(tmp_path / stage), "--hf", str(tmp_path / f"out_{stage}")]) == 0
        hf_policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"out_{stage}").eval()
        with torch.no_grad():
            ours = policy(ids)[0]
            assert (hf_policy(ids).logits - ours).abs().max().item() <= 1e-4
            assert (base(ids)[0] - ours).abs().max().item() > 1e-5
