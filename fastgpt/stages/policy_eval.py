"""Held-out evaluation of a policy during PPO or GRPO: proxy reward, gold score, KL, length.

Optimising a learned reward model eventually hurts: the proxy (reward-model) score keeps rising
while the true quality peaks and falls (Gao et al., "Scaling laws for reward model
over-optimization"). To see that happen, every evaluation scores the same held-out prompts with
the reward model (the proxy) and, when the caller has one, with a *gold judge*: any callable that
knows what good is (a person's labels, a program, the demo's simulated labeler). The judge comes
in as a plain callable, so this library code never imports where it came from.

A gold judge is ``gold(prompts, responses, finished) -> {name: per-response values}``; prompts are
the eval file's records (a user string or a messages list), responses decoded text without the
end-of-turn token, ``finished`` whether it was emitted. The mapping must hold ``"score"`` (higher
is better) and may hold more (``"correct"``, ...); each is averaged and logged as
``gold_<name>_<greedy|sampled>``.

Checkpoint selection (:func:`selection_score`) ranks evaluations by the gold score of greedy
answers, or, with no gold judge, by the reward-model score of greedy answers among evaluations
whose KL to the reference stays within a bound (a proxy alone rewards drifting far).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import IGNORE_INDEX
from ..engine import SamplingParams, generate
from ..model import GPT
from ..tokenizer import Tokenizer
from ..trainer import autocast_context
from .common import Reference

# reward_fn(prompts, responses) -> normalised score per sequence, (N,) float tensor.
RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
GoldJudge = Callable[[list[Any], list[str], list[bool]], dict[str, Sequence[float]]]


@torch.no_grad()
def evaluate_policy(policy: GPT, ref: Reference, tok: Tokenizer, prompts: list[list[int]], reward_fn: RewardFn, *,
                    max_new_tokens: int, temperature: float, seed: int, batch_size: int, dtype: str = "auto",
                    gold: GoldJudge | None = None, prompt_records: Sequence[Any] = ()) -> dict[str, float]:
    """Greedy and sampled answers to ``prompts`` (the same samples at every call: fixed seed).

    Returns ``score_<kind>`` (mean normalised reward-model score), ``len_<kind>`` (mean response
    tokens), ``kl_to_ref`` (k1 KL of the sampled answers to ``ref``, nats per response; the
    greedy answers have no KL of their own), ``response_len`` (= ``len_sampled``) and, with
    ``gold``, ``gold_<name>_<kind>`` for every value the judge returns (``prompt_records`` are the
    prompts as the judge reads them, one per prompt).
    """
    if not prompts:
        return {}
    if gold is not None and len(prompt_records) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_records)} prompt records for the gold judge")
    out: dict[str, float] = {}
    for kind, temp in (("greedy", 0.0), ("sampled", temperature)):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temp, stop_ids=tok.stop_ids, seed=seed)
        gens = generate(policy, prompts, params, vocab_limit=tok.vocab_size, batch_size=batch_size)
        responses = [g.tokens for g in gens]
        out[f"score_{kind}"] = float(reward_fn(prompts, responses).float().mean())
        out[f"len_{kind}"] = float(np.mean([len(r) for r in responses]))
        if gold is not None:
            texts = [tok.decode(g.tokens[:-1] if g.finished else g.tokens) for g in gens]  # without the stop token
            for name, values in gold(list(prompt_records), texts, [g.finished for g in gens]).items():
                out[f"gold_{name}_{kind}"] = float(np.mean(values))
        if kind == "sampled":
            out["kl_to_ref"] = 0.0 if policy is ref else sequence_kl(policy, ref, prompts, responses, temperature, dtype)
            out["response_len"] = out["len_sampled"]
    return out


@torch.no_grad()
def sequence_kl(policy: GPT, ref: Reference, prompts: list[list[int]], responses: list[list[int]],
                temperature: float, dtype: str = "auto") -> float:
    """Mean over responses of sum_t log p(y_t) - log q(y_t): the k1 KL estimate per response."""
    device = policy.wte.weight.device
    total = 0.0
    for p, r in zip(prompts, responses):
        s = torch.tensor([p + r], device=device)
        targets = torch.tensor([[IGNORE_INDEX] * (len(p) - 1) + r + [IGNORE_INDEX]], device=device)
        with autocast_context(device, dtype):
            lp, _ = policy.token_logprobs(s, targets, temperature=temperature)
            ref_lp, _ = ref.token_logprobs(s, targets, temperature=temperature)
        total += float((lp.float() - ref_lp.float()).sum())
    return total / max(1, len(prompts))


def selection_score(metrics: dict[str, float], max_kl: float) -> float | None:
    """How good a checkpoint is for keeping as the best: the gold score of its greedy answers when
    a gold judge scored them, else its reward-model score if its KL to the reference is at most
    ``max_kl`` (0: no bound); None when it does not qualify."""
    if "gold_score_greedy" in metrics:
        return metrics["gold_score_greedy"]
    if "score_greedy" not in metrics:
        return None
    kl = metrics.get("kl_to_ref", math.inf)
    return metrics["score_greedy"] if max_kl <= 0 or kl <= max_kl else None
