"""Stage losses as pure functions of tensors: the K-wise ranking loss (reward model), the DPO
family on the same pairs, group-relative advantages (GRPO, RLOO), and the RL pieces (KL
estimate, GAE, clipped PPO losses)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------ reward model
def ranking_pairs(ranking: Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
    """All (better, worse) pairs implied by a best-first ranking; a nested list is a tie group
    and yields no pair within itself. ``[2, [0, 3], 1]`` -> (2,0) (2,3) (2,1) (0,1) (3,1)."""
    groups = [list(g) if isinstance(g, (list, tuple)) else [g] for g in ranking]
    return [(b, w) for i, better in enumerate(groups) for worse in groups[i + 1:] for b in better for w in worse]


def ranking_loss(scores: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, prompt: torch.Tensor,
                 n_prompts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's K-wise loss: every prompt's C(K,2) pairs form one batch element.

    scores (R,) holds one reward per response, each response scored once; ``better``/``worse``
    (P,) index into it and ``prompt`` (P,) says which prompt each pair belongs to. The loss is
    the mean over prompts of the mean over that prompt's pairs of -log sigmoid(r_better - r_worse).
    Returns (loss, per-pair correctness as float).
    """
    margin = scores[better] - scores[worse]
    return prompt_mean(-F.logsigmoid(margin), prompt, n_prompts), (margin > 0).float()


def prompt_mean(per_pair: torch.Tensor, prompt: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """Mean over prompts of the mean over each prompt's pairs: a prompt's C(K, 2) pairs are one
    batch element, so a prompt with many responses does not outweigh one with two."""
    per_prompt = torch.zeros(n_prompts, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, prompt, per_pair)
    counts = torch.zeros(n_prompts, dtype=per_pair.dtype, device=per_pair.device).index_add_(
        0, prompt, torch.ones_like(per_pair))
    return (per_prompt / counts.clamp(min=1)).sum() / max(1, int((counts > 0).sum()))


# ------------------------------------------------------------------------------ DPO family
DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(logratios: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, prompt: torch.Tensor,
             n_prompts: int, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference losses on the implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``.

    ``logratios`` (R,) is each response's sequence log-ratio to the reference, each response
    counted once however many pairs it is in; ``better``/``worse``/``prompt`` (P,) index the
    pairs as in :func:`ranking_loss`, and pairs are averaged per prompt the same way. With
    h = logratio(better) - logratio(worse):

    * sigmoid (DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps =
      ``label_smoothing`` > 0 is conservative DPO (a share eps of the labels assumed flipped);
    * ipo (IPO, Azar et al. 2023): (h - 1 / (2 beta))^2, which stops pushing once the margin is
      reached instead of driving h to infinity on deterministic preferences.

    Sequence log-probs are sums over the response's tokens for both (IPO's paper uses sums; some
    libraries average per token, which changes the scale of beta). Returns (loss, per-pair
    margins beta * h).
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"dpo loss {kind!r}: expected one of {', '.join(DPO_LOSSES)}")
    if beta <= 0:
        raise ValueError(f"beta={beta}: expected > 0")
    h = logratios[better] - logratios[worse]
    if kind == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing (conservative DPO) applies to the sigmoid loss only")
        per_pair = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        per_pair = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return prompt_mean(per_pair, prompt, n_prompts), (beta * h).detach()


# --------------------------------------------------------------------------- GRPO / RLOO
ADVANTAGES = ("grpo", "rloo")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Advantages of (P, K) rewards, K samples of each of P prompts, with the group as baseline.

    grpo: (r - mean of the group) / (std of the group + eps), std unbiased as in the GRPO paper;
    rloo: r - mean of the other K - 1 samples (REINFORCE leave-one-out; unbiased, unscaled).
    A group whose samples all score the same gives zero advantages: it carries no signal.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, K >= 2), got {tuple(rewards.shape)}")
    K = rewards.shape[1]
    mean = rewards.mean(1, keepdim=True)
    if kind == "grpo":
        return (rewards - mean) / (rewards.std(1, keepdim=True) + eps)
    if kind == "rloo":
        return (rewards - (rewards.sum(1, keepdim=True) - rewards) / (K - 1))
    raise ValueError(f"advantage {kind!r}: expected one of {', '.join(ADVANTAGES)}")


