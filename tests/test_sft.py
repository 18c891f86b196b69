"""SFT: exact loss masking, packing equivalence, data validation, resume order, CLI and learning."""
from __future__ import annotations

import json

import pytest
import torch

from fastgpt.chatdata import EpochOrder, pack_groups
from fastgpt.checkpoint import load_checkpoint
from fastgpt.config import ModelConfig
from fastgpt.data import IGNORE_INDEX, DataError
from fastgpt.model import GPT
from fastgpt.stages.sft import SFTConfig, SFTTask, encode_sft_example, load_conversations, sft
from fastgpt.tokenizer import encode_chat
from helpers import TINY, TOK, cli, rerun_tells_the_truth, tiny_checkpoint, write_jsonl


def convo(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i}."}]}


# ------------------------------------------------------------------- loss masking
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def test_trained_positions_are_exactly_assistant_tokens_and_end():
    ids, mask = encode_chat(TOK, MSGS)
    (inp, labels), truncated = encode_sft_example(TOK, MSGS, 64)
    assert not truncated and inp == ids[:-1]
    trained = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    # every trained position predicts the next id, and that id is assistant text or its <|end|>
    assert all(labels[t] == ids[t + 1] and mask[t + 1] for t in trained)
    # ...and every assistant id is trained on
    assert {t + 1 for t in trained} == {j for j, m in enumerate(mask) if m}
    targets = [ids[t + 1] for t in trained]
    assert targets == TOK.encode("hello") + [TOK.end_id] + TOK.encode("4") + [TOK.end_id]


def test_prompt_tokens_do_not_reach_the_loss():
    """A trailing user turn is never context for an assistant token, so changing it may change
    the loss only if user tokens leaked into it; the loss must also equal a hand-computed one."""
    model = GPT(ModelConfig(**TINY)).eval()
    a = MSGS + [{"role": "user", "content": "thanks!"}]
    b = MSGS + [{"role": "user", "content": "zzzzzzzzzzzzz"}]
    losses = []
    for msgs in (a, b):
        ex, _ = encode_sft_example(TOK, msgs, 64)
        batch, _ = pack_groups([[ex]], 1, 64, TOK.pad_id)
        with torch.no_grad():
            _, loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    ids, mask = encode_chat(TOK, MSGS)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    pos = [t for t in range(len(ids) - 1) if mask[t + 1]]
    ref = torch.nn.functional.cross_entropy(logits[0, pos], torch.tensor([ids[t + 1] for t in pos]))
    assert losses[0] == pytest.approx(float(ref), abs=1e-5)


def test_packed_loss_equals_separate_runs():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY)).eval()
    examples = [encode_sft_example(TOK, [{"role": "user", "content": "u" * n},
                                         {"role": "assistant", "content": "ab" * n}], 64)[0] for n in (3, 9, 5, 12)]
    batch, used = pack_groups([[e] for e in examples], 2, 64, TOK.pad_id)
    assert used == 4 and batch.efficiency < 1
    _, per_tok = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                       reduction="none")
    flat = per_tok.reshape(-1)
    for (ids, labels), (s, e) in zip(examples, batch.spans):
        _, alone = model(torch.tensor([ids]), torch.tensor([labels]), reduction="none")
        torch.testing.assert_close(flat[s:e], alone[0], atol=1e-5, rtol=1e-5)
    # padding is <|pad|>, never <|end|>
    pad_area = torch.ones(batch.idx.numel(), dtype=torch.bool)
    for s, e in batch.spans:
        pad_area[s:e] = False
    assert (batch.idx.reshape(-1)[pad_area] == TOK.pad_id).all()


