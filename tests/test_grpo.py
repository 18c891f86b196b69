"""GRPO / RLOO: advantages and the loss against formulas written out here (value and gradient),
learning a stub reward like the PPO test, LoRA, bad settings and the command line."""
from __future__ import annotations

import pytest
import torch

from fastgpt.checkpoint import load_model
from fastgpt.cli import main
from fastgpt.losses import group_advantages, kl_estimate, masked_mean, ppo_policy_loss
from fastgpt.stages.grpo import GRPOConfig, grpo
from fastgpt.config import ConfigError
from tests.test_ppo import ckpts, starts_with_a  # noqa: F401  (module fixture: SFT + RM checkpoints)


def test_group_advantages_match_their_formulas():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 5.0, 3.0, 6.0], [4.0, 4.0, 4.0, 4.0]])
    grpo_adv = group_advantages(r, "grpo")
    rloo_adv = group_advantages(r, "rloo")
    for p in range(3):
        row = r[p].tolist()
        mean = sum(row) / 4
        std = (sum((x - mean) ** 2 for x in row) / 3) ** 0.5
        for k in range(4):
            assert grpo_adv[p, k] == pytest.approx((row[k] - mean) / (std + 1e-6), abs=1e-5)
            others = [row[j] for j in range(4) if j != k]
            assert rloo_adv[p, k] == pytest.approx(row[k] - sum(others) / 3, abs=1e-6)
    assert torch.all(grpo_adv[2] == 0) and torch.all(rloo_adv[2] == 0)  # a flat group carries no signal
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.zeros(3, 1))


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_matches_its_formula_value_and_gradient(level):
    torch.manual_seed(0)
    n, R = 4, 6
    lengths = [6, 2, 4, 1]
    mask = torch.arange(R)[None] < torch.tensor(lengths)[:, None]
    logp = torch.randn(n, R, dtype=torch.float64, requires_grad=True)
    old = (logp + 0.3 * torch.randn(n, R, dtype=torch.float64)).detach()
    ref = (logp + 0.5 * torch.randn(n, R, dtype=torch.float64)).detach()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0], dtype=torch.float64)
    clip, beta = 0.2, 0.04
    pg, _, _ = ppo_policy_loss(logp, old, adv[:, None].expand(n, R), mask, clip, level)
    loss = pg + beta * masked_mean(kl_estimate(logp, ref, "k3"), mask, level)

    def token_loss(i, t):
        ratio = torch.exp(logp[i, t] - old[i, t])
        surrogate = torch.maximum(-adv[i] * ratio, -adv[i] * torch.clamp(ratio, 1 - clip, 1 + clip))
        q_over_p = torch.exp(ref[i, t] - logp[i, t])
        return surrogate + beta * (q_over_p - 1 - torch.log(q_over_p))

    if level == "token":  # every token of the minibatch weighs the same
        expected = sum(token_loss(i, t) for i in range(n) for t in range(lengths[i])) / sum(lengths)
    else:  # every response weighs the same
        expected = sum(sum(token_loss(i, t) for t in range(lengths[i])) / lengths[i] for i in range(n)) / n
    assert torch.allclose(loss, expected)
    g1, = torch.autograd.grad(loss, logp)
    g2, = torch.autograd.grad(expected, logp)
    assert torch.allclose(g1, g2)
    assert torch.all(g1[~mask] == 0)


def _cfg(ckpts, out, **kw) -> GRPOConfig:  # noqa: F811
    base = dict(out_dir=str(out), sft_checkpoint=str(ckpts["sft"]), reward_checkpoint=str(ckpts["rm"]),
                prompts=str(ckpts["prompts"]), eval_prompts=str(ckpts["prompts"]), device="cpu", group_size=4,
                rollout_batch_size=32, mini_batch_size=16, max_new_tokens=4, max_steps=16, lr=3e-3,
                progress=False, ckpt_interval=1000, seed=0, missing_eos_penalty=0.0)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize("advantage,level", [("grpo", "token"), ("rloo", "sequence")])
