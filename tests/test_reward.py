"""Reward model: K-way loss vs a brute-force pairwise reference, one score per response,
data validation, normalisation, the CLI (train and --score) and a learning check."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from fastgpt.chatdata import parse_preference
from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import ModelConfig
from fastgpt.data import DataError
from fastgpt.model import ScalarModel
from fastgpt.stages.reward import (
    RankedGroup, RewardConfig, RewardTask, encode_comparison, encode_response, load_preferences, load_reward_model,
    score, train_reward,
)
from fastgpt.tokenizer import encode_prompt
from helpers import TINY, TOK, cli, rerun_tells_the_truth, tiny_checkpoint, write_jsonl


RECORDS = [
    {"prompt": "2+2?", "responses": ["4", "5", "four", "22"], "finished": [True, True, False, True],
     "ranking": [0, [2, 3], 1]},
    {"prompt": "hi", "responses": ["hello", "go away", "hey"], "ranking": [[0, 2], 1]},
    {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}], "chosen": "y", "rejected": "z"},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
]


def groups_of(records):
    out = []
    for r in records:
        c = parse_preference(r)
        from fastgpt.losses import ranking_pairs
        out.append((c, RankedGroup(encode_comparison(TOK, c, 64)[0], ranking_pairs(c.ranking))))
    return out


# -------------------------------------------------------------------------- the loss
def test_kway_loss_matches_bruteforce_pairs_and_scores_each_response_once():
    torch.manual_seed(0)
    model = ScalarModel(ModelConfig(**TINY)).eval()
    parsed = groups_of(RECORDS)
    task = RewardTask(RewardConfig(batch_size=4, seed=0), [g for _, g in parsed], [], TOK.pad_id, 64,
                      torch.device("cpu"))
    task.order.window = lambda lengths, cap: list(range(len(parsed)))  # all four prompts, in order
    batch = task.next_batch()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    loss, metrics = task.loss(model, batch)
    n_responses = sum(len(c.responses) for c, _ in parsed)
    assert len(calls) == 1 and len(batch.spans) == n_responses  # one forward, one score per response

    # reference: score every response alone (unpacked), then loop over pairs in Python
    per_prompt, correct = [], []
    for c, _ in parsed:
        prompt_ids = encode_prompt(TOK, c.messages)
        r = []
        for resp, fin in zip(c.responses, c.finished):
            ids, _ = encode_response(TOK, prompt_ids, resp, fin, 64)
            with torch.no_grad():
                r.append(float(model(torch.tensor([ids]))[0, -1]))
        groups = [g if isinstance(g, list) else [g] for g in c.ranking]
        pair_losses = []
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                for b in groups[gi]:
                    for w in groups[gj]:
                        pair_losses.append(-F.logsigmoid(torch.tensor(r[b] - r[w])).item())
                        correct.append(r[b] > r[w])
        per_prompt.append(sum(pair_losses) / len(pair_losses))
    assert float(loss.detach()) == pytest.approx(sum(per_prompt) / len(per_prompt), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))
    # pairs: 5 (4-way with a tie) + 2 (3-way, tie first) + 1 + 1
    assert len(batch.extras["better"]) == 9 and batch.extras["n_prompts"] == 4


def test_finished_response_ends_with_end_token_and_truncation():
    p = encode_prompt(TOK, [{"role": "user", "content": "q"}])
    ids, cut = encode_response(TOK, p, "ab", True, 64)
    assert ids[-1] == TOK.end_id and not cut
    ids, cut = encode_response(TOK, p, "ab", False, 64)
    assert ids[-1] == ord("b")
    long_prompt = encode_prompt(TOK, [{"role": "user", "content": "p" * 100}])
    ids, cut = encode_response(TOK, long_prompt, "ab", True, 64)  # prompt loses its start
    assert cut and len(ids) == 64 and ids[-3:] == [ord("a"), ord("b"), TOK.end_id]
    ids, cut = encode_response(TOK, p, "r" * 100, True, 64)  # response loses its end
    assert cut and len(ids) == 64 and ids[:len(p)] == p


# ---------------------------------------------------------------------- validation
def test_bad_rankings_skipped_and_counted(tmp_path, capsys):
    good = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(30)]
    bad = [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]},     # not a permutation
        {"prompt": "p", "responses": ["a"], "ranking": [0]},                     # K < 2
        {"prompt": "p", "chosen": "same", "rejected": "same"},                   # chosen == rejected
        "{broken",                                                               # malformed JSON
    ]
    long = {"prompt": "p" * 80, "responses": ["x" * 80, "y"], "ranking": [1, 0]}
    tied = {"prompt": "t", "responses": ["a", "b"], "ranking": [[0, 1]]}  # valid, nothing to learn
    path = write_jsonl(tmp_path / "r.jsonl", good + bad + [long, tied])
    groups, report = load_preferences(path, TOK, 64, 4, max_bad_fraction=0.2)
    assert len(groups) == 32 and len(report.bad) == 4 and report.truncated == 2
    assert report.ignored == 1 and groups[-1].pairs == []
    assert "not a permutation" in report.bad[0] and f"{path}:31:" in report.bad[0]
    assert "need between 2 and 9" in report.bad[1] and "same response" in report.bad[2]
    assert "malformed JSON" in report.bad[3]
    assert capsys.readouterr().err.count("warning") == 1
    with pytest.raises(DataError, match="4 of 36 rankings are bad"):
        load_preferences(path, TOK, 64, 4, max_bad_fraction=0.1)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]}])
    r = cli("reward", "--init_from", ckpt, "--data", data, "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "no usable rankings" in r.stderr and "all-tied" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("reward", "--data", data)
    assert r.returncode == 2 and "init_from is required" in r.stderr
    r = cli("reward", "--score", data)
    assert r.returncode == 2 and "--checkpoint" in r.stderr


# --------------------------------------------------------------------- CLI, learning
def synthetic_rankings(n: int, seed: int = 0) -> list[dict]:
    """The preferred response is polite ("yes please"), the others are not ("no no")."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        good = rng.randrange(k)
        responses = ["yes please" if j == good else "no " * rng.randint(1, 4) for j in range(k)]
        rest = [j for j in range(k) if j != good]
        rows.append({"prompt": f"question {i}", "responses": responses,
                     "ranking": [good, rest] if len(rest) > 1 else [good, rest[0]]})
    return rows