# ----------------------------------------------------------------------- bad data
def test_bad_records_are_skipped_counted_and_named(tmp_path, capsys):
    long = {"prompt": "p", "response": "x" * 200}
    no_room = {"prompt": "p" * 200, "response": "x"}
    rows = [convo(i) for i in range(40)] + [
        "{not json", {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}]},
        no_room, long, {"prompt": "p", "response": "r", "system": "s"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, msgs, report = load_conversations(path, TOK, 64, max_bad_fraction=0.1)
    assert len(examples) == 42 and len(report.bad) == 4 and report.truncated == 1
    assert report.bad[0].startswith(f"{path}:41: malformed JSON")
    assert "no assistant turn" in report.bad[1] and "unknown role 'wizard'" in report.bad[2]
    assert msgs[-1][0] == {"role": "system", "content": "s"}
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "skipped 4 of 46" in err and "truncated 1" in err
    with pytest.raises(DataError, match="4 of 46 conversations are bad"):
        load_conversations(path, TOK, 64, max_bad_fraction=0.05)


def test_cli_bad_data_is_one_line_exit_2(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre")
    path = write_jsonl(tmp_path / "bad.jsonl", [convo(0), "{oops", {"messages": []}])
    r = cli("sft", "--init_from", ckpt, "--data", path, "--out_dir", str(tmp_path / "o"), "--progress", "false")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()  # the error alone: no warning that repeats it first
    assert len(err) == 1 and "bad.jsonl" in err[0] and "max_bad_fraction" in err[0] and "Traceback" not in r.stderr
    r = cli("sft", "--data", path, "--out_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "init_from is required" in r.stderr


# ------------------------------------------------------------------- order, resume
def test_epoch_order_covers_each_item_and_resumes_exactly():
    order = EpochOrder(10, seed=3)
    seen = []
    for _ in range(5):
        w = order.window([[1]] * 10, 1)
        seen += w[:2]
        order.advance(2)
    assert sorted(seen) == list(range(10))
    state = order.state_dict()
    nxt = order.window([[1]] * 10, 3)
    again = EpochOrder(10, seed=3)
    again.load_state_dict(state)
    assert again.window([[1]] * 10, 3) == nxt and again.epoch == 1


def test_task_batches_resume_identically(tmp_path):
    examples = [encode_sft_example(TOK, convo(i)["messages"], 64)[0] for i in range(30)]
    cfg = SFTConfig(batch_size=2, seed=1)
    a = SFTTask(cfg, examples, [], [], TOK, 64, torch.device("cpu"))
    for _ in range(3):
        a.next_batch()
    b = SFTTask(cfg, examples, [], [], TOK, 64, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert torch.equal(a.next_batch().idx, b.next_batch().idx)


# ------------------------------------------------------------------ CLI, learning
def test_cli_sft_smoke(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre")
    data = write_jsonl(tmp_path / "d.jsonl", [convo(i) for i in range(20)] + [{"prompt": "x", "response": "y"}])
    r = cli("sft", "--init_from", ckpt, "--data", data, "--out_dir", str(tmp_path / "sft"), "--max_steps", "2",
            "--batch_size", "2", "--progress", "false", "--eval_format_prompts", "1", "--eval_max_new_tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "sft: 2 steps" in r.stdout and "val_loss" in r.stdout
    c = load_checkpoint(tmp_path / "sft")
    assert c["stage"] == "sft" and c["model_kind"] == "gpt"
    metrics = [json.loads(ln) for ln in open(tmp_path / "sft" / "metrics.jsonl")]
    assert any("packing_efficiency" in m for m in metrics)


def test_sft_from_hf_folder_grows_vocab(tmp_path):
    from fastgpt.hf import save_hf
    torch.manual_seed(0)
    save_hf(GPT(ModelConfig(**{**TINY, "vocab_size": 256})), tmp_path / "hf")
    data = write_jsonl(tmp_path / "d.jsonl", [convo(i) for i in range(8)])
    cfg = SFTConfig(init_from=f"hf:{tmp_path / 'hf'}", tokenizer="byte", data=data, out_dir=str(tmp_path / "o"),
                    max_steps=1, batch_size=2, progress=False, eval_format_prompts=0)
    sft(cfg)
    assert load_checkpoint(tmp_path / "o")["model_config"]["vocab_size"] == 320


def test_sft_val_loss_falls_on_world_data(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre")
    from fastgpt.demo.builtin import fill_builtin_data
    cfg = SFTConfig(init_from=ckpt, out_dir=str(tmp_path / "sft"), max_steps=60, batch_size=8, lr=3e-3,
                    warmup_steps=5, eval_interval=10, progress=False, dropout=0.0, eval_format_prompts=0)
    summary = sft(fill_builtin_data(cfg))
    evals = [json.loads(ln)["eval/val_loss"] for ln in open(tmp_path / "sft" / "metrics.jsonl")
             if "eval/val_loss" in ln]
    assert summary["data"]["truncated"] > 0  # world conversations exceed 64 tokens: counted, not silent
    assert evals[-1] < evals[0] - 0.5, evals


def test_sft_resumes_from_its_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "pre")
    data = write_jsonl(tmp_path / "d.jsonl", [convo(i) for i in range(30)])
    kw = dict(init_from=ckpt, data=data, out_dir=str(tmp_path / "o"), batch_size=1, progress=False,
              eval_format_prompts=0, ckpt_interval=1)
    sft(SFTConfig(max_steps=2, **kw))
    state = load_checkpoint(tmp_path / "o")["task"][0]
    assert state["pos"] > 0
    summary = sft(SFTConfig(max_steps=3, **kw))
    assert summary["resumed_from"] == 2 and summary["steps"] == 3


def test_rerun_with_other_data_is_refused_and_resume_is_announced(tmp_path, capsys):
    """The issue's repro: the same out_dir with 5 of the conversations and another lr."""
    ckpt = tiny_checkpoint(tmp_path / "pre")
    demos = write_jsonl(tmp_path / "demos.jsonl", [convo(i) for i in range(20)])
    five = write_jsonl(tmp_path / "d5.jsonl", [convo(i) for i in range(5)])
    base = ["--init_from", ckpt, "--data", demos, "--batch_size", "2", "--eval_format_prompts", "0"]
    rerun_tells_the_truth(capsys, "sft", tmp_path / "R", base, {"data": five, "lr": "1e-3"})
    assert load_checkpoint(tmp_path / "R")["config"]["data"] == demos