def test_grpo_and_rloo_learn_a_stub_reward(ckpts, tmp_path, advantage, level):  # noqa: F811
    summary = grpo(_cfg(ckpts, tmp_path / "run", advantage=advantage, loss_level=level), reward_fn=starts_with_a)
    before, after = summary["sft"]["score_sampled"], summary["eval"]["score_sampled"]
    assert before < 0.5 and after > before + 0.3, (before, after)
    assert summary["rollouts"] == 8 and summary["eval"]["kl_to_ref"] > 0
    policy, _, ckpt = load_model(tmp_path / "run", kind="gpt")
    assert ckpt["model_kind"] == "policy" and ckpt["stage"] == "grpo"
    last = [r for r in ckpt["history"] if "policy_loss" in r][-1]
    for key in ("score", "kl", "kl_loss", "entropy", "clipfrac", "response_len", "flat_groups", "gen_tokens_per_s"):
        assert key in last, key


def test_grpo_shares_ppos_guards(ckpts, tmp_path):  # noqa: F811
    """Through the shared RolloutTask: the length penalty reaches the group advantages, a reward
    ensemble is built from reward_ensemble, and the gold judge picks best.pt."""
    from fastgpt.stages.grpo import build_grpo
    from fastgpt.stages.ppo import EnsembleScorer
    ones = lambda p, r: torch.ones(len(r))  # noqa: E731
    _, task = build_grpo(_cfg(ckpts, tmp_path / "a", advantage="rloo", length_penalty=0.5, length_target=2.0,
                              max_new_tokens=6), reward_fn=ones)
    task.next_batch()
    ro = task.rollout
    lengths = [len(s) - p for s, p in zip(ro["seqs"], ro["prompt_lens"])]
    scores = torch.tensor([1.0 - 0.5 * abs(n - 2.0) / 2.0 for n in lengths]).view(-1, 4)
    expected = scores - (scores.sum(1, keepdim=True) - scores) / 3  # RLOO of the penalised scores
    assert len(set(lengths)) > 1 and torch.allclose(ro["adv"].cpu(), expected.reshape(-1), atol=1e-5)
    _, twice = build_grpo(_cfg(ckpts, tmp_path / "b", reward_ensemble=str(ckpts["rm"]), ensemble_mode="min"))
    assert isinstance(twice.reward_fn, EnsembleScorer) and len(twice.reward_fn.members) == 2

    calls = []

    def gold(prompts, responses, finished):  # SFT's eval is calls 0-1, step 2's 2-3, step 4's 4-5
        calls.append(len(calls))
        return {"score": [1.0 if len(calls) - 1 == 2 else 0.0] * len(responses)}

    summary = grpo(_cfg(ckpts, tmp_path / "c", max_steps=4, eval_interval=2, eval_max_prompts=3),
                   reward_fn=starts_with_a, gold=gold)
    assert summary["best"] == {"step": 2, "score": 1.0} and (tmp_path / "c" / "best.pt").exists()
    assert summary["sft"]["gold_score_greedy"] == 0.0


def test_grpo_ptx_adds_the_pretraining_loss_and_resumes_its_stream(ckpts, tmp_path):  # noqa: F811
    """PPO-ptx in GRPO: a step's loss is GRPO's plus ptx_coef times the policy's LM loss on the
    pre-training rows of that step, and the rows' stream is part of the resumable state."""
    import json

    from fastgpt.data import prepare
    from fastgpt.stages.grpo import build_grpo
    from fastgpt.tokenizer import ByteTokenizer
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat sat on mat {i}. " * 4}) + "\n" for i in range(30)))
    prepare([corpus], tmp_path / "data", ByteTokenizer(), val_fraction=0.1, progress=False)
    trainer, task = build_grpo(_cfg(ckpts, tmp_path / "run", ptx_data=str(tmp_path / "data"), ptx_coef=0.7,
                                    ptx_batch_size=3), reward_fn=starts_with_a)
    b = task.next_batch()
    lm_idx, lm_targets = b["ptx"]
    assert lm_idx.shape[0] == 3
    model = trainer.model
    with torch.no_grad():
        with_ptx, metrics = task.loss(model, b)
        without, _ = task.loss(model, {k: v for k, v in b.items() if k != "ptx"})
        lm = model.policy(lm_idx, lm_targets)[1]
    assert torch.allclose(with_ptx, without + 0.7 * lm, atol=1e-6) and metrics["ptx_loss"] == pytest.approx(float(lm))
    state = task.state_dict()
    following = task.ptx.next_batch()[0]
    _, again = build_grpo(_cfg(ckpts, tmp_path / "run2", ptx_data=str(tmp_path / "data"), ptx_coef=0.7,
                               ptx_batch_size=3), reward_fn=starts_with_a)
    again.load_state_dict(state)
    assert torch.equal(again.ptx.next_batch()[0], following)


