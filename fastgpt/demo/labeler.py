"""A simulated human labeler for the demo world.

RLHF needs people to rank model responses; the CPU demo has none, so this
module stands in for them. It writes rankings in the same JSONL format as the
human ranking tool, so the reward model cannot tell the difference, and it also
judges held-out generations for the demo report and, as PPO's gold judge
(:meth:`SimulatedLabeler.judge`), PPO's answers to its dev prompts. PPO never
trains on it: its rollouts see only the reward model trained on the rankings.

What "good" means, in order of weight (`SimulatedLabeler.quality`):

1. Correct (+3.0). Every sentence that states a result (the text after its
   last "is", "says" or "has"; for a bare reply with no such verb, the last
   sentence) must state the right one, e.g. "12" for "What is the number after 11?".
   One wrong claim makes the whole response wrong. Prompts outside the world
   cannot be judged and never count as correct.
2. Ends its turn (-2.0 if not). A response that runs until the token limit
   without emitting end-of-turn is penalised hard, whatever it says.
3. On-format (+1.0 if it is exactly the canonical sentence, e.g.
   "The number after 11 is 12."; +0.5 if it contains it among other text).
4. Concise (up to -0.5 for characters beyond the canonical answer's length,
   saturating at 100 extra; -0.25 per filler phrase such as "Sure!" or
   "I hope this helps!", at most -0.75).
5. No repetition (-0.75 if a sentence is repeated or most word trigrams recur).
6. No chat-role leakage (-1.0 for "User:", "Assistant:", "<|...|>" and the
   like) and not empty (-1.0).

Correct answers always outrank wrong ones among finished responses, so the
style terms only order responses of equal correctness. Some SFT
demonstrations are verbose, terse or repetitive, and some wrong (in four
families, most of them), so this ordering is something the SFT model does not
already follow.

Rankings add noise: people disagree. The default noise (0.15) is calibrated
so that two independent simulated labelers agree on about 76% of ordered
pairs -- InstructGPT's labelers agreed with each other on 73-77% -- and each
agrees with the noiseless order on about 84% (see `SimulatedLabeler.rank`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Union

from fastgpt.demo.world import CLAIM_VERBS, FILLER_PHRASES, parse_prompt

Ranking = list[Union[int, list[int]]]

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_CLAIM = re.compile(r"\b(?:" + "|".join(CLAIM_VERBS) + r")\b\s+", re.IGNORECASE)
_ROLE_LEAK = re.compile(r"(?i)\b(?:user|assistant|system|human)\s*:|<\|[^|>]*\|?>?")
_FILLERS = [re.compile(r"(?i)\b" + re.escape(p) + r"\b") for p in FILLER_PHRASES]
_TIE_EPS = 1e-9


def _sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_SPLIT.split(text.strip())) if s]


def _claims(text: str) -> list[str]:
    sentences = _sentences(text)
    claims = []
    for s in sentences:
        matches = list(_CLAIM.finditer(s))
        if matches:
            claims.append(s[matches[-1].end():])
    if not claims and sentences:
        # Terse replies ("12") state the result with no verb at all.
        claims = [sentences[-1]]
    return claims


def _norm_sentence(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".")


def is_repetitive(text: str) -> bool:
    """A sentence said twice, or word trigrams that mostly recur."""
    sentences = [_norm_sentence(s).lower() for s in _sentences(text)]
    if len(sentences) != len(set(sentences)):
        return True
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) >= 6 and len(set(grams)) / len(grams) < 0.6


def filler_count(text: str) -> int:
    return sum(1 for f in _FILLERS if f.search(text))


def has_role_leak(text: str) -> bool:
    return bool(_ROLE_LEAK.search(text))


class SimulatedLabeler:
    """Deterministic quality judge plus a noisy, seeded ranker."""

    def __init__(self, seed: int = 0, noise: float = 0.15) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError("noise must be in [0, 1]")
        self.noise = noise
        self._rng = random.Random(seed)

    # -- judging ------------------------------------------------------------
    def is_correct(self, prompt: str, response: str) -> bool:
        parsed = parse_prompt(prompt)
        if parsed is None:
            return False
        fam, args = parsed
        claims = _claims(response)
        if not claims:
            return False
        want = fam.normalize_value(fam.result(args))  # type: ignore[arg-type]
        return all(fam.normalize_value(c) == want for c in claims)

    def is_on_format(self, response: str, finished: bool) -> bool:
        """Answered as an assistant turn: non-empty, ended, no role leakage.

        A base model never learned the end-of-turn token, so it runs to the
        token limit and fails; an SFT model should pass almost always.
        """
        return finished and bool(response.strip()) and not has_role_leak(response)

    def quality(self, prompt: str, response: str, finished: bool) -> float:
        """Noiseless score of one response; see the module docstring."""
        q = 0.0
        if self.is_correct(prompt, response):
            q += 3.0
        if not finished:
            q -= 2.0
        text = response.strip()
        if not text:
            return q - 1.0
        parsed = parse_prompt(prompt)
        if parsed is not None:
            fam, args = parsed
            canon = fam.canonical(args, fam.result(args))  # type: ignore[arg-type]
            if _norm_sentence(text) == _norm_sentence(canon):
                q += 1.0
            elif _norm_sentence(canon) in _norm_sentence(text):
                q += 0.5
            target_len = len(canon)
        else:
            target_len = 40
        q -= 0.5 * min(1.0, max(0, len(text) - target_len) / 100)
        q -= min(0.75, 0.25 * filler_count(text))
        if is_repetitive(text):
            q -= 0.75
        if has_role_leak(text):
            q -= 1.0
        return q

    # -- ranking ------------------------------------------------------------
    def rank(self, prompt: str, responses: list[str], finished: list[bool]) -> Ranking:
        """Best-first ranking; tied indices grouped in a sorted sub-list.

        Noise: the number of adjacent swaps is Binomial(G*(G-1)/2, noise) for
        G tie groups, each at a uniformly chosen boundary. One swap flips one
        pair of groups and swaps never undo each other, so about a `noise`
        share of the ordered pairs come back flipped whatever the number of
        responses.
        """
        if len(responses) != len(finished):
            raise ValueError("responses and finished differ in length")
        scores = [self.quality(prompt, r, f) for r, f in zip(responses, finished)]
        order = sorted(range(len(responses)), key=lambda i: (-scores[i], i))
        groups: list[list[int]] = []
        for i in order:
            if groups and abs(scores[groups[-1][0]] - scores[i]) <= _TIE_EPS:
                groups[-1].append(i)
            else:
                groups.append([i])
        g = len(groups)
        if g > 1 and self.noise > 0:
            n_swaps = sum(self._rng.random() < self.noise for _ in range(g * (g - 1) // 2))
            rank_of = {id(grp): r for r, grp in enumerate(groups)}
            for _ in range(n_swaps):
                # Only swap pairs still in their true order, so no swap undoes
                # an earlier one and the flipped share does not shrink with G.
                in_order = [k for k in range(g - 1) if rank_of[id(groups[k])] < rank_of[id(groups[k + 1])]]
                if not in_order:
                    break
                k = self._rng.choice(in_order)
                groups[k], groups[k + 1] = groups[k + 1], groups[k]
        return [grp[0] if len(grp) == 1 else sorted(grp) for grp in groups]

    # -- evaluation ---------------------------------------------------------
    def evaluate(self, items: list[dict], responses: list[str], finished: list[bool]) -> dict:
        """Held-out metrics for one model's generations on `items`.

        Returns accuracy, labeler_score (mean quality), format_compliance,
        mean_length (characters), n, and per_task accuracy.
        """
        if not (len(items) == len(responses) == len(finished)):
            raise ValueError("items, responses and finished differ in length")
        n = len(items)
        if n == 0:
            return {"accuracy": 0.0, "labeler_score": 0.0, "format_compliance": 0.0,
                    "mean_length": 0.0, "n": 0, "per_task": {}}
        correct = [self.is_correct(it["prompt"], r) for it, r in zip(items, responses)]
        per_task: dict[str, list[bool]] = {}
        for it, c in zip(items, correct):
            per_task.setdefault(it.get("task", "?"), []).append(c)
        return {
            "accuracy": sum(correct) / n,
            "labeler_score": sum(self.quality(it["prompt"], r, f) for it, r, f in zip(items, responses, finished)) / n,
            "format_compliance": sum(self.is_on_format(r, f) for r, f in zip(responses, finished)) / n,
            "mean_length": sum(len(r) for r in responses) / n,
            "n": n,
            "per_task": {t: sum(v) / len(v) for t, v in sorted(per_task.items())},
        }

    def judge(self, prompts: list, responses: list[str], finished: list[bool]) -> dict[str, list[float]]:
        """The gold judge PPO's held-out evaluations call (fastgpt.stages.policy_eval): per
        response, the noiseless quality (``score``), correctness and format compliance."""
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]  # messages: the last turn
        return {
            "score": [self.quality(p, r, f) for p, r, f in zip(texts, responses, finished)],
            "accuracy": [float(self.is_correct(p, r)) for p, r in zip(texts, responses)],
            "format": [float(self.is_on_format(r, f)) for r, f in zip(responses, finished)],
        }

    def win_rate(
        self,
        prompts: list[str],
        responses_a: list[str],
        finished_a: list[bool],
        responses_b: list[str],
        finished_b: list[bool],
    ) -> dict:
        """How often A beats B by noiseless quality; ties are reported apart."""
        if not (len(prompts) == len(responses_a) == len(finished_a) == len(responses_b) == len(finished_b)):
            raise ValueError("inputs differ in length")
        wins = losses = ties = 0
        for p, ra, fa, rb, fb in zip(prompts, responses_a, finished_a, responses_b, finished_b):
            d = self.quality(p, ra, fa) - self.quality(p, rb, fb)
            if d > _TIE_EPS:
                wins += 1
            elif d < -_TIE_EPS:
                losses += 1
            else:
                ties += 1
        decided = wins + losses
        return {"wins": wins, "losses": losses, "ties": ties,
                "win_rate": wins / decided if decided else 0.5}


def flatten_ranking(ranking: Ranking) -> list[int]:
    """Response indices best-first, ties expanded in place."""
    out: list[int] = []
    for item in ranking:
        out.extend(item if isinstance(item, list) else [item])
    return out


def rank_file(comparisons_path: str | Path, rankings_path: str | Path, labeler: SimulatedLabeler) -> int:
    """Rank every comparison in a JSONL file and append the rankings.

    Input lines: {"prompt", "responses", "finished"} ("finished" defaults to
    all true). Output lines add "ranking", as the human ranking tool writes.
    Returns the number of lines appended.
    """
    src, dst = Path(comparisons_path), Path(rankings_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with src.open(encoding="utf-8") as fin, dst.open("a", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            row = json.loads(line)
            responses = list(row["responses"])
            finished = [bool(f) for f in row.get("finished", [True] * len(responses))]
            ranking = labeler.rank(row["prompt"], responses, finished)
            out = {"prompt": row["prompt"], "responses": responses, "finished": finished, "ranking": ranking}
            fout.write(json.dumps(out, ensure_ascii=False) + "\n")
            count += 1
    return count
