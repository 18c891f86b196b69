"""Small builders shared by the stage tests: a tiny model, its checkpoint, JSONL files, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Iterable

import torch

from fastgpt.checkpoint import save_checkpoint
from fastgpt.config import ModelConfig
from fastgpt.model import GPT
from fastgpt.tokenizer import ByteTokenizer

TINY = dict(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=32)
TOK = ByteTokenizer()


def tiny_checkpoint(path: Any, seed: int = 0, stage: str = "pretrain") -> str:
    """A randomly initialised tiny GPT saved as a ``stage`` checkpoint at ``path``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**TINY)
    save_checkpoint(path, model=GPT(cfg), model_kind="gpt", model_config=cfg, tokenizer=TOK, stage=stage)
    return str(path)


def write_jsonl(path: Any, rows: Iterable[Any]) -> str:
    """Rows as JSON lines; a str row is written as it is (for malformed-line tests)."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``fastgpt ARGS`` in a fresh process (what a user types), output captured."""
    return subprocess.run([sys.executable, "-m", "fastgpt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def rerun_tells_the_truth(capsys: Any, command: str, out_dir: Any, base: list[str], changed: dict[str, str],
                          steps: int = 2) -> None:
    """A stage command re-run into its own out_dir (issue 14): other data or settings are refused
    in one line naming them and the ways out, leaving the checkpoint as it was; a longer
    max_steps resumes with 'resuming <out_dir> from step N of M' and a summary that counts this
    run apart from the total."""
    from pathlib import Path

    from fastgpt.cli import main
    args = [command, *map(str, base), "--out_dir", str(out_dir), "--progress", "false", "--device", "cpu"]
    assert main([*args, "--max_steps", str(steps)]) == 0
    capsys.readouterr()
    ckpt = Path(out_dir) / "checkpoint.pt"
    before = ckpt.read_bytes()
    flags = [x for k, v in changed.items() for x in (f"--{k}", v)]
    assert main([*args, "--max_steps", str(steps), *flags]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"fastgpt {command}: error" in lines[0], err
    for name in ("--fresh", "--out_dir", *changed):
        assert name in lines[0], (name, lines[0])
    assert ckpt.read_bytes() == before
    assert main([*args, "--max_steps", str(steps + 1)]) == 0
    out = capsys.readouterr().out
    assert f"{command}: resuming {out_dir} from step {steps} of {steps + 1}" in out
    assert f"{command}: 1 step in " in out and f"this run ({steps + 1} in all, " in out, out
