"""Stage 3a: the reward model, trained on human (or simulated) rankings of the SFT model's answers.

A :class:`ScalarModel` starts from the SFT checkpoint (backbone = the SFT GPT, scalar head fresh)
and learns InstructGPT's K-wise loss: for each prompt, all C(K, 2) pairs implied by its ranking
are one batch element, ``mean over pairs of -log sigmoid(r_better - r_worse)``.  Each response is
``encode_prompt(prompt) + response [+ end of turn if it finished]``, scored once at its last token
(never once per pair), and all responses of several prompts are packed into varlen rows; a
prompt's responses always share a micro-batch, since its pairs need all of their scores.

After training the RM is normalised so the SFT policy's responses (every response in the
rankings file) score mean 0, std 1: ``reward_offset`` / ``reward_scale`` go to the checkpoint's
``extra`` and :func:`score` returns ``(r - offset) / scale``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..chatdata import (
    BadRecord, Comparison, EpochOrder, Example, LoadReport, fits_one_batch, iter_batches,
    pack_groups, parse_prompt, parse_preference, read_records,
)
from ..checkpoint import load_model
from ..config import ConfigError
from ..console import plural
from ..data import IGNORE_INDEX, PackedBatch
from ..losses import ranking_loss, ranking_pairs
from ..model import ScalarModel
from ..tokenizer import Message, Tokenizer, encode_prompt
from ..trainer import DataPlan, Trainer, distributed_env, resolve_device, seed_everything
from .configs import RewardConfig
from .common import add_lora, load_start_model, micro_batch_rows, packed_plan, shorten_context, split_holdout
from .likelihood import WEIGHT_NAMES, LikelihoodTerm, fit_weights, load_likelihood_model, split_example


# ---------------------------------------------------------------------------- data
@dataclass
class RankedGroup:
    """One prompt's encoded responses and the (better, worse) pairs between them."""

    examples: list[Example]
    pairs: list[tuple[int, int]]
    ref_logps: list[float] | None = None  # DPO: the reference's log-prob of each response, once computed


