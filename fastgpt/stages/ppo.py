"""Stage 3b: PPO against the reward model (InstructGPT), trained through the shared trainer loop.

One trainer step is one optimizer step on one minibatch of rollouts.  The task keeps a buffer of
minibatches; when it runs dry, ``next_batch`` rolls out a new batch first:

1. sample ``rollout_batch_size`` prompts and generate with the KV-cache engine at ``temperature``;
2. one packed forward each for the policy's log-probs and values, the frozen SFT reference's
   log-probs (all with logits divided by the sampling temperature, through the fused log-prob
   kernel) and the frozen reward model's score at the last token;
3. per-token reward = -beta * KL(policy || SFT) plus the normalised score on the last token
   (responses cut off before a stop token get ``missing_eos_penalty`` as their score instead);
4. GAE advantages (whitened) and returns, then ``ppo_epochs`` shuffled passes of
   ``mini_batch_size`` sequences, dropped early when the approximate KL passes ``early_stop_kl``.

Under ``torchrun`` each of the W processes answers its own ``rollout_batch_size`` prompts of one
shared draw and scores them; the rollouts are then gathered, so advantages are whitened and the
KL controller steps over the whole rollout, and process r trains on minibatches r, r + W, ... of
one shared shuffle. With a fixed ``generation_batch_size`` (each generation batch sampled with a
seed of its own place in the rollout) W processes roll out and train exactly as one process with
W times the rollout and grad_accum. Under ``fsdp`` generation uses a whole, unsharded copy of the
policy on every process, gathered once per rollout (see :func:`fastgpt.distributed.unsharded_gpt`).

Guards against over-optimising the learned reward (settings in
:class:`~fastgpt.stages.configs.RewardGuardConfig`, shared with GRPO through :class:`RolloutTask`):
a reward-model ensemble (``reward_ensemble``), a length penalty on the score, warnings when KL or
length drift, and ``best.pt``: every held-out evaluation is ranked (by a gold judge's score when
the caller passes one, see :mod:`.policy_eval`) and the best one's weights are kept.

The trainable module is :class:`PolicyValue` (checkpoint kind ``policy_value``; ``fastgpt chat``
and ``load_model(kind="gpt")`` read its policy).  The reward can be any Python callable
(``PPOTask(..., reward_fn=...)``), which is how the tests give PPO a known objective.
"""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
import torch.nn as nn

from .. import kernels
from ..checkpoint import load_model
from ..config import ModelConfig
from ..console import plural
from ..chatdata import LoadReport, parse_prompt, parse_prompt_record, read_records
from ..data import IGNORE_INDEX, DataError, PackedBatch, TokenLoader, pack_all
from ..distributed import all_max, gather_objects, unsharded_gpt
from ..engine import Generation, SamplingParams, generate
from ..errors import FastGPTError
from ..losses import (ENSEMBLE_MODES, AdaptiveKLController, FixedKLController, combine_ensemble,
                      explained_variance, gae, kl_estimate, length_penalty, masked_mean, ppo_policy_loss,
                      ppo_value_loss, whiten)
from ..model import GPT, ScalarModel
from ..tokenizer import Tokenizer, encode_prompt
from ..trainer import (DataPlan, Trainer, TrainingError, autocast_context, distributed_env, resolve_device,
                       seed_everything)
from .common import (Reference, add_lora, cast_parameters, freeze, load_start_model, reference_generator,
                     reference_model, require_same_tokenizer, set_dropout, split_holdout)
from .configs import PPOConfig
from .likelihood import LikelihoodTerm
from .policy_eval import GoldJudge, RewardFn, evaluate_policy, selection_score
from .reward import response_labels, reward_scores

T = TypeVar("T")


class PPOError(FastGPTError, ValueError):
    """Bad PPO input (one-line message)."""