def test_cli_reward_train_and_score(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", synthetic_rankings(20))
    r = cli("reward", "--init_from", ckpt, "--data", data, "--out_dir", str(tmp_path / "rm"), "--batch_size", "4",
            "--progress", "false")
    assert r.returncode == 0, r.stderr
    assert "val_accuracy" in r.stdout and "offset" in r.stdout
    c = load_checkpoint(tmp_path / "rm")
    assert c["model_kind"] == "scalar" and {"reward_offset", "reward_scale"} <= set(c["extra"])
    # the normalised scores of the file's responses have mean 0, std 1
    rows = synthetic_rankings(20)
    model, tok, extra = load_reward_model(str(tmp_path / "rm"))
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    s = torch.tensor(score(model, tok, prompts, [x for row in rows for x in row["responses"]], extra=extra))
    assert abs(float(s.mean())) < 1e-3 and float(s.std()) == pytest.approx(1.0, abs=1e-3)

    to_score = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "question 1", "response": "yes please"},
                                                  {"prompt": "question 1", "response": "no", "finished": False}])
    r = cli("reward", "--score", to_score, "--checkpoint", str(tmp_path / "rm"))
    assert r.returncode == 0, r.stderr
    out = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(out) == 2 and out[0]["response"] == "yes please" and isinstance(out[1]["score"], float)
    expected = score(model, tok, ["question 1"] * 2, ["yes please", "no"], [True, False], extra)
    assert [o["score"] for o in out] == pytest.approx(expected, abs=1e-5)


def test_reward_model_learns_obvious_preference(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", synthetic_rankings(150, seed=1))
    cfg = RewardConfig(init_from=ckpt, data=data, out_dir=str(tmp_path / "rm"), epochs=2, batch_size=16, lr=3e-3,
                       warmup_steps=5, eval_interval=0, progress=False)
    summary = train_reward(cfg)
    assert summary["data"]["val"] == 15
    assert summary["eval"]["val_accuracy"] > 0.85, summary["eval"]
    assert summary["eval"]["val_margin"] > 0


def test_rerun_with_other_settings_is_refused_and_resume_is_announced(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", RECORDS * 5)
    base = ["--init_from", ckpt, "--data", data, "--batch_size", "4", "--epochs", "0"]
    rerun_tells_the_truth(capsys, "reward", tmp_path / "rm", base, {"val_fraction": "0.3", "seed": "3"})


def test_a_small_rankings_file_trains_min_steps(tmp_path, capsys):
    """One epoch of a few rankings is a handful of steps: the default trains min_steps instead,
    and says so; the many epochs that makes are warned about."""
    ckpt = tiny_checkpoint(tmp_path / "sft")
    data = write_jsonl(tmp_path / "r.jsonl", RECORDS * 3)
    cfg = RewardConfig(init_from=ckpt, data=data, out_dir=str(tmp_path / "rm"), batch_size=4, progress=False,
                       min_steps=6, eval_interval=0)
    summary = train_reward(cfg)
    out, err = capsys.readouterr()
    assert summary["steps"] == 6
    assert "1 epoch of 11 ranked prompts would be only 2 steps: training min_steps=6 instead" in out
    assert "max_steps 6 = 3 epochs (2 steps each)" in out
    assert "reward: warning: only 1 ranked prompt held out" in err
