"""The shared trainer loop: exact resume, accumulation, schedule, non-finite losses, checkpoints, DDP."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastgpt import checkpoint as ckpt_mod
from fastgpt.checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, load_model, save_checkpoint)
from fastgpt.config import TrainConfig, build_config
from fastgpt.model import GPT
from fastgpt.stages import pretrain as pretrain_mod
from fastgpt.stages.pretrain import PretrainConfig, pretrain
from fastgpt.tokenizer import ByteTokenizer
from fastgpt.trainer import Trainer, TrainingError, lr_at

MODEL = {"model.block_size": 32, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32}


def pre_cfg(out: Path, data: Path, **kw) -> PretrainConfig:
    base = {**MODEL, "out_dir": str(out), "data": str(data), "device": "cpu", "batch_size": 4, "max_steps": 8,
            "warmup_steps": 2, "lr": 3e-3, "eval_interval": 3, "eval_batches": 2, "log_interval": 2,
            "ckpt_interval": 4, "progress": False, "seed": 5}
    return build_config(PretrainConfig, overrides={**base, **kw})


def assert_same_tensors(a, b, path="") -> None:
    """torch.equal on every tensor of two nested structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{path}[{i}]")


# ------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("accum", [1, 2])
def test_exact_resume_bit_identical(tmp_path, tiny_data, monkeypatch, accum):
    """Stopped after step 6 (last checkpoint at 4) and resumed == never stopped, bit for bit."""
    kw = dict(grad_accum=accum, **{"model.dropout": 0.1})  # dropout: the torch RNG must be restored too
    full = pretrain(pre_cfg(tmp_path / "full", tiny_data, **kw))
    assert full["steps"] == 8 and full["resumed_from"] is None

    calls = {"n": 0}
    original = pretrain_mod.PretrainTask.next_batch

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] > 6 * accum:  # steps 0..5 ran, the 7th stops the run
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(pretrain_mod.PretrainTask, "next_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        pretrain(pre_cfg(tmp_path / "cut", tiny_data, **kw))
    assert load_checkpoint(tmp_path / "cut")["trainer"]["step"] == 4
    monkeypatch.setattr(pretrain_mod.PretrainTask, "next_batch", original)
    resumed = pretrain(pre_cfg(tmp_path / "cut", tiny_data, **kw))
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 8

    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert a["trainer"] == b["trainer"]
    assert a["task"] == b["task"]  # same data position
    assert resumed["eval"] == full["eval"]


def test_resume_other_stage_and_other_architecture(tmp_path, tiny_data):
    pretrain(pre_cfg(tmp_path / "run", tiny_data, max_steps=2))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="another architecture"):
        pretrain(pre_cfg(tmp_path / "run", tiny_data, max_steps=4, **{"model.n_layer": 1}))
    with pytest.raises(CheckpointError, match="another architecture"):
        pretrain(pre_cfg(tmp_path / "run", tiny_data, max_steps=4, **{"model.n_embd": 64}))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    # a checkpoint written by another stage
    ck = load_checkpoint(tmp_path / "run")
    ck["stage"] = "sft"
    atomic_torch_save(ck, tmp_path / "sft" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="is a sft checkpoint, cannot resume it as pretrain"):
        pretrain(pre_cfg(tmp_path / "sft", tiny_data, max_steps=4))
    # resume=false starts over instead
    summary = pretrain(pre_cfg(tmp_path / "sft", tiny_data, max_steps=2, resume=False))
    assert summary["resumed_from"] is None and load_checkpoint(tmp_path / "sft")["stage"] == "pretrain"


def test_pretrain_outputs(tmp_path, tiny_data):
    import json
    summary = pretrain(pre_cfg(tmp_path / "r", tiny_data, max_steps=4))
    ck = load_checkpoint(tmp_path / "r")
    assert ck["stage"] == "pretrain" and ck["model_kind"] == "gpt" and ck["trainer"]["step"] == 4
    assert ck["model_config"]["vocab_size"] == 320 and ck["config"]["max_steps"] == 4
    assert summary["tokens"] == 4 * 4 * 32
    records = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4] and all(r["tokens_per_s"] > 0 for r in train)
    assert any("eval/val_loss" in r for r in records)
    model, tok, _ = load_model(tmp_path / "r")
    assert isinstance(model, GPT) and not model.training and tok.kind == "byte"
    with pytest.raises(CheckpointError, match="expected a reward/value model"):
        load_model(tmp_path / "r", kind="scalar")