# ---------------------------------------------------------------------------------- RL (PPO)
# Every RL tensor below is (N, T) over response tokens with a bool/0-1 ``mask`` of real tokens
# (1-D works too); means are over masked tokens only, so padding never moves a statistic.
def masked_mean(x: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """Mean of x over masked tokens. ``level="sequence"`` averages each row (sequence) first, then
    the rows: every response weighs the same, so each token of a short response weighs more than
    one of a long response (GRPO's original normalisation; see :mod:`fastgpt.stages.grpo`)."""
    m = mask.to(x.dtype)
    if level == "sequence":
        rows = m.sum(-1)
        per_row = (x * m).sum(-1) / rows.clamp(min=1)
        return (per_row * (rows > 0)).sum() / (rows > 0).sum().clamp(min=1)
    if level != "token":
        raise ValueError(f"loss level {level!r}: expected 'token' or 'sequence'")
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over masked entries, as lm-human-preferences."""
    m = mask.to(x.dtype)
    n = m.sum()
    centred = (x - masked_mean(x, mask)) * m
    return (centred ** 2).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; ``shift_mean=False`` only rescales (reward
    whitening must keep the sign of the rewards). Masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log p - log q (unbiased, can be negative; what InstructGPT's reward penalty uses);
    k3 = (r - 1) - log r with r = q / p (unbiased, always >= 0, lower variance; Schulman's note).
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {kind!r}: expected 'k1' or 'k3'")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) right-padded response tokens.

    The value after a sequence's last real token is 0 (the episode ends there), so padding
    contributes nothing. Returns (advantages, returns = advantages + values), both 0 on padding.
    """
    m = mask.to(values.dtype)
    rewards, values = rewards * m, values * m
    T = rewards.shape[-1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[..., 0])
    for t in reversed(range(T)):  # T is at most a few hundred tokens: a Python loop is fine
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        last = (delta + gamma * lam * last) * m[..., t]
        adv[..., t] = last
    return adv, (adv + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2, level: str = "token"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old),
    over tokens or per sequence first (``level``, as :func:`masked_mean`).

    Returns (loss, fraction of tokens where the clipped term won, approx KL(old || new) as the
    k3 estimate mean((r - 1) - log r), the quantity early stopping watches).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, level)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean of max((v - R)^2, (clip(v, v_old +- eps) - R)^2); ``clip`` <= 0 turns the
    clipping off. Returns (loss, fraction of tokens where the clipped term won)."""
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, beta: float) -> None:
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move beta so the per-sequence KL tracks ``target``.

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon), where n_steps is
    the number of sequences just rolled out; the clipped error keeps one noisy batch from
    swinging beta.
    """

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL: target and horizon must be positive")
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ------------------------------------------------------------------- reward-hacking guards
def length_penalty(lengths: torch.Tensor, target: float, coef: float) -> torch.Tensor:
    """``coef * |lengths - target| / target``: what a response loses for straying from the target
    length, in normalised-score units (coef 1: a response twice the target, or empty, loses 1)."""
    if target <= 0:
        raise ValueError(f"length penalty: target length must be positive, got {target}")
    return coef * (lengths.float() - target).abs() / target


ENSEMBLE_MODES = ("mean", "min", "lcb")


def combine_ensemble(scores: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """One score per response from several reward models' normalised scores, (M, N) -> (N,).

    ``mean``; ``min`` (the most pessimistic member); ``lcb``, a lower confidence bound: the mean
    minus the members' standard deviation, so responses the models disagree on score lower
    (a policy exploiting one model's error gains less). One model gives its own scores back.
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"ensemble mode {mode!r}: expected one of {ENSEMBLE_MODES}")
    if mode == "min":
        return scores.min(0).values
    mean = scores.mean(0)
    if mode == "lcb" and scores.shape[0] > 1:
        return mean - scores.std(0)
    return mean