def split_response(tok: Tokenizer, prompt_ids: list[int], response: str, finished: bool,
                   block_size: int) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids (+ the end-of-turn id if finished), truncated), cut to the context: the
    prompt loses its start first (down to half the context), then the response loses its end."""
    resp = tok.encode(response) + ([tok.end_id] if finished else [])
    if len(prompt_ids) + len(resp) <= block_size:
        return prompt_ids, resp, False
    keep = max(block_size - len(resp), min(len(prompt_ids), block_size // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    return prompt_ids, resp[:block_size - len(prompt_ids)], True


def encode_response(tok: Tokenizer, prompt_ids: list[int], response: str, finished: bool,
                    block_size: int) -> tuple[list[int], bool]:
    """Prompt + response ids, cut to the context as :func:`split_response` does."""
    prompt_ids, resp, cut = split_response(tok, prompt_ids, response, finished, block_size)
    return prompt_ids + resp, cut


def encode_comparison(tok: Tokenizer, c: Comparison, block_size: int) -> tuple[list[Example], int]:
    """(examples, how many were truncated) for every response of a comparison. An example's
    labels mark its response tokens (what DPO scores; the reward model reads only the last token)."""
    prompt_ids = encode_prompt(tok, c.messages)
    out, truncated = [], 0
    for response, finished in zip(c.responses, c.finished):
        kept, resp, cut = split_response(tok, prompt_ids, response, finished, block_size)
        out.append((kept + resp, response_labels(len(kept), resp)))
        truncated += cut
    return out, truncated


def response_labels(prompt_len: int, response: list[int]) -> list[int]:
    """Next-token labels of prompt + response that train on the response only (the position
    before each response token predicts it)."""
    return [IGNORE_INDEX] * (prompt_len - 1) + response + [IGNORE_INDEX]


def load_preferences(path: str, tok: Tokenizer, block_size: int, n_rows: int, max_bad_fraction: float
                     ) -> tuple[list[RankedGroup], LoadReport]:
    """Encode every usable ranking / pair of ``path``; skip-and-count the rest (one summary line).
    All-tied rankings are returned (their responses count for normalisation) with no pairs."""
    if not path:
        raise ConfigError("data is required: a rankings JSONL (fastgpt rank) or chosen/rejected pairs")
    report = LoadReport(path)

    def parse(obj: dict) -> RankedGroup:
        c = parse_preference(obj)
        examples, truncated = encode_comparison(tok, c, block_size)
        if not fits_one_batch([len(ids) for ids, _ in examples], n_rows, block_size):
            raise BadRecord(f"its {len(examples)} responses do not fit one micro-batch of batch_size={n_rows} rows")
        report.truncated += truncated
        return RankedGroup(examples, ranking_pairs(c.ranking))

    groups = [g for _, g in read_records(path, parse, report)]
    report.ignored = sum(not g.pairs for g in groups)  # all tied: valid, but nothing to learn from
    report.finish("reward", max_bad_fraction, "rankings", block_size)
    return groups, report


def pack_ranked(groups: list[RankedGroup], n_rows: int, row_len: int, pad_id: int) -> tuple[PackedBatch, int]:
    """Pack whole groups; ``extras`` holds the pair tensors indexing the batch's responses (and
    their reference log-probs when the groups carry them)."""
    batch, used = pack_groups([g.examples for g in groups], n_rows, row_len, pad_id)
    better, worse, prompt, offset = [], [], [], 0
    for p, g in enumerate(groups[:used]):
        better += [offset + b for b, _ in g.pairs]
        worse += [offset + w for _, w in g.pairs]
        prompt += [p] * len(g.pairs)
        offset += len(g.examples)
    batch.extras = {"better": torch.tensor(better), "worse": torch.tensor(worse),
                    "prompt": torch.tensor(prompt), "n_prompts": used}
    if used and all(g.ref_logps is not None for g in groups[:used]):
        batch.extras["ref_logp"] = torch.tensor([r for g in groups[:used] for r in g.ref_logps])
    return batch, used


def last_token_scores(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """One forward over the packed batch; the score of each response at its last token, (R,)."""
    values = model(batch.idx, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    return values.reshape(-1)[batch.last_positions()]


def pair_tensors(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(better, worse, prompt, n_prompts) of a :func:`pack_ranked` batch, on its device."""
    x, device = batch.extras, batch.idx.device
    return x["better"].to(device), x["worse"].to(device), x["prompt"].to(device), x["n_prompts"]


