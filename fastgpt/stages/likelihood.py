"""A frozen language model's likelihood of a response, as two extra inputs of the reward.

A reward model fine-tuned on a few thousand rankings learns what is easy to see in them (style,
length, a missing end of turn) long before it learns to check a fact, while the pre-trained model
it started from already "knows" the fact as a generator: a wrong value in an answer is a token it
finds surprising. With ``likelihood_from`` set, the reward stage reads that knowledge instead of
hoping the scalar head relearns it. For every response a frozen language model (typically the
pre-trained base) gives two statistics of its per-token log-probabilities over the response text:

* ``mean_logprob``: the average, how plausible the response is as a whole;
* ``min_logprob``: the least likely token, where one wrong word in an otherwise fluent answer shows.

The language model reads the conversation as its pre-training text looked: the prompt's words (the
chat format's special tokens, which a base model never saw, dropped), a space, the response's
words (the end of turn dropped). An empty response scores as one uniformly guessed token, so that
saying nothing is not the most plausible answer. After the reward model has trained, three
weights (its own score and the two statistics) are fitted by logistic regression, the
Bradley-Terry model the reward model itself was trained with, on the held-out ranked prompts:
on its training pairs the reward model has fitted the labels and would be trusted too much. The
combined score replaces the reward model's score everywhere it is read (normalisation, ``score``,
best-of-N, PPO, GRPO). The checkpoint's ``extra["likelihood"]`` records the language model's path
and the weights, so the reward is reproducible from the two files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..checkpoint import load_model
from ..chatdata import Example, iter_batches, pack_groups
from ..config import ConfigError
from ..data import IGNORE_INDEX
from ..model import GPT
from ..tokenizer import Tokenizer
from .common import require_same_tokenizer

FEATURES = ("mean_logprob", "min_logprob")
WEIGHT_NAMES = ("reward", *FEATURES)


@dataclass
class LikelihoodTerm:
    """The frozen language model and the fitted weights of (reward model score, *FEATURES)."""

    lm: GPT
    tok: Tokenizer
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def plain_text(self, prompt: list[int], response: list[int]) -> Example:
        """The conversation as a base model read its pre-training text: a document start, the
        prompt's ordinary tokens (chat-format tokens dropped), a space, the response's; labels
        mark the response. Cut to the context from the left."""
        special = set(self.tok.special_ids.values())
        ctx = [self.tok.eot_id] + [t for t in prompt if t not in special] + self.tok.encode(" ")
        resp = [t for t in response if t not in special]
        ids = (ctx + resp)[-self.lm.config.block_size:]
        n_ctx = len(ids) - min(len(resp), len(ids) - 1)
        return ids, [IGNORE_INDEX] * (n_ctx - 1) + ids[n_ctx:] + [IGNORE_INDEX]

    @torch.no_grad()
    def features(self, prompts: Sequence[list[int]], responses: Sequence[list[int]], rows: int = 16) -> torch.Tensor:
        """(len(prompts), 2) statistics of the language model's log-probs of each response's
        tokens, read as plain text (:meth:`plain_text`), packed ``rows`` rows at a time; on the CPU."""
        device = next(self.lm.parameters()).device
        examples = [self.plain_text(p, r) for p, r in zip(prompts, responses)]
        empty = -math.log(self.lm.config.vocab_size)
        out = torch.full((len(examples), len(FEATURES)), empty)
        i = 0
        for batch, used in iter_batches([[e] for e in examples], pack_groups, rows, self.lm.config.block_size,
                                        self.tok.pad_id):
            batch = batch.to(device)
            lp, _ = self.lm.token_logprobs(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens)
            lp, scored = lp.float().reshape(-1).cpu(), (batch.labels != IGNORE_INDEX).reshape(-1).cpu()
            for s, e in batch.spans:
                values = lp[s:e][scored[s:e]]
                if values.numel():
                    out[i, 0], out[i, 1] = values.mean(), values.min()
                i += 1
        return out

    def combine(self, reward: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.weights, device=reward.device, dtype=torch.float32)
        return w[0] * reward.float() + features.float() @ w[1:]

    def to_extra(self, checkpoint: str) -> dict[str, Any]:
        return {"checkpoint": checkpoint, "weights": dict(zip(WEIGHT_NAMES, self.weights))}

    @classmethod
    def from_extra(cls, extra: dict[str, Any], tok: Tokenizer, device: torch.device | str,
                   where: str) -> "LikelihoodTerm | None":
        """The term a reward checkpoint's ``extra`` names (None when it was trained without one)."""
        spec = extra.get("likelihood")
        if not spec:
            return None
        term = load_likelihood_model(spec["checkpoint"], tok, device, f"{where}: its likelihood model")
        term.weights = tuple(float(spec["weights"][k]) for k in WEIGHT_NAMES)  # type: ignore[assignment]
        return term


def load_likelihood_model(path: str, tok: Tokenizer, device: torch.device | str, what: str) -> LikelihoodTerm:
    """A frozen language model from ``path`` (weights 1, 0, 0 until fitted)."""
    if not Path(path).exists():
        raise ConfigError(f"{what} {path} not found (expected a language-model checkpoint, e.g. the base model)")
    lm, lm_tok, _ = load_model(path, kind="gpt", device=device)
    require_same_tokenizer(tok, lm_tok, what)
    for p in lm.parameters():
        p.requires_grad_(False)
    return LikelihoodTerm(lm.eval(), tok)


def split_example(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a reward-stage example (its labels mark the response)."""
    ids, labels = example
    first = next((i for i, t in enumerate(labels or []) if t != IGNORE_INDEX), len(ids) - 1)
    return ids[:first + 1], ids[first + 1:]


def fit_weights(reward: torch.Tensor, features: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                l2: float = 1e-3) -> tuple[float, float, float]:
    """Weights of (reward, *features) maximising the Bradley-Terry likelihood of ``better`` over
    ``worse`` (indices into the rows), by L-BFGS; each input is scaled by its mean absolute pair
    difference first, so ``l2`` shrinks them alike."""
    x = torch.cat([reward.double().reshape(-1, 1), features.double()], 1)
    diff = x[better] - x[worse]
    scale = diff.abs().mean(0).clamp(min=1e-6)
    diff = diff / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.softplus(-(diff @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(float(v) for v in (w.detach() / scale))  # type: ignore[return-value]