# --------------------------------------------------------------------- accumulation
class FixedTask:
    """Deterministic batches cut from one fixed tensor; optional NaN losses at given calls."""

    def __init__(self, x, y, micro, nan_calls=()):
        self.x, self.y, self.micro, self.i, self.nan_calls = x, y, micro, 0, set(nan_calls)
        self.calls = 0

    def next_batch(self):
        n = self.x.shape[0]
        s = (self.i * self.micro) % n
        self.i += 1
        return self.x[s:s + self.micro], self.y[s:s + self.micro]

    def loss(self, model, batch):
        self.calls += 1
        _, loss = model(*batch)
        if self.calls in self.nan_calls:
            loss = loss * float("nan")
        return loss, {"seen": float(batch[0].shape[0])}

    def tokens(self, batch):
        return batch[0].numel()

    def evaluate(self, model):
        return {"val_loss": float(model(self.x, self.y)[1])}

    def state_dict(self):
        return {"i": self.i, "calls": self.calls}

    def load_state_dict(self, state):
        self.i, self.calls = state["i"], state["calls"]


def train_cfg(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), device="cpu", max_steps=3, warmup_steps=0, lr=1e-2, eval_interval=0,
                log_interval=1, ckpt_interval=100, progress=False, grad_clip=0.0)
    return dataclasses.replace(TrainConfig(), **{**base, **kw})


def test_grad_accumulation_equivalence(tmp_path, tiny_cfg):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 320, (4, 16), generator=g)
    y = torch.randint(0, 320, (4, 16), generator=g)
    models = []
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        torch.manual_seed(0)
        model = GPT(tiny_cfg)
        Trainer(train_cfg(tmp_path / f"r{micro}", grad_accum=accum, max_steps=2, grad_clip=1.0), model,
                FixedTask(x, y, micro), stage="test", tokenizer=ByteTokenizer()).fit()
        models.append(model)
    for other in models[1:]:
        for (name, a), b in zip(models[0].named_parameters(), other.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, TrainConfig(lr=2.0, warmup_steps=0, max_steps=5)) == pytest.approx(2.0)


def test_trainer_applies_schedule(tmp_path, tiny_cfg):
    x = torch.randint(0, 320, (2, 8))
    torch.manual_seed(0)
    cfg = train_cfg(tmp_path, max_steps=5, warmup_steps=2, lr=1e-3)
    t = Trainer(cfg, GPT(tiny_cfg), FixedTask(x, x, 2), stage="test", tokenizer=ByteTokenizer())
    t.fit()
    lrs = [r["lr"] for r in t.history if "lr" in r]
    assert lrs == pytest.approx([lr_at(s, cfg) for s in range(5)])


