"""DPO: each loss against its formula written out here (value and gradient), the loss of a real
model on packed rows against a pairwise logistic on brute-force log-probs, learning a planted
preference, LoRA, the checkpoint and the command line."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastgpt.checkpoint import load_model
from fastgpt.cli import main
from fastgpt.losses import dpo_loss
from fastgpt.stages.dpo import DPOConfig, dpo, sequence_logprobs
from fastgpt.stages.reward import encode_comparison, pack_ranked, RankedGroup
from fastgpt.chatdata import parse_preference
from fastgpt.losses import ranking_pairs
from fastgpt.tokenizer import encode_prompt, prompt_messages
from tests.helpers import TOK, tiny_checkpoint, write_jsonl
from tests.test_ppo import _sft_model


def _brute_force(logratios, groups, beta, kind, eps):
    """Mean over prompts of the mean over each prompt's pairs of the per-pair loss, by loops."""
    per_prompt = []
    for pairs in groups:
        losses = []
        for b, w in pairs:
            h = logratios[b] - logratios[w]
            if kind == "ipo":
                losses.append((h - 1 / (2 * beta)) ** 2)
            else:
                sig = 1 / (1 + torch.exp(-beta * h))
                losses.append(-(1 - eps) * torch.log(sig) - eps * torch.log(1 - sig))
        per_prompt.append(sum(losses) / len(losses))
    return sum(per_prompt) / len(per_prompt)


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_losses_match_their_formulas_value_and_gradient(kind, eps):
    torch.manual_seed(0)
    # prompt 0 ranks 3 responses (3 pairs), prompt 1 is one pair: each prompt weighs the same
    groups = [[(0, 1), (0, 2), (1, 2)], [(4, 3)]]
    better = torch.tensor([b for g in groups for b, _ in g])
    worse = torch.tensor([w for g in groups for _, w in g])
    prompt = torch.tensor([p for p, g in enumerate(groups) for _ in g])
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss, margin = dpo_loss(x, better, worse, prompt, 2, beta=0.3, kind=kind, label_smoothing=eps)
    expected = _brute_force(x, groups, 0.3, kind, eps)
    assert torch.allclose(loss, expected)
    assert torch.allclose(margin, 0.3 * (x[better] - x[worse]).detach())
    g1, = torch.autograd.grad(loss, x)
    g2, = torch.autograd.grad(expected, x)
    assert torch.allclose(g1, g2)


def test_bad_loss_options():
    x, idx = torch.zeros(2), torch.tensor([0])
    with pytest.raises(ValueError, match="expected one of"):
        dpo_loss(x, idx, idx + 1, idx, 1, beta=0.1, kind="hinge")
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo_loss(x, idx, idx + 1, idx, 1, beta=0.1, kind="ipo", label_smoothing=0.1)


def _pair_rows(n: int = 12) -> list[dict]:
    prompts = ["Say hi.", "Name a fruit.", "Count to three.", "What is 2 plus 2?", "Pick a letter.", "Go."]
    return [{"prompt": prompts[i % len(prompts)], "chosen": "a.", "rejected": "bcd"[i % 3] + "."} for i in range(n)]


def _mixed_rows(n: int) -> list[dict]:
    """Pairs whose chosen answer is 'a.' on even rows and another letter on odd rows."""
    rows = _pair_rows(n)
    for r in rows[1::2]:
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
    return rows


def test_large_beta_is_a_pairwise_logistic_on_brute_force_logprobs():
    """The model-side pipeline (packed rows, fused log-prob kernel, per-response sums, pair
    indexing) against log-probs from full-vocabulary log_softmax on one padded sequence at a
    time: at beta = 50 the loss is far from its linear regime, so any error in sign, scale or
    pairing shows; and loss / beta tends to the hinge max(0, -h) as beta grows."""
    torch.manual_seed(0)
    model = _sft_model(steps=10)
    ref = _sft_model(seed=1, steps=10)
    rows = _mixed_rows(4)
    comps = [parse_preference(r) for r in rows]
    groups = [RankedGroup(encode_comparison(TOK, c, 64)[0], ranking_pairs(c.ranking)) for c in comps]
    batch, used = pack_ranked(groups, 4, 64, TOK.pad_id)
    assert used == 4 and len(batch.spans) == 8 and batch.idx.shape[0] == 4  # several responses per row

    def packed(m):
        lp, _ = m.token_logprobs(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens)
        return sequence_logprobs(lp, batch)

    def brute(m, ids, labels):
        logits, _ = m(torch.tensor([ids]))
        logp = torch.log_softmax(logits[0].float(), -1)
        return sum(logp[t, y] for t, y in enumerate(labels) if y != -100)

    x = batch.extras
    logratio = packed(model) - packed(ref).detach()
    per_response = [brute(model, ids, lab) - brute(ref, ids, lab).detach() for g in groups for ids, lab in g.examples]
    h = torch.stack([per_response[2 * i] - per_response[2 * i + 1] for i in range(4)])
    assert (h > 0).any() and (h < 0).any()  # both orders occur: a sign error cannot hide
    beta = 4.0 / float(h.detach().abs().max())  # the largest |beta h| is 4: curved, not saturated
    loss, _ = dpo_loss(logratio, x["better"], x["worse"], x["prompt"], x["n_prompts"], beta)
    logistic = F.softplus(-beta * h).mean()  # -log sigmoid(beta h), one pair per prompt
    assert torch.allclose(loss, logistic, rtol=1e-4)
    w = model.blocks[0].attn.qkv.weight
    g_dpo, = torch.autograd.grad(loss, w, retain_graph=True)
    g_ref, = torch.autograd.grad(logistic, w, retain_graph=True)
    assert float(g_ref.abs().max()) > 0
    assert torch.allclose(g_dpo, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))
    h = h.detach()
    for big in (1e3 * beta, 1e5 * beta):
        l_big, _ = dpo_loss(logratio.detach(), x["better"], x["worse"], x["prompt"], x["n_prompts"], big)
        assert math.isclose(float(l_big) / big, float(torch.relu(-h).mean()), rel_tol=1e-2, abs_tol=1e-6)


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    from fastgpt.checkpoint import save_checkpoint
    root = tmp_path_factory.mktemp("dpo")
    sft = _sft_model()
    save_checkpoint(root / "sft", model=sft, model_kind="gpt", model_config=sft.config, tokenizer=TOK, stage="sft")
    data = write_jsonl(root / "pairs.jsonl", _pair_rows(24))
    return {"sft": str(root / "sft"), "data": data}


