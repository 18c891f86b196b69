"""Pieces every stage needs around the trainer: start-from models, vocabulary sizing, LoRA
adapters and the frozen reference of the preference and RL stages."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, load_model
from ..config import ModelConfig
from ..data import IGNORE_INDEX
from ..lora import AdaptersOff, adapters_off, apply_lora, has_adapters, trainable_parameters
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


def add_lora(model: nn.Module, cfg: Any, stage: str) -> nn.Module:
    """Rank-``cfg.lora_rank`` adapters on ``model`` (in place; nothing when it is 0): only they
    train from here on. Says how many parameters that leaves to train."""
    if cfg.lora_rank <= 0:
        return model
    layers = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    trainable, total = trainable_parameters(model)
    print(f"{stage}: LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha:g}) on {layers} layers: "
          f"{trainable:,} of {total:,} parameters train", flush=True)
    return model


Reference = GPT | AdaptersOff  # what a stage reads reference log-probs from (``token_logprobs``)


def reference_model(policy: GPT) -> Reference:
    """The frozen reference of a policy about to train: with LoRA, the policy itself with its
    adapters off (one copy of the weights); else a frozen copy, in bf16 on CUDA (forward only)."""
    if has_adapters(policy):
        return AdaptersOff(policy)
    ref = freeze(copy.deepcopy(policy))
    if next(ref.parameters()).device.type == "cuda":
        cast_parameters(ref, torch.bfloat16)
    return ref


@contextlib.contextmanager
def reference_generator(policy: GPT, ref: Reference) -> Iterator[GPT]:
    """A GPT that generates as the reference does: the frozen copy, or the policy with its
    adapters off for the length of the block."""
    if isinstance(ref, AdaptersOff):
        with adapters_off(policy):
            yield policy
    else:
        yield ref


class Policy(nn.Module):
    """The trainable module of DPO and GRPO: a GPT whose forward returns per-token (log
    p(target), entropy) of packed rows, each (B, T) fp32, through the fused log-prob kernel (a
    forward, so DDP sees the pass). Checkpoint kind ``policy``: ``load_model(kind="gpt")`` reads
    the GPT, so chat, later stages and export take it as a plain model."""

    def __init__(self, policy: GPT) -> None:
        super().__init__()
        self.policy = policy

    @property
    def config(self) -> ModelConfig:
        return self.policy.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy.token_logprobs(idx, targets, cu_seqlens=cu_seqlens, temperature=temperature,
                                          ignore_index=IGNORE_INDEX)
