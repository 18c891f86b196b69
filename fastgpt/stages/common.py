"""Pieces every stage needs around the trainer: start-from models, their settings, tokenizer
checks, the micro-batch size, vocabulary sizing, held-out splits, the data plan of packed stages,
LoRA adapters and the frozen reference of the preference and RL stages."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from ..chatdata import batches_per_epoch
from ..checkpoint import CheckpointError, load_model
from ..config import START_SETTINGS, ConfigError, ModelConfig, TrainConfig
from ..data import IGNORE_INDEX
from ..lora import AdaptersOff, adapters_off, apply_lora, has_adapters, trainable_parameters
from ..model import GPT
from ..tokenizer import Tokenizer, load_tokenizer
from ..trainer import DataPlan, distributed_env

AUTO_MAX_ROWS = 16           # batch_size=0 picks at most this many rows per micro-batch
CPU_MEMORY_BUDGET = 4e9      # ... and on a CPU sizes them to fit this much memory


def padded_vocab(tokenizer: Tokenizer, multiple: int = 64) -> int:
    """Model vocabulary: the tokenizer's, rounded up so the lm_head matmul tiles evenly on GPUs."""
    return -(-tokenizer.vocab_size // multiple) * multiple


def load_language_model(source: str, device: str = "cpu") -> tuple[GPT, Tokenizer | None, ModelConfig]:
    """A GPT from a fastgpt checkpoint (any stage; a PPO checkpoint gives its policy) or from a
    Hugging Face model folder written as ``hf:<folder>`` (GPT-2 or the Llama family), with the
    folder's tokenizer and chat template; None as the tokenizer when the folder has none."""
    if source.startswith("hf:"):
        from ..hf import load_hf_model
        folder = Path(source[3:])
        model, cfg = load_hf_model(folder)
        has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()
        return model, load_tokenizer(folder) if has_tokenizer else None, cfg
    model, tok, _ = load_model(source, kind="gpt", device=device)
    return model, tok, model.config  # type: ignore[return-value]


def load_start_model(init_from: str, tokenizer: str = "") -> tuple[GPT, Tokenizer]:
    """The language model a stage starts from and its tokenizer.

    A fastgpt checkpoint brings its own tokenizer; a Hugging Face folder (``hf:<folder>``) its
    tokenizer and chat template, or ``tokenizer`` when given. The vocabulary grows when the
    tokenizer has more ids than the model (chat special tokens added to a GPT-2 BPE).
    """
    if not init_from:
        raise ConfigError("init_from is required: a fastgpt checkpoint or hf:<Hugging Face model folder>")
    model, tok, _ = load_language_model(init_from)
    if tokenizer:
        if not init_from.startswith("hf:"):
            raise ConfigError(f"tokenizer={tokenizer}: a fastgpt checkpoint brings its own tokenizer")
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise ConfigError(f"init_from={init_from}: no tokenizer.json in the folder; pass tokenizer=<file>")
    if model.config.vocab_size < tok.vocab_size:
        from ..hf import resize_vocab
        model, _ = resize_vocab(model, padded_vocab(tok))
    return model, tok


def apply_start_settings(model: GPT, requested: ModelConfig, source: str) -> None:
    """Use the settings of ``requested`` that differ from ModelConfig's defaults on a model
    started from ``source`` (the command line refuses every other model flag by name). The context
    may shrink (the RoPE tables or learned positions are cut; no weight changes) and dropout
    change; any other setting would need other weights and is refused with one line naming it."""
    defaults = ModelConfig()
    have = model.config
    given = {f.name for f in fields(ModelConfig) if getattr(requested, f.name) != getattr(defaults, f.name)}
    for name in sorted(given):
        want = getattr(requested, name)
        if want == getattr(have, name) or name in START_SETTINGS:
            continue
        raise ConfigError(f"model.{name}={want!r}: the model comes from init_from={source} (its {name} is "
                          f"{getattr(have, name)!r}); only model.block_size (up to its context) and "
                          "model.dropout can change without other weights")
    if "dropout" in given:
        set_dropout(model, requested.dropout)
        have.dropout = requested.dropout
    if "block_size" in given:
        shorten_context(model, requested.block_size, f"model.block_size={requested.block_size}")


def shorten_context(model: GPT, block_size: int, where: str) -> None:
    """Train ``model`` at a context of ``block_size`` tokens, at most its own: the RoPE tables or
    the learned position embeddings are cut to it, and its config says so from now on."""
    have = model.config.block_size
    if not 0 < block_size <= have:
        raise ConfigError(f"{where}: expected a context between 1 and the model's {have} tokens")
    if block_size == have:
        return
    if model.wpe is not None:
        model.wpe.weight = nn.Parameter(model.wpe.weight.detach()[:block_size].clone())
        model.wpe.num_embeddings = block_size
    else:
        model.rope_cos, model.rope_sin = model.rope_cos[:block_size], model.rope_sin[:block_size]
    model.config.block_size = block_size


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """kind, vocabulary size and a hash of the whole tokenizer (its tokenizer.json and chat format)."""
    digest = hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{tok.kind} tokenizer, {tok.vocab_size:,} ids, sha256 {digest}"


def micro_batch_rows(cfg: TrainConfig, model_cfg: ModelConfig, stage: str, seq_len: int,
                     device: torch.device) -> int:
    """``cfg.batch_size``, or for 0 the largest micro-batch of rows of ``seq_len`` tokens that
    ``fastgpt plan`` fits in the device's memory (a CPU: ``CPU_MEMORY_BUDGET``), at most
    ``AUTO_MAX_ROWS``."""
    if cfg.batch_size:
        return cfg.batch_size
    from ..plan import plan
    if device.type == "cuda":
        budget = 0.9 * torch.cuda.get_device_properties(device).total_memory
        settings = dict(backend="fused", amp=cfg.dtype != "fp32")
    else:
        budget, settings = CPU_MEMORY_BUDGET, dict(backend="reference", amp=False)
    rows = plan(model_cfg, stage, seq_len=seq_len, budget=budget, grad_checkpointing=cfg.grad_checkpointing,
                **settings).max_rows
    return max(1, min(AUTO_MAX_ROWS, rows))


def require_same_tokenizer(a: Tokenizer, b: Tokenizer, what: str, hint: str = "") -> None:
    """Refuse ``b`` (the tokenizer of ``what``) unless it is ``a``, naming both."""
    if a.to_dict() != b.to_dict():
        raise CheckpointError(f"{what} uses another tokenizer (a {tokenizer_fingerprint(b)}; the model's is a "
                              f"{tokenizer_fingerprint(a)}){hint}")


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
                temperature: float = 1.0, lm_idx: torch.Tensor | None = None, lm_targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log p(target), entropy) per token, and the LM loss on an optional pre-training batch
        (GRPO with PPO-ptx), in one forward for DDP."""
        lp, ent = self.policy.token_logprobs(idx, targets, cu_seqlens=cu_seqlens, temperature=temperature,
                                             ignore_index=IGNORE_INDEX)
        lm_loss = self.policy(lm_idx, lm_targets)[1] if lm_idx is not None else None
        return lp, ent, lm_loss


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
