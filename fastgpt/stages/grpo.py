"""GRPO and RLOO: K samples per prompt, each scored against the others in its group, no value model.

One trainer step is one optimizer step on one minibatch of sequences, as in PPO (whose pieces
this stage reuses: prompt files, the KV-cache engine, packed response batches, reward scoring,
the KL estimates and the clipped surrogate). When the task's buffer runs dry, ``next_batch``
rolls out afresh:

1. draw ``rollout_batch_size / group_size`` prompts, sample ``group_size`` responses to each at
   ``temperature`` with the KV-cache engine;
2. score every response (a reward model, or any Python ``reward_fn(prompts, responses)``);
   a response cut off before its end-of-turn token scores ``missing_eos_penalty`` instead;
3. advantages from the group alone (:func:`fastgpt.losses.group_advantages`): GRPO's
   ``(r - mean) / std`` of the group, or RLOO's ``r - mean of the other K - 1``; every token of a
   response gets its response's advantage;
4. the policy's log-probs at sampling time (and the reference's, when ``beta`` > 0), one packed
   no-grad forward each through the fused log-prob kernel;
5. ``ppo_epochs`` passes of ``mini_batch_size`` sequences minimising the clipped surrogate plus
   ``beta`` times the KL estimate to the reference (GRPO puts the KL in the loss, not the reward),
   plus, with ``ptx_coef`` > 0, the pre-training loss on a batch of ``ptx_data`` (PPO-ptx's mix).

Loss normalisation and its length bias. ``loss_level="sequence"`` (the GRPO paper's) averages
each response's token losses first and then the responses, so a token of a short response weighs
more than a token of a long one: for a positive advantage short answers get the larger push, for
a negative one a long answer's tokens are each penalised less, and training drifts towards long
wrong answers and short right ones (Liu et al. 2025, "Understanding R1-Zero-like training").
``loss_level="token"`` (the default, as DAPO) averages over all tokens of the minibatch, every
token weighing the same; long responses then weigh more in the gradient, in proportion to their
length. GRPO's division by the group's std has a bias of its own: groups whose answers all score
nearly the same get their tiny differences blown up; RLOO does not rescale.

The guards against over-optimising the reward model are PPO's (:class:`RolloutTask`): a
reward-model ensemble, a length penalty on the score (before the group statistics), drift
warnings (``warn_kl`` needs ``beta`` > 0: without the reference's log-probs a rollout has no KL),
and best.pt chosen at every held-out evaluation (by a gold judge when the caller passes one).

The trainable module is :class:`~fastgpt.stages.common.Policy` (checkpoint kind ``policy``);
with LoRA the reference is the policy with its adapters off.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..config import ConfigError
from ..data import IGNORE_INDEX
from ..losses import group_advantages, kl_estimate, masked_mean, ppo_policy_loss
from ..tokenizer import Tokenizer
from ..trainer import Trainer, autocast_context
from .common import Policy, Reference
from .configs import GRPOConfig
from .policy_eval import GoldJudge, RewardFn
from .ppo import (RolloutTask, fit_on_policy, load_reward, pack_responses, policy_prompts, reward_models, rollout_plan,
                  score_rollout, start_policy, unpack_responses)

__all__ = ["GRPOConfig", "GRPOTask", "build_grpo", "grpo"]


def check_config(cfg: GRPOConfig) -> None:
    """What the field types cannot say: a rollout is whole groups."""
    if cfg.rollout_batch_size % cfg.group_size:
        raise ConfigError(f"rollout_batch_size={cfg.rollout_batch_size} is not a multiple of group_size={cfg.group_size}")


class GRPOTask(RolloutTask):
    """Grouped rollouts, group-relative advantages and the clipped loss (see the module docstring)."""

    stage = "grpo"
    progress_keys = ("score", "kl", "clipfrac", "response_len")

    def __init__(self, cfg: GRPOConfig, model: Policy, ref: Reference, tokenizer: Tokenizer,
                 prompts: list[list[int]], reward_fn: RewardFn, eval_prompts: list[list[int]] | None = None,
                 device: torch.device | str = "cpu", gold: GoldJudge | None = None,
                 eval_records: Sequence[Any] = ()) -> None:
        check_config(cfg)
        super().__init__(cfg, model, ref, tokenizer, prompts, reward_fn, eval_prompts, device, gold, eval_records)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _logprobs(self, seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, torch.Tensor]:
        """The policy's (and, with beta > 0, the reference's) log-prob of every response token
        at the sampling temperature, (N, R) padded."""
        cfg, N = self.cfg, len(seqs)
        R = max(len(s) - p for s, p in zip(seqs, prompt_lens))
        names = ("logp", "ref_logp") if cfg.beta > 0 else ("logp",)
        out = {k: torch.zeros(N, R, device=self.device) for k in names}
        self.model.eval()
        for start in range(0, N, cfg.mini_batch_size):
            idx = list(range(start, min(N, start + cfg.mini_batch_size)))
            batch, flat, mask = pack_responses(idx, seqs, prompt_lens, self.block, self.tok.pad_id, self.device)
            with autocast_context(self.device, cfg.dtype):  # as in the update: ratio 1 at first
                found = {"logp": self.model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens,
                                            temperature=cfg.temperature)[0]}
                if cfg.beta > 0:
                    found["ref_logp"] = self.ref.token_logprobs(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens,
                                                                temperature=cfg.temperature, ignore_index=IGNORE_INDEX)[0]
            for name, t in found.items():
                out[name][start:start + len(idx), :mask.shape[1]] = unpack_responses(t.float(), flat, mask)
        self.model.train()
        return out

    def _roll_out(self) -> bool:
        """Generate, score and compute advantages for one rollout; False if its rewards were not
        finite (the rollout is dropped)."""
        cfg, K = self.cfg, self.cfg.group_size
        t0 = time.perf_counter()
        # each process answers whole groups of one shared draw (rollout_batch_size is whole groups)
        prompts = [p for p in self._sample_prompts(cfg.rollout_batch_size * self.world // K) for _ in range(K)]
        mine, gens = self._generate(prompts, int(self.rng.integers(2**31)))
        t_gen = time.perf_counter() - t0
        responses = [g.tokens for g in gens]
        n_generated = sum(map(len, responses))  # by this process, for its generation speed
        fwd = self._logprobs([p + r for p, r in zip(mine, responses)], [len(p) for p in mine])
        fwd["scores"] = self.reward_fn(mine, responses).to(self.device, torch.float32).reshape(-1)
        fwd["finished"] = torch.tensor([g.finished for g in gens], device=self.device)
        responses, fwd = self._gather_rollout(responses, fwd)
        finished = fwd.pop("finished")
        lengths = torch.tensor([len(r) for r in responses], device=self.device)
        scored = score_rollout(self, fwd.pop("scores"), finished, lengths)
        if scored is None:
            return False
        raw, scores = scored
        groups = scores.view(-1, K)
        adv = group_advantages(groups, cfg.advantage).reshape(-1)
        seqs = [p + r for p, r in zip(prompts, responses)]
        prompt_lens = [len(p) for p in prompts]
        mask = torch.arange(fwd["logp"].shape[1], device=self.device)[None] < lengths[:, None]
        kl = float((kl_estimate(fwd["logp"], fwd["ref_logp"], "k1") * mask).sum(1).mean()) if "ref_logp" in fwd \
            else float("nan")
        mean_length = float(lengths.float().mean())
        self._watch_drift(kl, mean_length)
        self.rollout = {
            "seqs": seqs, "prompt_lens": prompt_lens, "adv": adv, "old_logp": fwd.pop("logp"), **fwd,
            "stats": {"score": float(raw.mean()), "kl": kl, "response_len": mean_length,
                      "eos_frac": float(finished.float().mean()),
                      "flat_groups": float((groups.std(1) < 1e-6).float().mean()),  # no signal in these
                      "gen_tokens_per_s": n_generated / max(t_gen, 1e-9),
                      "rollout_s": time.perf_counter() - t0},
        }
        self._queue_minibatches(len(seqs))  # the whole rollout's; each process takes its own of every W
        self.rollouts_done += 1
        return True

    # ------------------------------------------------------------- trainer API
    def next_batch(self) -> dict[str, Any]:
        while not self.queue:
            self._roll_out()
        ro = self.rollout
        assert ro is not None
        idx = self._take_minibatch()
        batch, flat, mask = pack_responses(idx, ro["seqs"], ro["prompt_lens"], self.block, self.tok.pad_id,
                                           self.device)
        R = mask.shape[1]
        out = {"batch": batch, "flat": flat, "mask": mask, "adv": ro["adv"][idx], "stats": dict(ro["stats"]),
               "old_logp": ro["old_logp"][idx, :R]}
        if "ref_logp" in ro:
            out["ref_logp"] = ro["ref_logp"][idx, :R]
        if self.ptx is not None:
            out["ptx"] = self.ptx.next_batch()
        return out

    def loss(self, model: nn.Module, b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, batch, mask = self.cfg, b["batch"], b["mask"]
        lm_idx, lm_targets = b["ptx"] if "ptx" in b else (None, None)
        lp, ent, lm_loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, temperature=cfg.temperature,
                                 lm_idx=lm_idx, lm_targets=lm_targets)
        lp, ent = unpack_responses(lp, b["flat"], mask), unpack_responses(ent, b["flat"], mask)
        adv = b["adv"][:, None].expand_as(lp)
        loss, clipfrac, approx_kl = ppo_policy_loss(lp, b["old_logp"], adv, mask, cfg.clip_range, cfg.loss_level)
        metrics = {"policy_loss": float(loss.detach()), "entropy": float(masked_mean(ent.detach(), mask)),
                   "clipfrac": float(clipfrac), "approx_kl": float(approx_kl),
                   "bad_rollouts": float(self.bad_rollouts), **b["stats"]}
        if cfg.beta > 0:
            kl = masked_mean(kl_estimate(lp, b["ref_logp"], cfg.kl_estimator), mask, cfg.loss_level)
            loss = loss + cfg.beta * kl
            metrics["kl_loss"] = float(kl.detach())
        if lm_loss is not None:
            loss = loss + cfg.ptx_coef * lm_loss
            metrics["ptx_loss"] = float(lm_loss.detach())
        return loss, metrics


# ------------------------------------------------------------------------------- stage
def build_grpo(cfg: GRPOConfig, reward_fn: RewardFn | None = None, gold: GoldJudge | None = None
               ) -> tuple[Trainer, GRPOTask]:
    """Models, prompts, task and trainer for ``cfg``; ``reward_fn`` replaces the reward model;
    ``gold`` judges the held-out answers at every evaluation (see :mod:`.policy_eval`)."""
    check_config(cfg)
    policy, tok, ref, device = start_policy(cfg, reward_fn, "grpo")
    if reward_fn is None:
        reward_fn = reward_models(cfg, *load_reward(cfg.reward_checkpoint, tok, device), tok, device)
    block = policy.config.block_size
    prompts, eval_prompts, eval_records, held_out = policy_prompts(cfg, tok, block)
    model = Policy(policy.train())
    task = GRPOTask(cfg, model, ref, tok, prompts, reward_fn, eval_prompts, device, gold, eval_records)
    data = {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts, "ptx_data": cfg.ptx_data}
    trainer = Trainer(cfg, model, task, stage="grpo", tokenizer=tok, model_kind="policy",
                      extra={"sft_checkpoint": str(cfg.sft_checkpoint)}, data=data,
                      plan=rollout_plan(cfg, prompts, eval_prompts, block, held_out, cfg.group_size),
                      flops_per_token=policy.flops_per_token(block))
    return trainer, task


def grpo(cfg: GRPOConfig, reward_fn: RewardFn | None = None, gold: GoldJudge | None = None) -> dict[str, Any]:
    """Run GRPO / RLOO per ``cfg`` (``gold``: see :func:`build_grpo`); the summary as
    :func:`fastgpt.stages.ppo.fit_on_policy` says."""
    return fit_on_policy(*build_grpo(cfg, reward_fn, gold))
