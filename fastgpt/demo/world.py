"""A tiny, self-generated world of instruction tasks for the CPU demo.

The demo has to run pre-training, SFT, reward modelling and PPO on a 2-core CPU
in minutes, with a byte-level model of under a million parameters and a
256-byte context, and still show held-out evidence that every stage did
something. No downloaded data set is small and regular enough for that, so this
module makes one: eight task families whose answers are small lookups a model
this size learns in a few minutes of pre-training (the number or letter after
or before another, whether a number is odd or even) or reads off the question
(a word's first or last letter, its length). Every answer is recomputable from
the prompt alone and restates the prompt's subject before its result, so the
model copies the subject and looks one fact up.

Every stage gets its own view of the same world:

* pre-training reads plain text: mostly questions followed by their answers, the
  rest bare facts ("The number after 4 is 5."), so the facts are in the weights
  before any chat formatting is taught;
* SFT reads demonstrations of uneven quality: most in the labeler's preferred
  short style, the rest verbose, terse or repetitive, and some wrong. The wrong
  ones are not noise but each family's characteristic slip (the number before
  where the one after was asked, the last letter for the first, odd for even),
  the kind of systematic mistake people writing demonstrations make and people
  comparing answers catch. In four families the demonstrators slip more often
  than not (`Family.slip_rate`), so the SFT model's likeliest answer there is
  the slip although the base model knew better and the right answer is still
  among its samples: what the labeler's rankings, the reward model and PPO have
  to correct. In the other four a tenth of the demonstrations slip;
* the comparison, PPO, dev and evaluation stages get prompt sets that share no
  prompt string with each other or with SFT, so every reported number is on
  prompts the model was never trained to answer. The world has fewer prompts
  than the demo has demonstrations, so SFT demonstrates some of its own
  prompts more than once (in other styles, sometimes with the slip).

Families live in a registry (`FAMILIES`); adding one is writing a `Family`
subclass and appending an instance.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

Args = dict[str, str]

# The labeler reads a result out of the sentence after one of these verbs, so
# every canonical answer states its result after one of them, and no filler
# phrase below may contain them.
CLAIM_VERBS = ("is", "says", "has")

# Demonstration styles and their share of a family's correct demonstrations (the
# labeler's preferred canonical style is the largest). A family's wrong ones
# (`Family.slip_rate` of them, style "wrong") state its slip in one of the first
# three styles.
STYLE_MIX: dict[str, float] = {
    "canonical": 0.85,
    "verbose": 0.07,
    "terse": 0.05,
    "repetitive": 0.03,
}

# The slip rate of the families whose demonstrators slip more often than not.
SLIP_OFTEN = 0.55

PREAMBLES = (
    "Sure! Let me think.",
    "Sure! Happy to help.",
    "Sure thing! Let me work it out.",
    "Sure! Good question.",
)
CLOSERS = (
    "I hope this helps!",
    "Let me know if you need more help.",
    "Happy to help!",
    "",
)

# Only the labeler's filler penalty needs to recognise these; kept here so the
# generator and the judge cannot drift apart.
FILLER_PHRASES = (
    "sure",
    "let me think",
    "let me work it out",
    "happy to help",
    "good question",
    "great question",
    "hope this helps",
    "let me know",
    "of course",
    "certainly",
    "okay",
    "here you go",
)

def _template_regex(template: str, fields: dict[str, str]) -> re.Pattern[str]:
    # Parsing is derived from the same templates that generate prompts, so
    # answer_for can never disagree with the generator about what a prompt means.
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>{fields[part]})" if i % 2 else re.escape(part))
    return re.compile("".join(out))


def _strip_value(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.strip(" .!?,;:\"'")


class Family:
    """One task family: prompt templates, answer rule, corpus and demo text.

    Every canonical answer restates the prompt's subject before its result ("The number after
    4 is 5." for "What number comes after 4?"): a model this small learns to copy what it has
    just read long before it learns to find a value anywhere in a question and work with it.
    """

    name: str = ""
    templates: tuple[str, ...] = ()
    fields: dict[str, str] = {}
    case_sensitive: bool = False
    # Share of this family's demonstrations that state its slip. Where demonstrators slip more
    # often than not, the SFT model's likeliest answer is the slip; the right one is still among
    # its samples, and the labeler's comparisons catch the difference.
    slip_rate: float = 0.1

    def __init__(self) -> None:
        self._patterns = [_template_regex(t, self.fields) for t in self.templates]

    # -- to implement -------------------------------------------------------
    def all_args(self) -> Iterable[Args]:
        """Every argument set this family generates (the prompt space)."""
        raise NotImplementedError

    def result(self, args: Args) -> str | None:
        """The bare answer, or None when the arguments are outside the world."""
        raise NotImplementedError

    def canonical(self, args: Args, result: str) -> str:
        """The one-sentence answer the labeler prefers, stating `result` after a claim verb."""
        raise NotImplementedError

    def slip(self, args: Args) -> str:
        """The family's characteristic mistake (first letter for last, the number before for the one after,
        ...): what a demonstrator writes in a wrong demonstration. Never the right result."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------
    def sample_args(self, rng: random.Random) -> Args:
        return rng.choice(self._arg_list())

    def _arg_list(self) -> list[Args]:
        cached = getattr(self, "_args_cache", None)
        if cached is None:
            cached = list(self.all_args())
            self._args_cache = cached
        return cached

    def all_prompts(self) -> list[str]:
        return [t.format(**a) for a in self._arg_list() for t in self.templates]

    def sample_prompt(self, rng: random.Random) -> str:
        return rng.choice(self.templates).format(**self.sample_args(rng))

    def parse(self, prompt: str) -> Args | None:
        prompt = prompt.strip()
        for pattern in self._patterns:
            m = pattern.fullmatch(prompt)
            if m and self.result(m.groupdict()) is not None:
                return m.groupdict()
        return None

    def answer(self, prompt: str) -> str | None:
        args = self.parse(prompt)
        if args is None:
            return None
        return self.canonical(args, self.result(args))  # type: ignore[arg-type]

    def statement(self, rng: random.Random) -> str:
        args = self.sample_args(rng)
        return self.canonical(args, self.result(args))  # type: ignore[arg-type]

    def normalize_value(self, text: str) -> str:
        """Canonical form of a claimed result, for comparing with `result`."""
        text = _strip_value(text)
        return text if self.case_sensitive else text.lower()

    def demonstration(self, prompt: str, style: str, rng: random.Random) -> str:
        """An assistant reply to `prompt` written in `style` (see STYLE_MIX)."""
        args = self.parse(prompt)
        if args is None:
            raise ValueError(f"{self.name}: not a prompt of this family: {prompt!r}")
        result = self.result(args)
        assert result is not None
        if style == "wrong":
            # Wrong demos look like any other demo; only the value is the family's usual slip.
            style = rng.choice(("canonical", "verbose", "terse"))
            result = self.slip(args)
        sentence = self.canonical(args, result)
        if style == "canonical":
            return sentence
        if style == "terse":
            return result
        if style == "verbose":
            return " ".join(p for p in (rng.choice(PREAMBLES), sentence, rng.choice(CLOSERS)) if p)
        if style == "repetitive":
            reps = [sentence] * rng.randint(2, 3)
            return " ".join([rng.choice(PREAMBLES), *reps])
        raise ValueError(f"unknown style {style!r}")