# ---------------------------------------------------------------------------- task
class RewardTask:
    """Packed ranked responses; InstructGPT's K-wise ranking loss. DPO's task is this one with
    another :meth:`pair_loss` (the data, its order and the evaluation are the same)."""

    def __init__(self, cfg: RewardConfig, train: list[RankedGroup], val: list[RankedGroup], pad_id: int,
                 block_size: int, device: torch.device) -> None:
        dist = distributed_env()
        self.cfg, self.train, self.val, self.pad_id = cfg, train, val, pad_id
        self.block_size, self.device = block_size, device
        self.lengths = [[len(ids) for ids, _ in g.examples] for g in train]
        self.order = EpochOrder(len(train), cfg.seed, dist.rank, dist.world_size)

    def next_batch(self) -> PackedBatch:
        items = self.order.take(self.lengths, self.cfg.batch_size, self.block_size)
        batch, _ = pack_ranked([self.train[i] for i in items], self.cfg.batch_size, self.block_size, self.pad_id)
        return batch.to(self.device)

    def pair_loss(self, model: nn.Module, batch: PackedBatch
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """(loss, per-pair margin of the better response's reward, other metrics)."""
        better, worse, prompt, n_prompts = pair_tensors(batch)
        scores = last_token_scores(model, batch)
        loss, _ = ranking_loss(scores, better, worse, prompt, n_prompts)
        return loss, (scores[better] - scores[worse]).detach(), {}

    def loss(self, model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, margin, metrics = self.pair_loss(model, batch)
        return loss, {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
                      "packing_efficiency": batch.efficiency, **metrics}

    def tokens(self, batch: PackedBatch) -> int:
        return batch.n_real

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out pairwise accuracy, mean margin and loss (every pair of every val prompt)."""
        if not self.val:
            return {}
        losses, margins = [], []
        for batch, used in iter_batches(self.val, pack_ranked, self.cfg.batch_size, self.block_size, self.pad_id):
            loss, m, _ = self.pair_loss(model, batch.to(self.device))
            losses.append(float(loss) * used)
            margins.append(m)
        margin = torch.cat(margins)
        return {"val_loss": sum(losses) / len(self.val), "val_accuracy": float((margin > 0).float().mean()),
                "val_margin": float(margin.mean())}

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


# ------------------------------------------------------------------------- scoring
@torch.no_grad()
def raw_scores(model: nn.Module, sequences: Sequence[list[int]], rows: int, row_len: int, pad_id: int) -> list[float]:
    """Unnormalised score of each id sequence (each at most ``row_len``), packed in order."""
    device = next(model.parameters()).device
    out: list[float] = []
    for batch, _ in iter_batches([[(list(s), None)] for s in sequences], pack_groups, rows, row_len, pad_id):
        out += last_token_scores(model, batch.to(device)).float().tolist()
    return out


def reward_scores(model: nn.Module, sequences: Sequence[list[int]], prompts: Sequence[list[int]],
                  responses: Sequence[list[int]], rows: int, pad_id: int,
                  likelihood: LikelihoodTerm | None = None) -> torch.Tensor:
    """Unnormalised rewards: the reward model's score of each id sequence (prompt + response cut
    to its context), plus, when it was trained with one, the likelihood term of the (prompt,
    response) ids it came from. The one place both ``score`` and PPO's scorer combine them."""
    raw = torch.tensor(raw_scores(model, sequences, rows, model.config.block_size, pad_id))
    if likelihood is None:
        return raw
    return likelihood.combine(raw, likelihood.features(prompts, responses, rows))


def score(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str | list[Message]],
          responses: Sequence[str], finished: Sequence[bool] | None = None,
          extra: dict[str, Any] | None = None, batch_size: int = 16) -> list[float]:
    """Normalised rewards ``(r - reward_offset) / reward_scale`` of (prompt, response) pairs.

    ``extra`` is the reward checkpoint's ``extra`` (None: raw scores; with ``likelihood``, the
    reward model's score combined with its language model's features, see :mod:`.likelihood`).
    A prompt is a user string or a messages list; ``finished`` (default all True) appends the end
    of turn as in training.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    finished = [True] * len(responses) if finished is None else list(finished)
    T = model.config.block_size
    prompt_ids = [encode_prompt(tokenizer, parse_prompt(p)) for p in prompts]
    seqs = [encode_response(tokenizer, p, r, f, T)[0] for p, r, f in zip(prompt_ids, responses, finished)]
    likelihood = LikelihoodTerm.from_extra(extra or {}, tokenizer, next(model.parameters()).device, "reward model")
    was_training = model.training
    model.eval()
    raw = reward_scores(model, seqs, prompt_ids, [tokenizer.encode(r) for r in responses], batch_size,
                        tokenizer.pad_id, likelihood).tolist()
    model.train(was_training)
    offset = (extra or {}).get("reward_offset", 0.0)
    scale = (extra or {}).get("reward_scale", 1.0)
    return [(r - offset) / scale for r in raw]


def best_of_n(scores: Sequence[float], group: int, n: int) -> list[int]:
    """Rejection sampling with a reward model: ``scores`` holds ``group`` consecutive samples per
    prompt; for each prompt, the index (into ``scores``) of the highest-scoring of its first ``n``
    samples (the earliest on a tie). ``n = 1`` is plain sampling."""
    if not 1 <= n <= group or len(scores) % group:
        raise ValueError(f"best_of_n: expected 1 <= n={n} <= group={group} and whole groups, "
                         f"got {len(scores)} scores")
    return [start + max(range(n), key=lambda i: (scores[start + i], -i)) for start in range(0, len(scores), group)]


def load_reward_model(path: str, device: str | torch.device = "cpu") -> tuple[ScalarModel, Tokenizer, dict[str, Any]]:
    """(reward model in eval mode, tokenizer, extra with reward_offset / reward_scale)."""
    model, tok, ckpt = load_model(path, kind="scalar", device=device)
    return model, tok, dict(ckpt.get("extra", {}))  # type: ignore[return-value]


# --------------------------------------------------------------------------- stage
def preference_data(cfg: Any, tok: Tokenizer, block_size: int, stage: str
                    ) -> tuple[list[RankedGroup], list[RankedGroup], list[RankedGroup], LoadReport, DataPlan]:
    """(every group read, train groups, held-out groups, load report, data plan) of ``cfg.data``
    for a stage on rankings (reward, DPO); with ``cfg.epochs`` > 0 it also sets ``cfg.max_steps``
    (at least ``cfg.min_steps``)."""
    every, report = load_preferences(cfg.data, tok, block_size, cfg.batch_size, cfg.max_bad_fraction)
    groups = [g for g in every if g.pairs]
    train_ids, val_ids = split_holdout(len(groups), cfg.val_fraction, cfg.seed)
    train = [groups[i] for i in train_ids]
    if cfg.epochs > 0 and cfg.max_steps != type(cfg).max_steps:
        raise ConfigError(f"{stage}: set either epochs ({cfg.epochs}) or max_steps ({cfg.max_steps}), "
                          f"not both (epochs=0 uses max_steps)")
    plan = packed_plan(cfg, [[len(ids) for ids, _ in g.examples] for g in train], block_size, "ranked prompt",
                       len(val_ids))
    if cfg.epochs > 0 and cfg.max_steps < cfg.min_steps:
        plan.notes.append(f"{cfg.epochs:g} epoch{'' if cfg.epochs == 1 else 's'} of {plural(len(train), 'ranked prompt')} "
                          f"would be only {plural(cfg.max_steps, 'step')}: training min_steps={cfg.min_steps} instead")
        cfg.max_steps = cfg.min_steps
    return every, train, [groups[i] for i in val_ids], report, plan


def train_reward(cfg: RewardConfig) -> dict[str, Any]:
    """Train a reward model from ``cfg.init_from`` on ``cfg.data``, normalise it on the file's
    responses and return the trainer's summary (plus ``data`` and ``reward_offset/scale``)."""
    seed_everything(cfg.seed)
    lm, tok = load_start_model(cfg.init_from)
    if cfg.block_size:
        shorten_context(lm, cfg.block_size, f"block_size={cfg.block_size}")
    model = ScalarModel(lm.config)
    model.gpt.load_state_dict(lm.state_dict())
    add_lora(model.gpt, cfg, "reward")  # the scalar head is new: it always trains
    T = model.config.block_size
    device = resolve_device(cfg.device, distributed_env())
    cfg.batch_size = micro_batch_rows(cfg, lm.config, "reward", T, device)
    every, train, val, report, plan = preference_data(cfg, tok, T, "reward")
    task = RewardTask(cfg, train, val, tok.pad_id, T, device)
    trainer = Trainer(cfg, model, task, stage="reward", tokenizer=tok, model_kind="scalar", data={"data": cfg.data},
                      plan=plan, flops_per_token=model.gpt.flops_per_token(T))
    # Loaded before training, so that a wrong path or tokenizer fails at once, but on the CPU: the
    # frozen model needs no device memory until the head has trained.
    likelihood = (load_likelihood_model(cfg.likelihood_from, tok, "cpu", "likelihood_from")
                  if cfg.likelihood_from else None)
    summary = trainer.fit()
    model.eval()
    examples = [e for g in every for e in g.examples]
    with trainer.autocast():
        raw = torch.tensor(raw_scores(model, [ids for ids, _ in examples], cfg.batch_size, T, tok.pad_id))
        if likelihood is not None:
            likelihood.lm.to(device)
            prompts, responses = zip(*map(split_example, examples))
            features = likelihood.features(prompts, responses, rows=cfg.batch_size)
            raw = stack_likelihood(likelihood, raw, features, every, train, val, summary)
            trainer.extra["likelihood"] = likelihood.to_extra(str(Path(cfg.likelihood_from).resolve()))
    # SFT responses score mean 0, std 1: PPO's reward scale then does not depend on this run.
    trainer.extra.update(reward_offset=float(raw.mean()), reward_scale=float(raw.std().clamp(min=1e-6)))
    trainer.save()
    summary["data"] = {"train": len(train), "val": len(val), "skipped": len(report.bad),
                       "truncated": report.truncated, "responses": len(raw)}
    summary.update(reward_offset=trainer.extra["reward_offset"], reward_scale=trainer.extra["reward_scale"])
    return summary