def test_grpo_with_lora_holds_one_copy_and_learns(ckpts, tmp_path):  # noqa: F811
    from fastgpt.lora import AdaptersOff
    from fastgpt.stages.grpo import build_grpo
    from tests.test_dpo import _p_letter_a
    cfg = _cfg(ckpts, tmp_path / "run", lora_rank=8, lora_alpha=16, lr=1e-2, max_steps=20)
    trainer, task = build_grpo(cfg, reward_fn=starts_with_a)
    assert isinstance(task.ref, AdaptersOff) and task.ref.model is trainer.model.policy
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    before = _p_letter_a(load_model(ckpts["sft"])[0])
    trainer.fit()
    # slower than full fine-tuning here (the tied lm_head, where this preference lives, has no adapter)
    after = _p_letter_a(load_model(tmp_path / "run")[0])
    assert after > before + 0.04, (before, after)


def test_bad_settings_are_one_line_errors(ckpts, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match="multiple of group_size"):
        grpo(_cfg(ckpts, tmp_path / "a", rollout_batch_size=30), reward_fn=starts_with_a)
    with pytest.raises(ConfigError, match="group_size=1: expected a value >= 2"):
        _cfg(ckpts, tmp_path / "b", group_size=1)
    code = main(["grpo", "--sft_checkpoint", str(ckpts["sft"]), "--out_dir", str(tmp_path / "c"), "--device", "cpu"])
    assert code == 2 and "reward_checkpoint is required" in capsys.readouterr().err


def test_cli_runs_with_the_reward_model(ckpts, tmp_path, capsys):  # noqa: F811
    code = main(["grpo", "--sft_checkpoint", str(ckpts["sft"]), "--reward_checkpoint", str(ckpts["rm"]),
                 "--prompts", str(ckpts["prompts"]), "--eval_prompts", str(ckpts["prompts"]), "--out_dir",
                 str(tmp_path / "o"), "--device", "cpu", "--progress", "false", "--max_steps", "1",
                 "--rollout_batch_size", "8", "--mini_batch_size", "8", "--max_new_tokens", "4",
                 "--advantage", "rloo"])
    out = capsys.readouterr().out
    assert code == 0 and "grpo: 1 step in " in out and "1 rollout;" in out and "vs SFT" in out


def test_rerun_with_other_prompts_is_refused_and_resume_is_announced(ckpts, tmp_path, capsys):  # noqa: F811
    from tests.helpers import rerun_tells_the_truth, write_jsonl
    from tests.test_ppo import PROMPTS
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p} for p in PROMPTS[:3]])
    base = ["--sft_checkpoint", ckpts["sft"], "--reward_checkpoint", ckpts["rm"], "--prompts", ckpts["prompts"],
            "--eval_prompts", ckpts["prompts"], "--group_size", "2", "--rollout_batch_size", "4",
            "--mini_batch_size", "4", "--max_new_tokens", "4", "--eval_max_prompts", "2"]
    rerun_tells_the_truth(capsys, "grpo", tmp_path / "run", base, {"prompts": other, "advantage": "rloo"})