WORDS = (
    "cat dog sun map pen cup hat box pig bus egg jam fox owl bee ant key bed car "
    "toy sea ice web fish bird tree star moon cake book door lamp milk rain ship "
    "frog bell ring sand wind leaf rock salt corn road apple bread chair plant "
    "horse river stone cloud light table water house smile train "
    "pot net bag arm leg ear eye gum hen cow kid mud nut pin rug van "
    "coat drum goat kite lion nest rose sock wall wolf "
    "beach candy clock dress grape lemon mouse paper queen sheep snake tiger"
).split()


class WordFamily(Family):
    fields = {"w": r"[a-z]{2,8}"}

    def all_args(self) -> Iterable[Args]:
        for w in WORDS:
            yield {"w": w}


def _other_letter(word: str, avoid: str, prefer: str) -> str:
    """``prefer`` unless it equals ``avoid``; then the first other letter of the word."""
    return prefer if prefer != avoid else next((c for c in word if c != avoid), "x")


class FirstLetter(WordFamily):
    name = "first_letter"
    slip_rate = SLIP_OFTEN
    templates = ("What is the first letter of {w}?", "Tell me the first letter of {w}.",
                 "Name the first letter of {w}.")

    def result(self, args: Args) -> str | None:
        return args["w"][0]

    def canonical(self, args: Args, result: str) -> str:
        return f"The first letter of {args['w']} is {result}."

    def slip(self, args: Args) -> str:
        return _other_letter(args["w"], args["w"][0], args["w"][-1])  # the last letter


