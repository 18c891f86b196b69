"""Pieces every stage needs around the trainer: start-from models, vocabulary sizing, held-out
splits and the data plan of packed stages."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..chatdata import batches_per_epoch
from ..checkpoint import CheckpointError, load_model
from ..config import ModelConfig
from ..model import GPT
from ..tokenizer import Tokenizer
from ..trainer import DataPlan, distributed_env


def padded_vocab(tokenizer: Tokenizer, multiple: int = 64) -> int:
    """Model vocabulary: the tokenizer's, rounded up so the lm_head matmul tiles evenly on GPUs."""
    return -(-tokenizer.vocab_size // multiple) * multiple


def load_language_model(source: str, device: str = "cpu") -> tuple[GPT, Tokenizer | None, ModelConfig]:
    """A GPT from a fastgpt checkpoint (any stage; a PPO checkpoint gives its policy) or from a
    Hugging Face GPT-2 folder written as ``hf:<folder>``; the HF path returns no tokenizer unless
    the folder has a tokenizer.json."""
    if source.startswith("hf:"):
        from ..hf import load_hf_gpt2
        folder = Path(source[3:])
        model, cfg = load_hf_gpt2(folder)
        tok = None
        if (folder / "tokenizer.json").exists():
            from ..tokenizer import load_tokenizer
            tok = load_tokenizer(folder / "tokenizer.json")
        return model, tok, cfg
    model, tok, _ = load_model(source, kind="gpt", device=device)
    return model, tok, model.config  # type: ignore[return-value]


def require_same_tokenizer(a: Tokenizer, b: Tokenizer, what: str) -> None:
    if a.to_dict() != b.to_dict():
        raise CheckpointError(f"{what} was trained with another tokenizer ({a.kind} vs {b.kind}, "
                              f"{a.vocab_size} vs {b.vocab_size} ids)")


def set_dropout(model: nn.Module, p: float) -> None:
    """Dropout for this run only: the saved model config keeps its own value, so later stages
    (reward, PPO) do not inherit dropout they did not ask for."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast weights only: buffers such as the RoPE tables keep their fp32 precision."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index split; at least one of each once there are two items."""
    ids = list(range(n))
    random.Random(seed).shuffle(ids)
    n_val = min(n - 1, max(1 if n >= 2 and fraction > 0 else 0, round(n * fraction)))
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def packed_plan(cfg: Any, group_lengths: list[list[int]], block_size: int, unit: str, val_size: int) -> DataPlan:
    """The plan of a stage that packs whole groups (a conversation, one prompt's ranked responses)
    into ``batch_size`` rows of ``block_size`` tokens. With ``cfg.epochs > 0`` it also sets
    ``cfg.max_steps`` to that many passes over the groups."""
    per_step = cfg.grad_accum * distributed_env().world_size
    batches = batches_per_epoch(group_lengths, cfg.batch_size, block_size)
    if cfg.epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * batches / per_step))
    return DataPlan(len(group_lengths), unit, batches / per_step, cfg.batch_size * block_size * per_step,
                    val_size=val_size, val_unit=unit)
