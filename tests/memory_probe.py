"""Peak resident memory of one training step, measured by the kernel (run as a script).

For each case on the command line (JSON: model config, stage, rows, seq_len, grad_checkpointing),
one warm-up step creates the AdamW state, then the process's high-water mark is reset
(/proc/self/clear_refs) and a second step runs; the growth of the high-water mark over the
resident size before the step is printed. glibc must return freed blocks to the system at once
(MALLOC_MMAP_THRESHOLD_ set small by the caller) so that resident memory follows live tensors.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

from fastgpt.config import ModelConfig
from fastgpt.model import GPT, ScalarModel


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_growth(cfg: ModelConfig, stage: str, rows: int, seq_len: int, grad_checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = ScalarModel(cfg) if stage == "reward" else GPT(cfg)
    gpt = model.gpt if stage == "reward" else model
    gpt.grad_checkpointing = grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    idx = torch.randint(0, cfg.vocab_size, (rows, seq_len))

    def step() -> None:
        loss = model(idx)[:, -1].pow(2).mean() if stage == "reward" else model(idx, idx)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    before = status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts from the current resident size
    step()
    return status_bytes("VmHWM") - before


if __name__ == "__main__":
    torch.set_num_threads(1)
    for case in map(json.loads, sys.argv[1:]):
        growth = step_growth(ModelConfig(**case["model"]), case["stage"], case["rows"], case["seq_len"],
                             case["grad_checkpointing"])
        print(json.dumps({"growth": growth}), flush=True)
        gc.collect()
