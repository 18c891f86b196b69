"""Direct preference optimisation: the policy learns from ranked responses, no reward model, no sampling.

DPO (Rafailov et al. 2023) reads the policy's log-ratio to a frozen reference,
``log pi(y|x) - log pi_ref(y|x)`` summed over a response's tokens, as an implicit reward
``beta * log-ratio`` and fits it to the preferences with the reward model's own logistic loss.
Its relatives are options of the same loss (:func:`fastgpt.losses.dpo_loss`): IPO's squared loss
and conservative DPO's label smoothing.

The data, its order and the held-out evaluation are the reward stage's, unchanged
(:class:`~fastgpt.stages.reward.RewardTask`): ``{"prompt", "chosen", "rejected"}`` pairs or
K-wise rankings, each prompt's C(K, 2) pairs one batch element, every response packed once into
varlen rows (no padding inside a row) and forwarded once per step however many pairs it is in.
Only the pair loss differs: per-token log-probs come from the fused log-prob kernel over the
packed rows and are summed per response. The reference's log-probs are computed once before
training (``precompute_ref``, one forward pass over the data) or every step without gradients;
with LoRA the reference is the policy with its adapters off, so one copy of the weights is held.

Metrics: ``accuracy`` (share of pairs whose implicit reward orders them right), ``margin`` (mean
``beta * h``), ``logp_chosen`` / ``logp_rejected`` (the policy's mean sequence log-prob of the
better / worse response of each pair; both often fall during DPO, the rejected faster).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..chatdata import iter_batches
from ..config import ConfigError
from ..data import PackedBatch
from ..losses import dpo_loss
from ..trainer import Trainer, autocast_context, distributed_env, resolve_device, seed_everything
from .common import (Policy, Reference, add_lora, load_start_model, reference_model, set_dropout,
                     shorten_context)
from .configs import DPOConfig
from .reward import RankedGroup, RewardTask, pack_ranked, pair_tensors, preference_data

__all__ = ["DPOConfig", "DPOTask", "dpo", "sequence_logprobs"]


def sequence_logprobs(token_logprobs: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sum of each packed example's per-token log-probs (0 where not labelled), (n_examples,)."""
    device = token_logprobs.device
    lengths = torch.tensor([e - s for s, e in batch.spans], device=device)
    example = torch.repeat_interleave(torch.arange(len(batch.spans), device=device), lengths)
    positions = torch.cat([torch.arange(s, e, device=device) for s, e in batch.spans])
    out = torch.zeros(len(batch.spans), dtype=token_logprobs.dtype, device=device)
    return out.index_add_(0, example, token_logprobs.reshape(-1)[positions])


@torch.no_grad()
def reference_logprobs(ref: Reference, batch: PackedBatch) -> torch.Tensor:
    lp, _ = ref.token_logprobs(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens)
    return sequence_logprobs(lp.float(), batch)


class DPOTask(RewardTask):
    """The reward stage's task with DPO's pair loss (see the module docstring)."""

    progress_keys = ("accuracy", "margin")

    def __init__(self, cfg: DPOConfig, train: list[RankedGroup], val: list[RankedGroup], ref: Reference,
                 pad_id: int, block_size: int, device: torch.device) -> None:
        super().__init__(cfg, train, val, pad_id, block_size, device)  # type: ignore[arg-type]
        self.ref = ref

    def pair_loss(self, model: nn.Module, batch: PackedBatch
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        better, worse, prompt, n_prompts = pair_tensors(batch)
        lp = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens)[0]
        logp = sequence_logprobs(lp.float(), batch)
        ref = batch.extras.get("ref_logp")
        ref = reference_logprobs(self.ref, batch) if ref is None else ref.to(logp.device)
        loss, margin = dpo_loss(logp - ref, better, worse, prompt, n_prompts, cfg.beta, cfg.loss, cfg.label_smoothing)
        logp = logp.detach()
        return loss, margin, {"logp_chosen": float(logp[better].mean()), "logp_rejected": float(logp[worse].mean())}


@torch.no_grad()
def attach_reference_logprobs(ref: Reference, groups: list[RankedGroup], rows: int, block_size: int, pad_id: int,
                              device: torch.device, dtype: str) -> None:
    """One pass of the reference over every response: each group's ``ref_logps`` (precompute_ref)."""
    pos = 0
    for batch, used in iter_batches(groups, pack_ranked, rows, block_size, pad_id):
        with autocast_context(device, dtype):
            seq = reference_logprobs(ref, batch.to(device)).tolist()
        for g in groups[pos:pos + used]:
            g.ref_logps, seq = seq[:len(g.examples)], seq[len(g.examples):]
        pos += used


def dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Train ``cfg.init_from`` with DPO (or IPO / conservative DPO) on ``cfg.data``; returns the
    trainer's summary plus ``data`` (prompts used, held out, skipped, truncated)."""
    if cfg.loss == "ipo" and cfg.label_smoothing:
        raise ConfigError("label_smoothing (conservative DPO) applies to loss='sigmoid' only")
    seed_everything(cfg.seed)
    policy, tok = load_start_model(cfg.init_from)
    set_dropout(policy, 0.0)  # the log-ratio must be a deterministic function of the weights
    if cfg.block_size:
        shorten_context(policy, cfg.block_size, f"block_size={cfg.block_size}")
    device = resolve_device(cfg.device, distributed_env())
    policy.to(device)
    ref = reference_model(add_lora(policy, cfg, "dpo"))
    T = policy.config.block_size
    _, train, val, report, plan = preference_data(cfg, tok, T, "dpo")
    task = DPOTask(cfg, train, val, ref, tok.pad_id, T, device)
    trainer = Trainer(cfg, Policy(policy), task, stage="dpo", tokenizer=tok, model_kind="policy",
                      extra={"init_from": str(cfg.init_from)}, data={"data": cfg.data}, plan=plan,
                      flops_per_token=policy.flops_per_token(T))
    if cfg.precompute_ref:  # after the trainer: a refused resume costs no reference pass
        attach_reference_logprobs(ref, train + val, cfg.batch_size, T, tok.pad_id, device, cfg.dtype)
    summary = trainer.fit()
    summary["data"] = {"train": len(train), "val": len(val), "skipped": len(report.bad),
                       "truncated": report.truncated}
    return summary