def stack_likelihood(term: LikelihoodTerm, reward: torch.Tensor, features: torch.Tensor, every: list[RankedGroup],
                     train: list[RankedGroup], val: list[RankedGroup], summary: dict[str, Any]) -> torch.Tensor:
    """Fit ``term``'s weights and return the combined scores (rows of ``reward``/``features``
    follow ``every``'s examples).

    The weights are fitted on the held-out pairs: on its own training pairs the reward model is
    overconfident (it has fitted them), so a fit there trusts it over the features it never saw.
    ``summary["eval"]`` gets the held-out pairwise accuracy of the reward model alone and of the
    combination, the latter cross-fitted (each half of the held-out prompts scored with weights
    fitted on the other half). Without held-out prompts the training pairs are used."""
    start, offset = {}, 0
    for g in every:
        start[id(g)] = offset
        offset += len(g.examples)

    def pairs(groups: list[RankedGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [(start[id(g)] + b, start[id(g)] + w) for g in groups for b, w in g.pairs]
        t = torch.tensor(idx, dtype=torch.long).reshape(-1, 2)
        return t[:, 0], t[:, 1]

    if len(val) >= 2:
        halves = (val[::2], val[1::2])
        right = total = 0
        for fit_on, test_on in (halves, halves[::-1]):
            term.weights = fit_weights(reward, features, *pairs(fit_on))
            combined, (b, w) = term.combine(reward, features), pairs(test_on)
            right, total = right + int((combined[b] > combined[w]).sum()), total + len(b)
        b, w = pairs(val)
        summary.setdefault("eval", {}).update(val_accuracy_reward_model=float((reward[b] > reward[w]).float().mean()),
                                              val_accuracy=right / max(total, 1))
    term.weights = fit_weights(reward, features, *pairs(val if len(val) >= 2 else train))
    summary["likelihood_weights"] = dict(zip(WEIGHT_NAMES, term.weights))
    return term.combine(reward, features)


def read_scoring_file(path: str) -> list[dict]:
    """The ``{"prompt", "response", "finished"?}`` lines of a file to score, read strictly (a bad
    line is an error naming it: scores must line up with the file)."""
    def parse(obj: dict) -> dict:
        parse_prompt(obj.get("prompt"))
        if not isinstance(obj.get("response"), str):
            raise BadRecord("expected a string 'response'")
        if not isinstance(obj.get("finished", True), bool):
            raise BadRecord("'finished' must be true or false")
        return obj
    return [obj for _, obj in read_records(path, parse, strict=True)]