class LastLetter(WordFamily):
    name = "last_letter"
    templates = ("What is the last letter of {w}?", "Tell me the last letter of {w}.",
                 "Name the last letter of {w}.")

    def result(self, args: Args) -> str | None:
        return args["w"][-1]

    def canonical(self, args: Args, result: str) -> str:
        return f"The last letter of {args['w']} is {result}."

    def slip(self, args: Args) -> str:
        return _other_letter(args["w"], args["w"][-1], args["w"][0])  # the first letter


class Length(WordFamily):
    name = "length"
    templates = ("How many letters has the word {w}?", "Count the letters the word {w} has.",
                 "Tell me how many letters the word {w} has.")

    def result(self, args: Args) -> str | None:
        return str(len(args["w"]))

    def canonical(self, args: Args, result: str) -> str:
        return f"The word {args['w']} has {result} letters."

    def normalize_value(self, text: str) -> str:
        # "has 3 letters" states the result with its unit; the unit is not the claim.
        return re.sub(r"\s+letters?$", "", super().normalize_value(text))

    def slip(self, args: Args) -> str:
        return str(len(args["w"]) + 1)  # the full stop counted as a letter


LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Neighbour(Family):
    """The next or previous item of a sequence (digits or the alphabet): a lookup the model
    learns from pre-training; the slip is the neighbour on the other side."""

    step = 1
    kind = "number"
    items: tuple[str, ...] = ()

    def all_args(self) -> Iterable[Args]:
        for x in self.items:
            if self.result({"x": x}) is not None and self.slip({"x": x}) is not None:
                yield {"x": x}

    def _at(self, x: str, delta: int) -> str | None:
        raise NotImplementedError

    def result(self, args: Args) -> str | None:
        return self._at(args["x"], self.step)

    def slip(self, args: Args) -> str:
        return self._at(args["x"], -self.step)  # type: ignore[return-value]

    def canonical(self, args: Args, result: str) -> str:
        side = "after" if self.step > 0 else "before"
        return f"The {self.kind} {side} {args['x']} is {result}."


class NumberNeighbour(Neighbour):
    # Up to 20: a table the model learns in pre-training like the alphabet's. Over 0-99 it copied
    # the number instead ("The number after 54 is 54.") after the demo's pre-training budget.
    fields = {"x": r"\d{1,2}"}
    items = tuple(str(n) for n in range(21))

    def _at(self, x: str, delta: int) -> str | None:
        n = int(x) + delta
        return str(n) if 0 <= n <= 20 else None


class LetterNeighbour(Neighbour):
    kind = "letter"
    fields = {"x": r"[a-z]"}
    items = tuple(LETTERS)
    case_sensitive = True

    def _at(self, x: str, delta: int) -> str | None:
        i = LETTERS.index(x) + delta
        return LETTERS[i] if 0 <= i < len(LETTERS) else None


def _asking(phrase: str) -> tuple[str, ...]:
    """Prompt templates that ask for `phrase` in so many words: the answer restates it verbatim."""
    return (f"What is {phrase}?", f"Tell me {phrase}.", f"Name {phrase}.", f"Say {phrase}.",
            f"Which is {phrase}?", f"Give me {phrase}.", f"Write {phrase}.", f"I need {phrase}.")


class NextNumber(NumberNeighbour):
    name = "next_number"
    templates = _asking("the number after {x}")


class PreviousNumber(NumberNeighbour):
    name = "previous_number"
    step = -1
    slip_rate = SLIP_OFTEN
    templates = _asking("the number before {x}")


class NextLetter(LetterNeighbour):
    name = "next_letter"
    slip_rate = SLIP_OFTEN
    templates = _asking("the letter after {x}")


class PreviousLetter(LetterNeighbour):
    name = "previous_letter"
    step = -1
    templates = _asking("the letter before {x}")


class Parity(Family):
    name = "parity"
    slip_rate = SLIP_OFTEN
    fields = {"x": r"\d{1,2}"}
    templates = ("Is the number {x} odd or even?", "Tell me if the number {x} is odd or even.",
                 "Say whether the number {x} is odd or even.")

    def all_args(self) -> Iterable[Args]:
        for n in range(100):
            yield {"x": str(n)}

    def result(self, args: Args) -> str | None:
        return "even" if int(args["x"]) % 2 == 0 else "odd"

    def slip(self, args: Args) -> str:
        return "odd" if self.result(args) == "even" else "even"

    def canonical(self, args: Args, result: str) -> str:
        return f"The number {args['x']} is {result}."

