"""Pieces every stage needs around the trainer: start-from models and vocabulary sizing."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, load_model
from ..config import ModelConfig
from ..model import GPT
from ..tokenizer import Tokenizer


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
