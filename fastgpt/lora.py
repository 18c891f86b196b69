"""LoRA: low-rank adapters on the GPT's linear layers, so only a few parameters train.

A target layer ``y = x W^T + b`` becomes ``y = x W^T + b + (alpha / r) * (x A^T) B^T`` with ``W``
and ``b`` frozen, ``A`` (r, in) random and ``B`` (out, r) zero: at the start the model computes
exactly what the base model computes, and AdamW state exists only for ``A`` and ``B``.

Why our own layer rather than peft: peft's ``inject_adapter_in_model`` does wrap any
``nn.Linear``, but three things fastgpt needs would then live outside our code or fight it:
(1) checkpoints must load as plain models everywhere (``load_model``, ``fastgpt chat``, the next
stage's ``init_from``, Hugging Face export) while a LoRA run still resumes bit for bit — here a
layer's state dict *is* the plain ``nn.Linear``'s (``weight`` merged) plus its adapter and frozen
base under ``lora_*`` names that :func:`strip_adapters` drops; (2) the frozen reference of DPO,
GRPO and PPO is the same module with adapters switched off (:func:`adapters_off`), one flag per
layer; (3) peft pulls in transformers, accelerate and the hub client for ~100 lines of math.

Targets: attention (``qkv``, ``proj``) and MLP (``up``, ``down``) layers. The lm_head cannot be
one, by decision: (1) the fused cross-entropy and log-prob kernels take ``lm_head.weight`` as an
operand and never build the (tokens x vocabulary) logits, so an adapter there would have to be
merged into a full (vocabulary x width) weight on every forward -- the size of the head itself,
with its gradient, the memory LoRA is meant to save; (2) in GPT-2 and most small models the head
is tied to the token embedding, and merging an adapter into the head would silently untie them
(a checkpoint could no longer load as the plain tied model). Adapting the head means full
fine-tuning. The tests show the cost on a preference that lives in the head: LoRA learns it
more slowly than full fine-tuning (``tests/test_grpo.py``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FastGPTError

TARGETS = ("qkv", "proj", "up", "down")   # attn.qkv, attn.proj, mlp.up, mlp.down
ADAPTER_ENTRIES = ("lora_A", "lora_B", "lora_base")  # state-dict names beside a layer's plain ones


class LoRAError(FastGPTError, ValueError):
    """Bad LoRA settings (one-line message)."""


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a frozen weight and bias and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.scale = alpha / rank
        self.enabled = True
        self.register_state_dict_post_hook(_save_merged)
        self.register_load_state_dict_pre_hook(_load_unmerged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, in fp32 and then the weight's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return (self.weight.detach().float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scale={self.scale:g}"


def _save_merged(module: LoRALinear, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # The plain layer's entry holds the merged weight, so the state dict loads into a plain GPT once
    # the lora_* entries are dropped; the frozen base is kept under its own name for exact resume.
    state[prefix + "lora_base"] = state[prefix + "weight"]
    state[prefix + "weight"] = module.merged_weight()


def _load_unmerged(module: LoRALinear, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if prefix + "lora_base" in state:
        state[prefix + "weight"] = state.pop(prefix + "lora_base")


# --------------------------------------------------------------------------------- model
def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip())
    if "lm_head" in names:
        raise LoRAError("lora_targets=lm_head: the output head takes no adapter (the fused loss kernels read its "
                        "weight directly, and it is tied to the embedding); expected a subset of "
                        f"{','.join(TARGETS)}")
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        raise LoRAError(f"lora_targets={','.join(names)!r}: expected a comma-separated subset of {','.join(TARGETS)}")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | Sequence[str] = TARGETS) -> int:
    """Freeze every parameter of ``model`` and put a rank-``rank`` adapter on each target layer
    (in place). Returns the number of adapted layers."""
    if rank < 1:
        raise LoRAError(f"lora_rank={rank}: expected >= 1")
    if alpha <= 0:
        raise LoRAError(f"lora_alpha={alpha}: expected > 0")
    names = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if name in names and type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, LoRALinear(child, rank, alpha))
    if not swaps:
        raise LoRAError(f"lora_targets={','.join(names)}: no such linear layers in the model")
    return len(swaps)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model (every adapter switched off) inside the block; a model
    without adapters is unchanged."""
    layers = lora_layers(model)
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer and put plain ``nn.Linear`` layers back (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                plain.weight.requires_grad_(child.weight.requires_grad)
                setattr(parent, name, plain)
    return model


def strip_adapters(state: dict[str, Any]) -> dict[str, Any]:
    """A LoRA model's state dict as a plain model's: the merged weights, without lora_* entries."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in ADAPTER_ENTRIES}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, tied weights counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class AdaptersOff:
    """The frozen reference of a LoRA policy without a second copy of its weights: the policy's
    ``token_logprobs`` with its adapters switched off (what KL penalties and DPO read)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @torch.no_grad()
    def token_logprobs(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with adapters_off(self.model):
            return self.model.token_logprobs(*args, **kwargs)