# --------------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_skipped(tmp_path, tiny_cfg):
    x = torch.randint(0, 320, (2, 8))
    torch.manual_seed(0)
    model = GPT(tiny_cfg)
    t = Trainer(train_cfg(tmp_path, max_steps=4, max_bad_steps=2), model, FixedTask(x, x, 2, nan_calls={2, 4}),
                stage="test", tokenizer=ByteTokenizer())
    summary = t.fit()
    assert summary["steps"] == 4 and summary["bad_steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(1 for r in t.history if r.get("event") == "skipped non-finite loss") == 2
    assert load_checkpoint(tmp_path)["trainer"]["bad_steps"] == 2


def test_nonfinite_loss_weights_untouched(tmp_path, tiny_cfg):
    """A skipped step changes nothing: NaN at call 2 == one fewer step without it."""
    x = torch.randint(0, 320, (2, 8))
    out = []
    for nan in ({2}, set()):
        torch.manual_seed(0)
        model = GPT(tiny_cfg)
        steps = 3 if nan else 2
        task = FixedTask(x, x, 2, nan_calls=nan)
        Trainer(train_cfg(tmp_path / str(bool(nan)), max_steps=2, lr=1e-2), model, task,
                stage="test", tokenizer=ByteTokenizer()).fit()
        assert task.calls == steps
        out.append(model.state_dict())
    assert_same_tensors(out[0], out[1])


def test_too_many_nonfinite_losses_stop(tmp_path, tiny_cfg):
    x = torch.randint(0, 320, (2, 8))
    torch.manual_seed(0)
    cfg = train_cfg(tmp_path, max_steps=10, ckpt_interval=2, max_bad_steps=3)
    t = Trainer(cfg, GPT(tiny_cfg), FixedTask(x, x, 2, nan_calls=set(range(4, 100))), stage="test",
                tokenizer=ByteTokenizer())
    with pytest.raises(TrainingError) as e:
        t.fit()
    msg = str(e.value)
    assert "\n" not in msg and "4 non-finite losses" in msg and "max_bad_steps=3" in msg and "step 3" in msg
    ck = load_checkpoint(tmp_path)
    assert ck["trainer"]["step"] == 2
    model, _, _ = load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------ checkpoints
def small_checkpoint(path, tiny_cfg, seed=0):
    torch.manual_seed(seed)
    model = GPT(tiny_cfg)
    return save_checkpoint(path, model=model, model_kind="gpt", model_config=tiny_cfg, tokenizer=ByteTokenizer(),
                           stage="pretrain"), model


def test_checkpoint_round_trip(tmp_path, tiny_cfg):
    path, model = small_checkpoint(tmp_path / "run", tiny_cfg)
    assert path == tmp_path / "run" / "checkpoint.pt"
    loaded, tok, ck = load_model(tmp_path / "run")
    assert_same_tensors(model.state_dict(), loaded.state_dict())
    assert loaded.lm_head.weight is loaded.wte.weight and ck["stage"] == "pretrain"
    loaded2, _, _ = load_model(path)  # the file itself works too
    assert_same_tensors(model.state_dict(), loaded2.state_dict())


def test_atomic_save_keeps_previous_file(tmp_path, tiny_cfg, monkeypatch):
    path, _ = small_checkpoint(tmp_path, tiny_cfg)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        small_checkpoint(tmp_path, tiny_cfg, seed=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left over
    load_model(tmp_path)


def test_killed_save_leftover_is_removed_on_next_start(tmp_path, tiny_data, capsys):
    """A process SIGKILLed inside a checkpoint save leaves its temporary file; the next run in
    that folder removes it and resumes from the intact checkpoint."""
    run = tmp_path / "run"
    pretrain(pre_cfg(run, tiny_data, max_steps=2))
    before = (run / "checkpoint.pt").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastgpt.checkpoint import atomic_torch_save
        def dying_save(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_torch_save({{"x": 1}}, {str(run / "checkpoint.pt")!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    leftovers = [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and (run / "checkpoint.pt").read_bytes() == before
    (run / "unrelated.tmp").write_text("not ours")
    out = pretrain(pre_cfg(run, tiny_data, max_steps=3))
    assert out["resumed_from"] == 2
    assert not leftovers[0].exists() and (run / "unrelated.tmp").exists()
    assert f"removed {leftovers[0]}" in capsys.readouterr().out


def test_checkpoint_gets_umask_permissions(tmp_path, tiny_cfg):
    old = os.umask(0o022)
    try:
        path, _ = small_checkpoint(tmp_path, tiny_cfg)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("keep", [0, 10, 1000, 0.5, -1])
def test_truncated_checkpoint(tmp_path, tiny_cfg, keep):
    path, _ = small_checkpoint(tmp_path, tiny_cfg)
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (len(raw) + keep if keep < 0 else keep)
    path.write_bytes(raw[:n])
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a fastgpt checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")


def test_other_architecture_weights(tmp_path, tiny_cfg):
    path, _ = small_checkpoint(tmp_path, tiny_cfg)
    ck = load_checkpoint(path)
    for cfg in (dataclasses.replace(tiny_cfg, n_layer=3), dataclasses.replace(tiny_cfg, n_embd=64),
                dataclasses.replace(tiny_cfg, position="rope")):
        with pytest.raises(CheckpointError, match="another architecture"):
            ckpt_mod.load_state_strict(GPT(cfg), ck["model"], str(path))


# ----------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from fastgpt.config import build_config
    from fastgpt.stages import pretrain as P
    out, data = sys.argv[1], sys.argv[2]
    original_fit = P.Trainer.fit
    def fit(self):
        summary = original_fit(self)
        torch.save(self.model.state_dict(), f"{out}/rank{self.dist.rank}.pt")
        return summary
    P.Trainer.fit = fit
    cfg = build_config(P.PretrainConfig, overrides={
        "model.block_size": 32, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32,
        "out_dir": out, "data": data, "device": "cpu", "batch_size": 2, "max_steps": 3, "warmup_steps": 1,
        "eval_interval": 2, "eval_batches": 1, "ckpt_interval": 2, "log_interval": 1, "progress": False})
    P.pretrain(cfg)
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_gloo_two_processes(tmp_path, tiny_data):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(out), str(tiny_data)], capture_output=True, text=True, timeout=170,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert_same_tensors(r0, r1)
    ck = load_checkpoint(out)
    assert_same_tensors(ck["model"], r0)
    assert ck["trainer"]["world_size"] == 2 and ck["trainer"]["step"] == 3 and len(ck["rng"]) == 2
    assert ck["task"][0] == ck["task"][1]  # one shared stream, each rank keeps its own batches of it
    assert ck["trainer"]["tokens_seen"] == 3 * 2 * 2 * 32  # both ranks' tokens
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "rank0.pt", "rank1.pt"]


# ------------------------------------------------------------------ resume: the truth
def test_resume_with_other_data_or_settings_is_refused(tmp_path, tiny_data, corpus_jsonl, capsys):
    """Only settings that cannot change what the run learns from may differ on resume; the saved
    checkpoint (and its config) is never touched by a refused run."""
    import shutil
    from fastgpt.data import prepare
    run = tmp_path / "run"
    pretrain(pre_cfg(run, tiny_data, max_steps=2))
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError) as e:
        pretrain(pre_cfg(run, tiny_data, max_steps=4, lr=1e-3, seed=6))
    msg = str(e.value)
    assert "\n" not in msg and "lr 0.003 -> 0.001" in msg and "seed 5 -> 6" in msg
    assert "--fresh" in msg and "--out_dir" in msg and "checkpoint's settings" in msg
    other = tmp_path / "other"
    prepare([corpus_jsonl], other, ByteTokenizer(), val_fraction=0.3, seed=1, progress=False)
    with pytest.raises(CheckpointError, match=r"data .*tiny.* -> .*other"):
        pretrain(pre_cfg(run, other, max_steps=4))
    same = tmp_path / "same"  # the same dataset under another path is the same data
    shutil.copytree(tiny_data, same)
    edited = tmp_path / "edited"  # the same path with other contents is not
    shutil.copytree(tiny_data, edited)
    pretrain(pre_cfg(tmp_path / "run2", edited, max_steps=2))
    prepare([corpus_jsonl], edited, ByteTokenizer(), val_fraction=0.3, seed=1, progress=False)
    with pytest.raises(CheckpointError, match="edited' other contents"):
        pretrain(pre_cfg(tmp_path / "run2", edited, max_steps=4))
    assert (run / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(run)["config"]["lr"] == 3e-3
    # safe changes resume: a longer schedule and other intervals, from another path to the same data
    capsys.readouterr()
    summary = pretrain(pre_cfg(run, same, max_steps=4, eval_interval=2, log_interval=1, progress=True))
    assert summary["resumed_from"] == 2 and summary["steps"] == 4 and summary["steps_this_run"] == 2
    assert f"pretrain: resuming {run} from step 2 of 4" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="at step 4, past max_steps=3"):
        pretrain(pre_cfg(run, tiny_data, max_steps=3))
    # --fresh (resume=false) starts over with any settings
    assert pretrain(pre_cfg(run, tiny_data, max_steps=2, lr=1e-3, resume=False))["resumed_from"] is None
    assert load_checkpoint(run)["config"]["lr"] == 1e-3


def test_a_finished_run_trains_nothing_and_keeps_its_checkpoint(tmp_path, tiny_data, capsys):
    run = tmp_path / "run"
    first = pretrain(pre_cfg(run, tiny_data, max_steps=3))
    before = (run / "checkpoint.pt").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    again = pretrain(pre_cfg(run, tiny_data, max_steps=3))
    assert again["steps_this_run"] == 0 and again["steps"] == 3 and again["resumed_from"] == 3
    assert again["eval"] == first["eval"] and again["seconds_total"] > again["seconds"]
    assert (run / "checkpoint.pt").read_bytes() == before and (run / "metrics.jsonl").read_text() == metrics
    assert "is finished (step 3 of 3): nothing to train" in capsys.readouterr().out


def test_metrics_after_resume_hold_each_step_once(tmp_path, tiny_data, monkeypatch):
    """A run killed after step 6 (checkpoint at 4) and resumed logs steps 5-6 once, not twice."""
    import json
    original = pretrain_mod.PretrainTask.next_batch
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return original(self)

    kw = dict(log_interval=1, eval_interval=0)
    monkeypatch.setattr(pretrain_mod.PretrainTask, "next_batch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        pretrain(pre_cfg(tmp_path / "cut", tiny_data, **kw))
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # 5 and 6 are past the checkpoint
    monkeypatch.setattr(pretrain_mod.PretrainTask, "next_batch", original)
    pretrain(pre_cfg(tmp_path / "cut", tiny_data, **kw))
    records = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert records == load_checkpoint(tmp_path / "cut")["history"]


def test_start_block_and_warnings(tmp_path, tiny_data, capsys):
    pretrain(pre_cfg(tmp_path / "r", tiny_data, max_steps=4))
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("pretrain: ")]
    assert "parameters, vocabulary 320, context 32; cpu fp32, 1 thread" in lines[0]
    assert lines[1] == "pretrain: micro-batch 4 rows x 32 tokens, grad_accum 1: 128 tokens per step"
    meta = __import__("fastgpt.data", fromlist=["load_meta"]).load_meta(tiny_data)
    train_tokens = meta["tokens"]["train"]
    assert f"data: {train_tokens:,} tokens; {meta['tokens']['val'] // 32} 32-token validation windows" in lines[2]
    assert f"max_steps 4 = {4 * 128 / train_tokens:.3g} epochs" in lines[2]
    assert f"warning: only {meta['tokens']['val'] // 32} 32-token validation windows held out" in err
    assert "epochs over" not in err
    pretrain(pre_cfg(tmp_path / "long", tiny_data, max_steps=300, batch_size=8, eval_interval=0,
                     ckpt_interval=300, log_interval=100))
    err = capsys.readouterr().err
    epochs = 300 * 256 / train_tokens
    assert f"pretrain: warning: {epochs:.0f} epochs over {train_tokens:,} tokens" in err


def test_plain_progress_lines_end_with_the_saved_evaluation(tmp_path, tiny_data, capsys):
    """Off a terminal (as under pytest) progress is plain lines, no carriage returns, and the last
    line's val_loss is the one the checkpoint holds."""
    import json
    summary = pretrain(pre_cfg(tmp_path / "r", tiny_data, max_steps=8, eval_interval=3, progress=True))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("pretrain: ") and "steps (" in ln]
    assert lines[-1].startswith("pretrain: 8/8 steps (100%)")
    saved = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    assert f"val_loss {saved['eval/val_loss']:.4g}" in lines[-1]
    assert summary["eval"]["val_loss"] == saved["eval/val_loss"]


def test_metrics_logger_hook_and_optional_sinks(tmp_path, tiny_data, monkeypatch):
    """metrics.jsonl always; extra loggers get the same records; TensorBoard is imported only
    when asked for, and a missing package is one clear error before any step."""
    import sys
    from fastgpt.errors import FastGPTError

    class Collect:
        def __init__(self):
            self.records, self.closed = [], False

        def log(self, record):
            self.records.append(record)

        def close(self):
            self.closed = True

    from fastgpt.data import dataset_tokenizer
    from fastgpt.stages.pretrain import PretrainTask
    cfg = pre_cfg(tmp_path / "r", tiny_data, max_steps=4)
    cfg.model.vocab_size = 320
    sink = Collect()
    Trainer(cfg, GPT(cfg.model), PretrainTask(cfg, 320, torch.device("cpu")), stage="pretrain",
            tokenizer=dataset_tokenizer(tiny_data), loggers=[sink]).fit()
    import json
    assert sink.closed and sink.records == [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").open()]
    assert "torch.utils.tensorboard" not in sys.modules and "wandb" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(FastGPTError, match="tensorboard=true needs the tensorboard package"):
        pretrain(pre_cfg(tmp_path / "tb", tiny_data, max_steps=2, tensorboard=True))
    assert not (tmp_path / "tb" / "checkpoint.pt").exists()