def _cfg(sft_ckpt, out, **kw) -> DPOConfig:
    base = dict(out_dir=str(out), init_from=sft_ckpt["sft"], data=sft_ckpt["data"], device="cpu", batch_size=4,
                epochs=0, max_steps=12, lr=3e-3, warmup_steps=0, beta=0.5, progress=False, val_fraction=0.25)
    base.update(kw)
    return DPOConfig(**base)


@torch.no_grad()
def _p_letter_a(model) -> float:
    """Mean share of 'a' among the letters a-d as the first answer token (DPO may lower the
    chosen answer's probability too, only less than the rejected ones': the share is what moves)."""
    ps = []
    for p in ["Say hi.", "Name a fruit.", "Go."]:
        ids = encode_prompt(TOK, prompt_messages(p))
        logits, _ = model(torch.tensor([ids]))
        letters = torch.softmax(logits[0, -1].float(), -1)[list(b"abcd")]
        ps.append(float(letters[0] / letters.sum()))
    return sum(ps) / len(ps)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_learns_a_planted_preference(sft_ckpt, tmp_path, lora):
    before = _p_letter_a(load_model(sft_ckpt["sft"])[0])
    kw = dict(lora_rank=4, lora_alpha=8, lr=5e-2, max_steps=24) if lora else {}
    summary = dpo(_cfg(sft_ckpt, tmp_path / "run", **kw))
    model, _, ckpt = load_model(tmp_path / "run", kind="gpt")  # a plain GPT: adapters merged
    assert ckpt["model_kind"] == "policy" and type(model.blocks[0].attn.qkv) is torch.nn.Linear
    after = _p_letter_a(model)
    assert before < 0.3 and after > before + 0.15, (before, after)  # a quarter each -> "a" first
    assert summary["eval"]["val_accuracy"] == 1.0 and summary["eval"]["val_margin"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "logp_chosen" in r]
    assert train[-1]["logp_chosen"] > train[-1]["logp_rejected"]
    if lora:  # the base weights are the SFT model's; only adapters moved (and they are in the file)
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
        sft = load_model(sft_ckpt["sft"])[0].state_dict()
        assert torch.equal(state["policy.blocks.0.attn.qkv.lora_base"], sft["blocks.0.attn.qkv.weight"])
        assert not torch.equal(state["policy.blocks.0.attn.qkv.weight"], sft["blocks.0.attn.qkv.weight"])


def test_reference_on_the_fly_matches_precomputed(sft_ckpt, tmp_path):
    a = dpo(_cfg(sft_ckpt, tmp_path / "a", max_steps=2))
    b = dpo(_cfg(sft_ckpt, tmp_path / "b", max_steps=2, precompute_ref=False))
    assert a["eval"]["val_loss"] == pytest.approx(b["eval"]["val_loss"], rel=1e-4)


def test_ipo_and_conservative_run_and_bad_options_fail(sft_ckpt, tmp_path, capsys):
    dpo(_cfg(sft_ckpt, tmp_path / "ipo", loss="ipo", max_steps=2))
    dpo(_cfg(sft_ckpt, tmp_path / "cdpo", label_smoothing=0.1, max_steps=2))
    code = main(["dpo", "--init_from", sft_ckpt["sft"], "--data", sft_ckpt["data"], "--loss", "ipo",
                 "--label_smoothing", "0.1", "--out_dir", str(tmp_path / "x")])
    assert code == 2 and "sigmoid" in capsys.readouterr().err


def test_cli_runs_on_a_k_wise_ranking(tmp_path, capsys):
    sft = tiny_checkpoint(tmp_path / "sft", stage="sft")
    rows = [{"prompt": f"Question {i}?", "responses": ["yes.", "no.", "maybe."], "ranking": [2, [0, 1]]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "rankings.jsonl", rows)
    code = main(["dpo", "--init_from", sft, "--data", data, "--out_dir", str(tmp_path / "o"), "--device", "cpu",
                 "--progress", "false", "--epochs", "0", "--max_steps", "2", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "dpo: 2 steps" in out and "held-out reward accuracy" in out


def test_rerun_with_other_data_is_refused_and_resume_is_announced(sft_ckpt, tmp_path, capsys):
    from tests.helpers import rerun_tells_the_truth
    other = write_jsonl(tmp_path / "other.jsonl", _mixed_rows(12))
    base = ["--init_from", sft_ckpt["sft"], "--data", sft_ckpt["data"], "--batch_size", "4", "--epochs", "0"]
    rerun_tells_the_truth(capsys, "dpo", tmp_path / "run", base, {"data": other, "beta": "0.3"})