# ------------------------------------------------------------------------------- models
class PolicyValue(nn.Module):
    """The trainable pair: a GPT policy and a value model (a ScalarModel or a head on the policy)."""

    def __init__(self, policy: GPT, value: ScalarModel | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_head = nn.Linear(policy.config.n_embd, 1) if value is None else None

    @property
    def config(self) -> ModelConfig:
        return self.policy.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, temperature: float = 1.0,
                lm_idx: torch.Tensor | None = None, lm_targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token (log p(target), entropy, value) of packed rows, each (B, T) fp32, and the LM
        loss on an optional pretraining batch (PPO-ptx), all in one forward for DDP."""
        h = self.policy.hidden_states(idx, cu_seqlens, max_seqlen=max_seqlen)
        # the fused kernel: the (tokens x vocabulary) logits never exist in full
        h2d, weight = self.policy.head_operands(h)
        lp, ent = kernels.linear_logprobs(h2d, weight, targets.reshape(-1), temperature=temperature,
                                          ignore_index=IGNORE_INDEX)
        if self.value is not None:
            values = self.value(idx, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        else:
            values = self.value_head(h).squeeze(-1).float()
        lm_loss = None
        if lm_idx is not None:
            lm_loss = self.policy(lm_idx, lm_targets)[1]
        return lp.view(targets.shape), ent.view(targets.shape), values, lm_loss


def value_from_reward(rm: ScalarModel, offset: float, scale: float, zero_head: bool) -> ScalarModel:
    """A trainable copy of the reward model whose head is rescaled to predict normalised scores
    ((r - offset) / scale), so the critic starts on the reward's scale; or a zero head."""
    value = copy.deepcopy(rm).float()
    with torch.no_grad():
        if zero_head:
            value.head.weight.zero_()
            value.head.bias.zero_()
        else:
            value.head.weight.div_(scale)
            value.head.bias.sub_(offset).div_(scale)
    return value.trainable().train()


class RewardModelScorer:
    """reward_fn from a reward model: normalised score at the last token of each prompt +
    response (with the likelihood term it was trained with, if any), scored as packed rows by the
    reward stage's own scoring function."""

    def __init__(self, model: ScalarModel, offset: float, scale: float, pad_id: int, rows: int = 64,
                 likelihood: LikelihoodTerm | None = None) -> None:
        self.model, self.offset, self.scale, self.pad_id, self.rows = model, offset, scale, pad_id, rows
        self.likelihood = likelihood

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        block = self.model.config.block_size
        seqs = [(p + r)[-block:] for p, r in zip(prompts, responses)]
        raw = reward_scores(self.model, seqs, prompts, responses, self.rows, self.pad_id, self.likelihood)
        return (raw - self.offset) / self.scale


class EnsembleScorer:
    """reward_fn from several reward models: each member's normalised score, combined per
    response by :func:`fastgpt.losses.combine_ensemble` (mean, min or mean - std)."""

    def __init__(self, members: list[RewardFn], mode: str = "mean") -> None:
        if not members:
            raise PPOError("a reward ensemble needs at least one reward model")
        self.members, self.mode = members, mode

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        scores = torch.stack([m(prompts, responses).float().reshape(-1) for m in self.members])
        return combine_ensemble(scores, self.mode)


# ------------------------------------------------------------------------------ prompts
def load_prompts(path: str, tok: Tokenizer, block_size: int, what: str) -> tuple[list[Any], list[list[int]]]:
    """(records, encoded chat prompts) from a JSONL file (``{"prompt"}`` or ``{"messages"}``, read
    exactly as ``fastgpt compare`` reads them); bad lines are skipped and counted, prompts that
    leave no room to answer are skipped with one warning (an error if none is left)."""
    report = LoadReport(path)
    texts = [value for _, value in read_records(path, parse_prompt_record, report)]
    report.finish("ppo", 0.1, "prompts")
    return encode_prompts(texts, tok, block_size, f"{what}={path}")


def encode_prompts(texts: Sequence[Any], tok: Tokenizer, block_size: int, where: str
                   ) -> tuple[list[Any], list[list[int]]]:
    """The prompts that fit the context with room to answer: (their records, their ids)."""
    encoded = [(t, encode_prompt(tok, parse_prompt(t))) for t in texts]
    kept = [(t, p) for t, p in encoded if len(p) < block_size]
    if not kept:
        raise DataError(f"{where}: {'the' if len(encoded) == 1 else 'all'} {plural(len(encoded), 'prompt')} {'is' if len(encoded) == 1 else 'are'} at least the model's context of "
                        f"{block_size} tokens long")
    if len(kept) < len(encoded):
        print(f"ppo: {where}: skipped {len(encoded) - len(kept)} of {len(encoded)} prompts longer than "
              f"the model's context of {block_size} tokens", file=sys.stderr)
    return [t for t, _ in kept], [p for _, p in kept]


class DriftWatch:
    """Warns once when a watched rollout statistic leaves its allowed range, and again only
    after it came back (so a run drifting for 100 rollouts prints one line, not 100). Every
    process keeps the same state (rollout statistics are the whole rollout's); only the first
    (``loud``) prints."""

    def __init__(self, stage: str, loud: bool = True) -> None:
        self.stage, self.loud = stage, loud
        self.out: set[str] = set()

    def check(self, name: str, value: float, low: float, high: float, why: str) -> None:
        if low <= value <= high:
            self.out.discard(name)
        elif name not in self.out:
            self.out.add(name)
            if self.loud:
                warnings.warn(f"{self.stage}: {name} {value:.3g} is outside [{low:.3g}, {high:.3g}] ({why})",
                              stacklevel=3)


# ------------------------------------------------------------------------------ rollouts
def score_rollout(task: RolloutTask, scores: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(raw ``scores``, the scores training uses: less the ``length_penalty`` for responses
    ``lengths`` tokens long, clipped to +-``reward_clip``, ``missing_eos_penalty`` for responses
    that never ended) of a rollout of ``task`` (PPO's or GRPO's); None when a score is not finite:
    the rollout is dropped, and after ``max_bad_rollouts`` of those the run stops."""
    cfg = task.cfg
    if not bool(torch.isfinite(scores).all()):
        task.bad_rollouts += 1
        warnings.warn(f"{task.stage}: rollout {task.rollouts_done} has non-finite rewards; skipped "
                      f"({task.bad_rollouts}/{cfg.max_bad_rollouts})", stacklevel=3)
        if task.bad_rollouts > cfg.max_bad_rollouts:
            raise TrainingError(f"{task.stage}: {plural(task.bad_rollouts, 'rollout')} with non-finite rewards "
                                f"(max_bad_rollouts={cfg.max_bad_rollouts}); check the reward model")
        return None
    raw = scores.clone()
    if task.first_length is None:  # the SFT policy's: the length penalty's and warnings' reference
        task.first_length = float(lengths.float().mean())
    if cfg.length_penalty:
        scores = scores - length_penalty(lengths, task.first_length, cfg.length_penalty)
    if cfg.reward_clip > 0:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty:
        scores = torch.where(finished, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    return raw, scores


# ------------------------------------------------------------------------------ packing
def pack_responses(idx: list[int], seqs: list[list[int]], prompt_lens: list[int], block: int, pad_id: int,
                   device: torch.device) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
    """Pack sequences ``idx`` (prompt + response), labels on the response tokens; returns the
    batch, the flat position predicting each response token (in sequence order) and the
    (len(idx), R) mask of those tokens, R the longest response."""
    batch = pack_all([(seqs[i], response_labels(prompt_lens[i], seqs[i][prompt_lens[i]:])) for i in idx],
                     block, pad_id)
    resp = [len(seqs[i]) - prompt_lens[i] for i in idx]
    flat = torch.cat([torch.arange(start + prompt_lens[i] - 1, start + prompt_lens[i] - 1 + r)
                      for (start, _), i, r in zip(batch.spans, idx, resp)])
    mask = torch.arange(max(resp))[None] < torch.tensor(resp)[:, None]
    return batch.to(device), flat.to(device), mask.to(device)


def unpack_responses(t: torch.Tensor, flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed batch (B, T) -> (n, R) response tokens, 0 on padding."""
    return torch.zeros(mask.shape, dtype=t.dtype, device=t.device).masked_scatter(mask, t.reshape(-1)[flat])


# -------------------------------------------------------------------------------- task
class RolloutTask:
    """What the tasks of the on-policy stages (PPO, GRPO) share: prompts drawn epoch by epoch in
    a seeded order, a buffer of shuffled minibatches of the current rollout, the held-out
    evaluation (with ``gold``, a gold judge's too: see :mod:`.policy_eval`) and the choice of
    best.pt by it, the drift warnings and the resumable state of all that."""

    stage = "rollout"  # the stage's name in warnings (each task names its own)

    def __init__(self, cfg: Any, model: nn.Module, ref: Reference, tokenizer: Tokenizer,
                 prompts: list[list[int]], reward_fn: RewardFn, eval_prompts: list[list[int]] | None = None,
                 device: torch.device | str = "cpu", gold: GoldJudge | None = None,
                 eval_records: Sequence[Any] = ()) -> None:
        if cfg.rollout_batch_size < cfg.mini_batch_size:
            raise PPOError(f"mini_batch_size={cfg.mini_batch_size} is larger than rollout_batch_size="
                           f"{cfg.rollout_batch_size}")
        dist = distributed_env()
        self.rank, self.world = dist.rank, dist.world_size
        per_rollout = cfg.ppo_epochs * math.ceil(self.world * cfg.rollout_batch_size / cfg.mini_batch_size)
        if per_rollout % self.world:
            raise PPOError(f"{plural(per_rollout, 'minibatch', 'minibatches')} per rollout (ppo_epochs x "
                           f"{self.world} x rollout_batch_size / mini_batch_size) do not share evenly among "
                           f"{self.world} processes; make rollout_batch_size a multiple of mini_batch_size")
        self.cfg, self.model, self.ref, self.tok = cfg, model, ref, tokenizer
        self.prompts, self.eval_prompts = prompts, (eval_prompts or [])[:cfg.eval_max_prompts]
        self.eval_records = list(eval_records)[:cfg.eval_max_prompts]
        self.reward_fn, self.gold = reward_fn, gold
        # the first rollout's mean length (the SFT policy's): the length penalty's and warnings' reference
        self.first_length: float | None = cfg.length_target or None
        self.drift = DriftWatch(self.stage, loud=self.rank == 0)
        self.device = torch.device(device)
        self.block = model.config.block_size
        # one stream for every process: the prompt order, sampling seeds and minibatch shuffles
        self.rng = np.random.default_rng([cfg.seed, 0])
        self.order: list[int] = []
        self.rollout: dict[str, Any] | None = None
        self.queue: list[list[int]] = []
        self.bad_rollouts = 0
        self.rollouts_done = 0
        self.ptx = None  # PPO-ptx: pre-training rows added to every step's loss
        if cfg.ptx_data and cfg.ptx_coef > 0:
            self.ptx = TokenLoader(cfg.ptx_data, "train", self.block, cfg.ptx_batch_size,
                                   model.config.vocab_size, cfg.seed, self.rank, self.device, self.world)

    def _sample_prompts(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            if not self.order:  # epochs over the prompt set in a fresh random order
                self.order = self.rng.permutation(len(self.prompts)).tolist()
            out.append(self.prompts[self.order.pop()])
        return out

    def _queue_minibatches(self, n: int) -> None:
        """``ppo_epochs`` passes over the rollout's ``n`` sequences, each in a fresh shuffled order."""
        mini = self.cfg.mini_batch_size
        self.queue = [perm[i:i + mini].tolist() for _ in range(self.cfg.ppo_epochs)
                      for perm in [self.rng.permutation(n)] for i in range(0, n, mini)]

    def _generate(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], list[Generation]]:
        """This process's share of the whole rollout's ``prompts`` and its sampled answers, in
        batches of ``generation_batch_size`` seeded by their place in the rollout."""
        n = len(prompts) // self.world
        first = self.rank * n
        mine = prompts[first:first + n]
        step = self.cfg.generation_batch_size or n
        policy = unsharded_gpt(self.model.policy)
        gens: list[Generation] = []
        for start in range(0, n, step):
            params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                    stop_ids=self.tok.stop_ids, seed=seed + first + start)
            gens += generate(policy, mine[start:start + step], params, vocab_limit=self.tok.vocab_size)
        return mine, gens

    def _gather_rollout(self, responses: list[list[int]], fwd: dict[str, torch.Tensor]
                        ) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """Every process's responses and per-sequence tensors, in rank order (rows padded with
        zeros to the longest response)."""
        if self.world == 1:
            return responses, fwd
        parts = gather_objects((responses, {k: v.cpu() for k, v in fwd.items()}))
        width = max(t.shape[1] for _, f in parts for t in f.values() if t.dim() == 2)
        out = {k: torch.cat([nn.functional.pad(f[k], (0, width - f[k].shape[1])) if f[k].dim() == 2 else f[k]
                             for _, f in parts]).to(self.device) for k in fwd}
        return [r for rs, _ in parts for r in rs], out

    def _watch_drift(self, kl: float, mean_length: float) -> None:
        """Warn (once per excursion) when a rollout's KL to the reference or its mean length
        drifts past ``warn_kl`` / ``warn_length_ratio``."""
        cfg = self.cfg
        if cfg.warn_kl > 0 and math.isfinite(kl):
            self.drift.check("KL to the reference", kl, -math.inf, cfg.warn_kl,
                             "warn_kl: the policy is far from SFT; check held-out quality, raise beta or use best.pt")
        if cfg.warn_length_ratio > 0 and self.first_length:
            r = cfg.warn_length_ratio
            self.drift.check("mean response length", mean_length, self.first_length / r, self.first_length * r,
                             "warn_length_ratio: a length change is a common sign of reward hacking")

    def _take_minibatch(self) -> list[int]:
        """This process's minibatch of the next W in the whole rollout's queue."""
        idx = self.queue[self.rank]
        del self.queue[:self.world]
        return idx

    def tokens(self, b: dict[str, Any]) -> int:
        return b["batch"].n_real

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        inner = getattr(model, "module", model)
        return self.evaluate_policy(unsharded_gpt(inner.policy))

    def evaluate_policy(self, policy: GPT, ref: Reference | None = None) -> dict[str, float]:
        """Proxy and gold scores, KL to ``ref`` (the task's reference) and length of ``policy``
        on the held-out prompts. Every process computes the same figures."""
        cfg = self.cfg
        return evaluate_policy(policy, self.ref if ref is None else ref, self.tok, self.eval_prompts, self.reward_fn,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                               batch_size=cfg.rollout_batch_size, dtype=cfg.dtype, gold=self.gold,
                               prompt_records=self.eval_records)

    def selection_score(self, metrics: dict[str, float]) -> float | None:
        return selection_score(metrics, self.cfg.best_max_kl)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": list(self.order), "rollout": self.rollout,
                "queue": [list(q) for q in self.queue], "bad_rollouts": self.bad_rollouts,
                "rollouts_done": self.rollouts_done, "first_length": self.first_length,
                "drift": sorted(self.drift.out), "ptx": None if self.ptx is None else self.ptx.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.rollout, self.queue = list(state["order"]), state["rollout"], [list(q) for q in state["queue"]]
        self.bad_rollouts, self.rollouts_done = state["bad_rollouts"], state["rollouts_done"]
        # a checkpoint from before the guards has neither
        self.first_length = state.get("first_length", self.first_length)
        self.drift.out = set(state.get("drift", ()))
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.load_state_dict(state["ptx"])


class PPOTask(RolloutTask):
    """Rollouts, advantages and the PPO loss for the shared trainer (see the module docstring)."""

    stage = "ppo"
    progress_keys = ("score", "kl", "entropy", "clipfrac", "response_len")

    def __init__(self, cfg: PPOConfig, model: PolicyValue, ref: Reference, tokenizer: Tokenizer,
                 prompts: list[list[int]], reward_fn: RewardFn, eval_prompts: list[list[int]] | None = None,
                 device: torch.device | str = "cpu", gold: GoldJudge | None = None,
                 eval_records: Sequence[Any] = ()) -> None:
        super().__init__(cfg, model, ref, tokenizer, prompts, reward_fn, eval_prompts, device, gold, eval_records)
        self.kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.beta))
        self._train_clock: float | None = None  # end of the last next_batch: times the update
        self._prev_tokens = 0

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def _forward_all(self, seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, torch.Tensor]:
        """Old log-probs, values and reference log-probs of every response token, (N, R) padded."""
        cfg, N = self.cfg, len(seqs)
        R = max(len(s) - p for s, p in zip(seqs, prompt_lens))
        out = {k: torch.zeros(N, R, device=self.device) for k in ("logp", "values", "ref_logp")}
        self.model.eval()
        for start in range(0, N, cfg.mini_batch_size):
            idx = list(range(start, min(N, start + cfg.mini_batch_size)))
            batch, flat, mask = self._pack(idx, seqs, prompt_lens)
            with autocast_context(self.device, cfg.dtype):  # as in the update: ratio 1 at first
                lp, _, v, _ = self.model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens,
                                         max_seqlen=batch.max_seqlen, temperature=cfg.temperature)
                ref_lp, _ = self.ref.token_logprobs(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens,
                                                    temperature=cfg.temperature, ignore_index=IGNORE_INDEX)
            for name, t in (("logp", lp), ("values", v), ("ref_logp", ref_lp)):
                block = out[name][idx[0]:idx[-1] + 1, :mask.shape[1]]
                block[mask] = t.reshape(-1)[flat].float()
        self.model.train()
        return out

    def _pack(self, idx: list[int], seqs: list[list[int]], prompt_lens: list[int]
              ) -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
        return pack_responses(idx, seqs, prompt_lens, self.block, self.tok.pad_id, self.device)

    def _roll_out(self) -> bool:
        """Generate, score and compute advantages for one rollout batch; False if its rewards were
        not finite (the batch is dropped)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self._sample_prompts(cfg.rollout_batch_size * self.world)
        mine, gens = self._generate(prompts, int(self.rng.integers(2**31)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t_gen = time.perf_counter() - t0
        responses = [g.tokens for g in gens]
        n_generated = sum(map(len, responses))  # by this process, for its generation speed
        seqs = [p + r for p, r in zip(mine, responses)]
        fwd = self._forward_all(seqs, [len(p) for p in mine])
        fwd["scores"] = self.reward_fn(mine, responses).to(self.device, torch.float32).reshape(-1)
        fwd["finished"] = torch.tensor([g.finished for g in gens], device=self.device)
        responses, fwd = self._gather_rollout(responses, fwd)
        seqs = [p + r for p, r in zip(prompts, responses)]
        prompt_lens = [len(p) for p in prompts]
        finished = fwd["finished"]
        lengths = torch.tensor([len(r) for r in responses], device=self.device)
        scored = score_rollout(self, fwd["scores"], finished, lengths)
        if scored is None:
            return False
        raw_scores, scores = scored
        mask = torch.arange(fwd["logp"].shape[1], device=self.device)[None] < lengths[:, None]
        kl = kl_estimate(fwd["logp"], fwd["ref_logp"], cfg.kl_estimator) * mask
        rewards = -self.kl_ctl.value * kl
        rewards[torch.arange(len(seqs), device=self.device), lengths - 1] += scores
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, fwd["values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        seq_kl = float(kl.sum(1).mean())
        beta = self.kl_ctl.value
        self.kl_ctl.update(seq_kl, len(seqs))
        mean_length = float(lengths.float().mean())
        self._watch_drift(seq_kl, mean_length)
        t_all = time.perf_counter() - t0
        self.rollout = {
            "seqs": seqs, "prompt_lens": prompt_lens, "old_logp": fwd["logp"],  # stays on the device: read every minibatch
            "old_values": fwd["values"], "adv": adv, "returns": returns,
            "stats": {"rollout": float(self.rollouts_done + 1), "score": float(raw_scores.mean()), "kl": seq_kl,
                      "beta": beta,
                      "non_score_reward": float(rewards.sum(1).mean() - scores.mean()) if not cfg.whiten_rewards
                      else float("nan"),
                      "response_len": mean_length, "eos_frac": float(finished.float().mean()),
                      "explained_var": explained_variance(fwd["values"], returns, mask),
                      "gen_tokens_per_s": n_generated / max(t_gen, 1e-9), "rollout_s": t_all},
        }
        self._queue_minibatches(len(seqs))  # the whole rollout's; each process takes its own of every W
        self.rollouts_done += 1
        return True

    # ------------------------------------------------------------- trainer API
    def next_batch(self) -> dict[str, Any]:
        now = time.perf_counter()
        train_s = None if self._train_clock is None else now - self._train_clock
        while not self.queue:
            self._roll_out()
        ro = self.rollout
        assert ro is not None
        idx = self._take_minibatch()
        batch, flat, mask = self._pack(idx, ro["seqs"], ro["prompt_lens"])
        R = mask.shape[1]
        take = lambda name: ro[name][idx, :R].to(self.device)  # noqa: E731
        out = {"batch": batch, "flat": flat, "mask": mask, "old_logp": take("old_logp"),
               "old_values": take("old_values"), "adv": take("adv"), "returns": take("returns"),
               "stats": dict(ro["stats"]), "train_s": train_s}
        if self.ptx is not None:
            out["ptx"] = self.ptx.next_batch()
        self._train_clock = time.perf_counter()
        return out

    def loss(self, model: nn.Module, b: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, batch, mask = self.cfg, b["batch"], b["mask"]
        lm_idx, lm_targets = b["ptx"] if "ptx" in b else (None, None)
        lp, ent, values, lm_loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens,
                                         max_seqlen=batch.max_seqlen, temperature=cfg.temperature,
                                         lm_idx=lm_idx, lm_targets=lm_targets)

        lp, ent, values = (unpack_responses(t, b["flat"], mask) for t in (lp, ent, values.float()))
        pg_loss, clipfrac, approx_kl = ppo_policy_loss(lp, b["old_logp"], b["adv"], mask, cfg.clip_range)
        vf_loss, vf_clipfrac = ppo_value_loss(values, b["old_values"], b["returns"], mask, cfg.clip_range_value)
        entropy = masked_mean(ent, mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        if lm_loss is not None:
            loss = loss + cfg.ptx_coef * lm_loss
        if cfg.early_stop_kl > 0 and all_max(float(approx_kl)) > cfg.early_stop_kl:
            self.queue.clear()  # the policy moved far enough from the rollout's: roll out afresh
        metrics = {"policy_loss": float(pg_loss.detach()), "value_loss": float(vf_loss.detach()), "entropy": float(entropy.detach()),
                   "clipfrac": float(clipfrac), "value_clipfrac": float(vf_clipfrac),
                   "approx_kl": float(approx_kl), "bad_rollouts": float(self.bad_rollouts), **b["stats"]}
        if lm_loss is not None:
            metrics["ptx_loss"] = float(lm_loss.detach())
        if b["train_s"] and self._prev_tokens:  # the previous minibatch's forward+backward+step
            metrics["train_tokens_per_s"] = self._prev_tokens / b["train_s"]
        self._prev_tokens = self.tokens(b)
        return loss, metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])


# ------------------------------------------------------------------------------- stage
LoadedReward = tuple[ScalarModel, float, float, LikelihoodTerm | None]


def load_reward(path: str, tok: Tokenizer, device: torch.device) -> LoadedReward:
    """The frozen reward model, its normalisation (offset, scale) and the likelihood term it was
    trained with (or None), after checking its tokenizer."""
    rm, rm_tok, ckpt = load_model(path, kind="scalar", device=device)
    require_same_tokenizer(tok, rm_tok, f"reward_checkpoint={path}")
    extra = ckpt.get("extra", {})
    offset, scale = float(extra.get("reward_offset", 0.0)), float(extra.get("reward_scale", 1.0))
    if not math.isfinite(offset) or not math.isfinite(scale) or scale <= 0:
        raise PPOError(f"reward_checkpoint={path}: bad normalisation offset={offset} scale={scale}")
    return rm, offset, scale, LikelihoodTerm.from_extra(extra, tok, device, f"reward_checkpoint={path}")  # type: ignore[return-value]


def start_policy(cfg: Any, reward_fn: RewardFn | None, stage: str
                 ) -> tuple[GPT, Tokenizer, Reference, torch.device]:
    """(policy, tokenizer, its frozen reference, device) of an on-policy stage (PPO, GRPO), after
    checking that its inputs are named. Dropout is off: the rollout's log-probs are taken in eval
    mode, and dropout in the update would bias the ratio."""
    if not cfg.sft_checkpoint:
        raise PPOError("sft_checkpoint is required (the policy's start and the KL reference)")
    if not cfg.prompts:
        raise PPOError("prompts is required: a JSONL file of {\"prompt\"} or {\"messages\"} lines")
    if reward_fn is None and not cfg.reward_checkpoint:
        raise PPOError("reward_checkpoint is required (or, from Python, a reward_fn)")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device, distributed_env())
    policy, tok = load_start_model(cfg.sft_checkpoint)
    policy = policy.to(device).eval()
    set_dropout(policy, 0.0)
    ref = reference_model(add_lora(policy, cfg, stage))  # with LoRA: the policy, adapters off
    return policy, tok, ref, device


def reward_models(cfg: Any, rm: ScalarModel, offset: float, scale: float, likelihood: LikelihoodTerm | None,
                  tok: Tokenizer, device: torch.device) -> RewardFn:
    """The frozen reward model as an on-policy stage's reward (PPO, GRPO), or with
    ``reward_ensemble`` the ensemble of it and the listed checkpoints (bf16 on CUDA: they only
    run forward)."""
    if cfg.ensemble_mode not in ENSEMBLE_MODES:
        raise PPOError(f"ensemble_mode={cfg.ensemble_mode!r}: expected one of {ENSEMBLE_MODES}")
    models = [(rm, offset, scale, likelihood)]
    models += [load_reward(path.strip(), tok, device) for path in cfg.reward_ensemble.split(",") if path.strip()]
    scorers: list[RewardFn] = []
    for model, off, sc, term in models:
        freeze(model)
        if device.type == "cuda":
            cast_parameters(model, torch.bfloat16)
            if term is not None:
                cast_parameters(term.lm, torch.bfloat16)
        scorers.append(RewardModelScorer(model, off, sc, tok.pad_id, rows=cfg.mini_batch_size, likelihood=term))
    return scorers[0] if len(scorers) == 1 else EnsembleScorer(scorers, cfg.ensemble_mode)


def build_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None, gold: GoldJudge | None = None
              ) -> tuple[Trainer, PPOTask]:
    """Models, prompts, task and trainer for ``cfg``; ``reward_fn`` replaces the reward model;
    ``gold`` judges the held-out answers at every evaluation (see :mod:`.policy_eval`)."""
    policy, tok, ref, device = start_policy(cfg, reward_fn, "ppo")
    rm = None
    if cfg.reward_checkpoint:
        rm, offset, scale, likelihood = load_reward(cfg.reward_checkpoint, tok, device)
    value = None
    extra: dict[str, Any] = {}
    if cfg.value_model == "reward":
        if rm is None:
            raise PPOError("value_model='reward' needs reward_checkpoint (or use value_model='head')")
        value = value_from_reward(rm, offset, scale, cfg.value_head_zero).to(device)  # before rm is cast
        add_lora(value.gpt, cfg, "ppo value model")  # its head stays trainable
        extra["value_config"] = asdict(value.config)
    if reward_fn is None:
        reward_fn = reward_models(cfg, rm, offset, scale, likelihood, tok, device)
    if value is not None:
        set_dropout(value, 0.0)  # as the policy's (start_policy)
    model = PolicyValue(policy.train(), value)
    if model.value_head is not None:
        nn.init.zeros_(model.value_head.bias)
        if cfg.value_head_zero:
            nn.init.zeros_(model.value_head.weight)
        else:
            nn.init.normal_(model.value_head.weight, std=1.0 / math.sqrt(policy.config.n_embd + 1))
    model.to(device)
    block = policy.config.block_size
    prompts, eval_prompts, eval_records, held_out = policy_prompts(cfg, tok, block)
    task = PPOTask(cfg, model, ref, tok, prompts, reward_fn, eval_prompts, device, gold, eval_records)
    extra["sft_checkpoint"] = str(cfg.sft_checkpoint)
    data = {"prompts": cfg.prompts, "eval_prompts": cfg.eval_prompts, "ptx_data": cfg.ptx_data}
    trainer = Trainer(cfg, model, task, stage="ppo", tokenizer=tok, model_kind="policy_value", extra=extra,
                      data=data, plan=rollout_plan(cfg, prompts, eval_prompts, block, held_out),
                      flops_per_token=policy.flops_per_token(block))
    return trainer, task


def fit_on_policy(trainer: Trainer, task: RolloutTask) -> dict[str, Any]:
    """Train an on-policy stage (PPO, GRPO); its summary adds ``sft`` (the held-out eval of the
    starting policy, the reference, before training: kept in the checkpoint's extra so a resumed
    run reports the same figures) next to the trainer's ``eval`` (the final policy's), the
    number of ``rollouts`` and of ``held_out_prompts``, and ``best`` ({"step", "score"} of
    best.pt, if an evaluation qualified)."""
    sft_eval = trainer.extra.get("sft_eval", {})
    if trainer.dist.is_main and not sft_eval:
        with reference_generator(task.model.policy, task.ref) as sft_policy:
            sft_eval = task.evaluate_policy(sft_policy, ref=sft_policy)
        trainer.extra["sft_eval"] = sft_eval
    if trainer.step == 0:
        # The starting policy is a candidate for best.pt too: when no step of optimisation against
        # the reward model beats it on the held-out score, best.pt is the SFT policy (step 0).
        trainer.keep_best(sft_eval)
    summary = trainer.fit()
    summary["sft"] = sft_eval
    summary["rollouts"] = task.rollouts_done
    summary["held_out_prompts"] = len(task.eval_prompts)
    summary["best"] = trainer.best_record()
    return summary


def policy_prompts(cfg: Any, tok: Tokenizer, block: int
                   ) -> tuple[list[list[int]], list[list[int]], list[Any], str]:
    """(training prompts, held-out prompts, the held-out prompts' records as a gold judge reads
    them, what the held-out score is on) of an RL stage's config (PPO, GRPO): ``eval_prompts``
    when given, else a seeded ``eval_fraction`` of ``prompts``."""
    records, prompts = load_prompts(cfg.prompts, tok, block, "prompts")
    if cfg.eval_prompts:
        eval_records, eval_prompts = load_prompts(cfg.eval_prompts, tok, block, "eval_prompts")
        return prompts, eval_prompts, eval_records, (
            f"held-out score on {plural(min(len(eval_prompts), cfg.eval_max_prompts), 'prompt')} of eval_prompts")
    # score the policy on prompts like the user's own, never on unrelated ones
    train, held = hold_out(list(zip(records, prompts)), cfg.eval_fraction, cfg.eval_max_prompts, cfg.seed)
    eval_prompts = [p for _, p in held]
    return [p for _, p in train], eval_prompts, [r for r, _ in held], (
        f"held-out score on {plural(len(eval_prompts), 'prompt')} kept out of prompts (eval_fraction="
        f"{cfg.eval_fraction:g}, not trained on)" if eval_prompts else
        "no held-out score: no eval_prompts, and none of prompts held out (eval_fraction, eval_max_prompts)")


def hold_out(prompts: list[T], fraction: float, most: int, seed: int) -> tuple[list[T], list[T]]:
    """(train, held-out) prompts: a seeded ``fraction`` held out, at most ``most`` of them (the rest
    of the slice would be neither trained on nor scored)."""
    train_ids, val_ids = split_holdout(len(prompts), fraction, seed)
    train_ids = sorted(train_ids + val_ids[most:])
    return [prompts[i] for i in train_ids], [prompts[i] for i in val_ids[:most]]


def rollout_plan(cfg: Any, prompts: list[list[int]], eval_prompts: list[list[int]], block: int,
                 held_out: str, group_size: int = 1) -> DataPlan:
    """Epochs are passes over the training prompts: each rollout answers rollout_batch_size /
    group_size of them (``group_size`` times each: GRPO) and trains ppo_epochs passes of its
    minibatches."""
    world = distributed_env().world_size
    steps_per_rollout = cfg.ppo_epochs * math.ceil(world * cfg.rollout_batch_size / cfg.mini_batch_size) / (
        world * cfg.grad_accum)
    rollouts = math.ceil(cfg.max_steps / steps_per_rollout)
    per_rollout = cfg.rollout_batch_size // group_size
    answers = f"{per_rollout} prompts" + (f" x {group_size} samples" if group_size > 1 else "")
    seq = min(block, max(map(len, prompts)) + cfg.max_new_tokens)
    return DataPlan(len(prompts), "prompt", len(prompts) / (per_rollout * world) * steps_per_rollout,
                    cfg.mini_batch_size * cfg.grad_accum * world * seq, val_size=min(len(eval_prompts), cfg.eval_max_prompts),
                    val_unit="prompt" if eval_prompts else "",
                    step=f"micro-batch of {plural(cfg.mini_batch_size, 'sequence')} (mini_batch_size) of up to {seq} tokens",
                    notes=[f"about {plural(rollouts, 'rollout')} of {answers}, "
                           f"{steps_per_rollout:g} steps each; {held_out}"])


def ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None, gold: GoldJudge | None = None) -> dict[str, Any]:
    """Run PPO per ``cfg`` (``gold``: see :func:`build_ppo`); the summary as :func:`fit_on_policy` says."""
    return fit_on_policy(*build_ppo(cfg, reward_fn, gold))
