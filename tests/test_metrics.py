"""Metric sinks: TensorBoard and wandb get the trainer's records when asked for (fakes stand in
for the packages, which the tests do not install)."""
from __future__ import annotations

import json
import sys
import types

from fastgpt.metrics import JsonlLogger, open_loggers

RECORDS = [{"step": 1, "lr": 0.1, "loss": 2.5, "tokens_per_s": 100.0}, {"step": 1, "eval/val_loss": 2.0},
           {"step": 2, "event": "skipped non-finite loss", "bad_steps": 1}, {"step": 2, "loss": float("nan")}]


def test_jsonl_starts_from_history_and_appends(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')  # a replayed step, gone
    sink = JsonlLogger(tmp_path, history=RECORDS[:1])
    sink.log(RECORDS[1])
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").open()] == RECORDS[:2]


def test_tensorboard_and_wandb_get_every_finite_number(tmp_path, monkeypatch):
    scalars, wandb_logs, events = [], [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            events.append(("tb", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            events.append(("tb closed",))

    class Run:
        def log(self, values, step):
            wandb_logs.append((values, step))

        def finish(self):
            events.append(("wandb finished",))

    def init(**kw):
        events.append(("wandb", kw["project"], kw["id"], kw["resume"]))
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    fake_wandb = types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    sinks = open_loggers(tmp_path, [], stage="sft", config={"lr": 0.1}, tensorboard=True, wandb=True)
    for record in RECORDS:
        for sink in sinks:
            sink.log(record)
    for sink in sinks:
        sink.close()
    assert ("tb", str(tmp_path / "tensorboard")) in events and ("wandb", "mine", "abc123", "allow") in events
    assert scalars == [("lr", 0.1, 1), ("loss", 2.5, 1), ("tokens_per_s", 100.0, 1), ("eval/val_loss", 2.0, 1),
                       ("bad_steps", 1.0, 2)]
    assert wandb_logs[0] == ({"lr": 0.1, "loss": 2.5, "tokens_per_s": 100.0}, 1) and len(wandb_logs) == 4
    assert (tmp_path / "wandb_id").read_text().strip() == "abc123"  # a resumed run continues this wandb run
    assert ("tb closed",) in events and ("wandb finished",) in events