FAMILIES: list[Family] = [
    NextNumber(), PreviousNumber(), NextLetter(), PreviousLetter(), Parity(), FirstLetter(), LastLetter(),
    Length(),
]
FAMILY_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def parse_prompt(prompt: str) -> tuple[Family, Args] | None:
    """The family and arguments of a world prompt, or None if it is not one."""
    for fam in FAMILIES:
        args = fam.parse(prompt)
        if args is not None:
            return fam, args
    return None


def task_for(prompt: str) -> str | None:
    """Name of the family a prompt belongs to."""
    parsed = parse_prompt(prompt)
    return parsed[0].name if parsed else None


def result_for(prompt: str) -> str | None:
    """The bare correct result of a prompt ("12", "tac"), or None."""
    parsed = parse_prompt(prompt)
    return parsed[0].result(parsed[1]) if parsed else None


def answer_for(prompt: str) -> str | None:
    """The canonical one-sentence correct answer of any world prompt, or None."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        return None
    fam, args = parsed
    return fam.canonical(args, fam.result(args))  # type: ignore[arg-type]


def pretrain_texts(n: int, seed: int = 0, exclude_prompts: Iterable[str] = (), qa_fraction: float = 0.2) -> list[str]:
    """`n` plain-text documents of 1-4 statements about the world.

    A `qa_fraction` of the sentences are written FAQ-style ("Is the number 7 odd
    or even? The number 7 is odd.") so the base model sees question wordings next to their
    answers, as web text would show it; prompts in `exclude_prompts` (the
    held-out evaluation set) never appear that way.
    """
    rng = random.Random(seed)
    excluded = set(exclude_prompts)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 4)):
            fam = rng.choice(FAMILIES)
            if rng.random() < qa_fraction:
                prompt = fam.sample_prompt(rng)
                if prompt not in excluded:
                    parts.append(f"{prompt} {fam.answer(prompt)}")
                    continue
            parts.append(fam.statement(rng))
        docs.append(" ".join(parts))
    return docs


def _style_list(n: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    # Exact counts (largest remainder) rather than independent draws, so small
    # SFT sets still carry every style in the intended proportion.
    total = sum(mix.values())
    raw = {s: n * w / total for s, w in mix.items()}
    counts = {s: math.floor(v) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: raw[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[s] += 1
    styles = [s for s, c in counts.items() for _ in range(c)]
    rng.shuffle(styles)
    return styles


def _allocate(sizes: list[int], caps: list[float], rng: random.Random) -> list[list[str]]:
    """Split the prompt space into disjoint sets of the given sizes.

    Each set takes prompts round-robin over families, so every set covers every
    family; `caps` bounds the share of a family's prompt space one set may take,
    so that small fact tables are not used up by the first sets (an SFT set
    without alphabet questions would never teach that wording).
    """
    pools = {}
    for fam in FAMILIES:
        prompts = fam.all_prompts()
        rng.shuffle(prompts)
        pools[fam.name] = prompts
    capacity = {name: len(p) for name, p in pools.items()}
    if sum(sizes) > sum(capacity.values()):
        raise ValueError(f"asked for {sum(sizes)} prompts; the world has {sum(capacity.values())}")
    out = []
    for n, cap in zip(sizes, caps):
        limit = {name: max(1, int(cap * capacity[name])) for name in pools}
        taken = dict.fromkeys(pools, 0)
        chosen: list[str] = []
        order = sorted(pools)
        rng.shuffle(order)
        relaxed = False
        while len(chosen) < n:
            progressed = False
            for name in order:
                if len(chosen) >= n:
                    break
                if taken[name] < limit[name] and pools[name]:
                    chosen.append(pools[name].pop())
                    taken[name] += 1
                    progressed = True
            if not progressed:
                if relaxed:
                    raise ValueError("prompt space exhausted")
                limit = dict.fromkeys(pools, math.inf)  # type: ignore[arg-type]
                relaxed = True
        rng.shuffle(chosen)
        out.append(chosen)
    return out


def _styles(prompts: list[str], mix: dict[str, float], rng: random.Random) -> list[str]:
    """The style of each prompt's demonstration: per family, its `slip_rate` wrong and the rest
    split by `mix`, in exact counts."""
    by_family: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_family.setdefault(parse_prompt(p)[0].name, []).append(i)  # type: ignore[index]
    styles = [""] * len(prompts)
    for name, idx in by_family.items():
        n_wrong = round(FAMILY_BY_NAME[name].slip_rate * len(idx))
        chosen = ["wrong"] * n_wrong + _style_list(len(idx) - n_wrong, mix, rng)
        rng.shuffle(chosen)
        for i, style in zip(idx, chosen):
            styles[i] = style
    return styles


@dataclass
class WorldData:
    """Everything the demo pipeline reads, before it is written to disk."""

    pretrain: list[str]
    sft: list[dict]
    compare_prompts: list[str]
    ppo_prompts: list[str]
    eval_items: list[dict]
    dev_prompts: list[str] = field(default_factory=list)  # PPO's own held-out checks (picks best.pt)
    seed: int = 0
    style_mix: dict[str, float] = field(default_factory=lambda: dict(STYLE_MIX))


def make_world(
    seed: int = 0,
    n_pretrain: int = 20000,
    n_sft: int = 2000,
    n_compare: int = 600,
    n_ppo: int = 400,
    n_eval: int = 260,
    n_dev: int = 64,
    style_mix: dict[str, float] | None = None,
) -> WorldData:
    """Generate the whole world deterministically from `seed`.

    SFT records are `{"messages": [...], "task": ..., "style": ...}`; the
    extra keys are bookkeeping for analysis and can be ignored by trainers.
    """
    rng = random.Random(seed)
    mix = dict(style_mix or STYLE_MIX)
    # Evaluation is allocated first and gets the largest per-family share so its per-family
    # numbers stay balanced; the comparison set may take up to 45% of a family; SFT keeps whatever
    # is left. The dev set is PPO's own held-out set: choosing best.pt on it leaves the evaluation
    # prompts untouched by any choice.
    rest = sum(len(f.all_prompts()) for f in FAMILIES) - (n_eval + n_dev + n_ppo + n_compare)
    eval_prompts, dev, ppo, compare, sft_pool = _allocate(
        [n_eval, n_dev, n_ppo, n_compare, rest], [0.25, 0.1, 0.2, 0.45, 1.0], rng)
    # The world has fewer prompts than demonstrations: families take turns, and each family's
    # remaining prompts are demonstrated in turn (by different demonstrators: other styles,
    # sometimes the slip), so every family gets the same share of the demonstrations.
    by_family: dict[str, list[str]] = {}
    for p in sft_pool:
        by_family.setdefault(parse_prompt(p)[0].name, []).append(p)  # type: ignore[index]
    pools = [by_family[name] for name in sorted(by_family)]
    sft_prompts = []
    for i in range(n_sft):
        pool = pools[i % len(pools)]
        sft_prompts.append(pool[(i // len(pools)) % len(pool)])
    rng.shuffle(sft_prompts)
    eval_items = []
    for p in eval_prompts:
        fam, args = parse_prompt(p)  # type: ignore[misc]
        result = fam.result(args)
        eval_items.append({"prompt": p, "task": fam.name, "answer": fam.canonical(args, result), "result": result})
    sft = []
    for p, style in zip(sft_prompts, _styles(sft_prompts, mix, rng)):
        fam, _ = parse_prompt(p)  # type: ignore[misc]
        reply = fam.demonstration(p, style, rng)
        sft.append({
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": reply}],
            "task": fam.name,
            "style": style,
        })
    pretrain = pretrain_texts(n_pretrain, seed=rng.randrange(2**32), exclude_prompts=eval_prompts)
    return WorldData(pretrain, sft, compare, ppo, eval_items, dev, seed=seed, style_mix=mix)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_world(data: WorldData, out_dir: str | Path) -> dict[str, Path]:
    """Write the world as JSONL files; returns {name: path}.

    pretrain.jsonl: {"text"}; sft.jsonl: {"messages", "task", "style"};
    compare_prompts.jsonl, ppo_prompts.jsonl and dev_prompts.jsonl: {"prompt"};
    eval.jsonl: {"prompt", "task", "answer", "result"}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "pretrain": out / "pretrain.jsonl",
        "sft": out / "sft.jsonl",
        "compare_prompts": out / "compare_prompts.jsonl",
        "ppo_prompts": out / "ppo_prompts.jsonl",
        "eval": out / "eval.jsonl",
        "dev_prompts": out / "dev_prompts.jsonl",
    }
    _write_jsonl(paths["pretrain"], ({"text": t} for t in data.pretrain))
    _write_jsonl(paths["sft"], data.sft)
    _write_jsonl(paths["compare_prompts"], ({"prompt": p} for p in data.compare_prompts))
    _write_jsonl(paths["ppo_prompts"], ({"prompt": p} for p in data.ppo_prompts))
    _write_jsonl(paths["eval"], data.eval_items)
    _write_jsonl(paths["dev_prompts"], ({"prompt": p} for p in data.dev_prompts))
    return paths
