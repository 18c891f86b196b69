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
