"""The reward's likelihood term: a frozen language model's per-response log-prob statistics
against a one-sequence-at-a-time reference, the Bradley-Terry fit of the weights, and the trained
reward reading it the same way everywhere (score, PPO's scorer)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt.checkpoint import load_checkpoint, load_model
from fastgpt.config import ConfigError
from fastgpt.stages.likelihood import LikelihoodTerm, fit_weights, load_likelihood_model, split_example
from fastgpt.stages.ppo import load_reward, reward_models
from fastgpt.stages.reward import RewardConfig, load_reward_model, raw_scores, response_labels, score, train_reward
from fastgpt.tokenizer import encode_prompt, prompt_messages
from helpers import TOK, tiny_checkpoint, write_jsonl
from test_reward import synthetic_rankings


@torch.no_grad()
def reference_features(lm, prompt_text: str, response_text: str) -> tuple[float, float]:
    """Mean and min log p of the response bytes after "<eot>prompt ", one sequence, no packing."""
    ctx = [TOK.eot_id] + TOK.encode(prompt_text + " ")
    resp = TOK.encode(response_text)
    ids = torch.tensor([ctx + resp])
    logits = lm(ids)[0][0].float()
    lp = F.log_softmax(logits[len(ctx) - 1:-1], -1).gather(1, torch.tensor(resp)[:, None])[:, 0]
    return float(lp.mean()), float(lp.min())


def test_features_read_the_conversation_as_plain_text_and_match_a_per_sequence_reference(tmp_path):
    lm, tok, _ = load_model(tiny_checkpoint(tmp_path / "base", seed=3), kind="gpt")
    term = LikelihoodTerm(lm, tok)
    cases = [("What is 7?", "It is seven."), ("q", "a"), ("Name a colour, any one you like", "Teal, I think"),
             ("x" * 5, "y" * 13)]
    prompts = [encode_prompt(tok, prompt_messages(p)) for p, _ in cases]
    responses = [tok.encode(r) + [tok.end_id] for _, r in cases]  # the end of turn is not read
    got = term.features(prompts + [prompts[0]], responses + [[tok.end_id]], rows=2)
    for (p, r), row in zip(cases, got):
        assert row.tolist() == pytest.approx(reference_features(lm, p, r), abs=1e-5)
    assert got[-1].tolist() == pytest.approx([-math.log(lm.config.vocab_size)] * 2)  # nothing said


def test_split_example_inverts_the_reward_stages_encoding():
    prompt, response = [5, 6, 7], [8, 9, TOK.end_id]
    assert split_example((prompt + response, response_labels(len(prompt), response))) == (prompt, response)


def test_fit_weights_finds_the_feature_that_decides_the_pairs():
    torch.manual_seed(0)
    n = 400
    reward = torch.randn(n)                     # noise the fit should ignore
    features = torch.randn(n, 2) * torch.tensor([1.0, 5.0])
    better = torch.arange(0, n, 2)
    worse = better + 1
    swap = features[better, 1] < features[worse, 1]  # the second feature decides every pair
    better, worse = torch.where(swap, worse, better), torch.where(swap, better, worse)
    w = fit_weights(reward, features, better, worse)
    combined = w[0] * reward + features @ torch.tensor(w[1:], dtype=torch.float32)
    assert bool((combined[better] > combined[worse]).all())
    assert w[2] > 0 and abs(w[2] * 5) > 10 * max(abs(w[0]), abs(w[1]))


def test_reward_trained_with_the_term_scores_the_same_in_score_and_in_ppo(tmp_path):
    sft, base = tiny_checkpoint(tmp_path / "sft"), tiny_checkpoint(tmp_path / "base", seed=1)
    data = write_jsonl(tmp_path / "r.jsonl", synthetic_rankings(60, seed=2))
    cfg = RewardConfig(init_from=sft, data=data, out_dir=str(tmp_path / "rm"), epochs=1, batch_size=8, lr=3e-3,
                       warmup_steps=2, eval_interval=0, val_fraction=0.2, progress=False, likelihood_from=base)
    summary = train_reward(cfg)
    extra = load_checkpoint(tmp_path / "rm")["extra"]
    assert extra["likelihood"]["checkpoint"] == str((tmp_path / "base").resolve())
    weights = tuple(extra["likelihood"]["weights"][k] for k in ("reward", "mean_logprob", "min_logprob"))
    assert weights == tuple(summary["likelihood_weights"].values())
    assert {"val_accuracy", "val_accuracy_reward_model"} <= set(summary["eval"])

    model, tok, extra = load_reward_model(str(tmp_path / "rm"))
    texts, answers = ["question 3", "question 3", "hello"], ["yes please", "no no", ""]
    got = score(model, tok, texts, answers, extra=extra)
    # by hand: the reward model's score at the last token, the base model's features, the weights
    prompts = [encode_prompt(tok, prompt_messages(t)) for t in texts]
    responses = [tok.encode(a) + [tok.end_id] for a in answers]
    rm = torch.tensor(raw_scores(model, [p + r for p, r in zip(prompts, responses)], 4, 64, tok.pad_id))
    term = load_likelihood_model(base, tok, "cpu", "test")
    feats = torch.tensor([reference_features(term.lm, t, a) for t, a in zip(texts[:2], answers[:2])]
                         + [[-math.log(term.lm.config.vocab_size)] * 2])
    raw = weights[0] * rm + feats @ torch.tensor(weights[1:])
    want = (raw - extra["reward_offset"]) / extra["reward_scale"]
    assert got == pytest.approx(want.tolist(), abs=1e-4)

    class Cfg:  # what reward_models reads of PPO's / GRPO's config
        ensemble_mode, reward_ensemble, mini_batch_size = "mean", "", 4
    scorer = reward_models(Cfg, *load_reward(str(tmp_path / "rm"), tok, torch.device("cpu")), tok, torch.device("cpu"))
    assert scorer(prompts, responses).tolist() == pytest.approx(got, abs=1e-5)


def test_a_missing_likelihood_model_is_a_one_line_error_before_training(tmp_path):
    sft = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", synthetic_rankings(10))
    cfg = RewardConfig(init_from=sft, data=data, out_dir=str(tmp_path / "rm"), epochs=1, batch_size=4,
                       progress=False, likelihood_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="likelihood_from .*nowhere not found"):
        train_reward(cfg)
    assert not (tmp_path / "rm" / "checkpoint.pt").exists()
