"""Readers for the chat-shaped JSONL files of SFT, comparisons, ranking and the reward model.

Formats (one JSON object per line; a "prompt" is a string or a ``messages`` list):

* conversations (SFT): ``{"messages": [{"role", "content"}, ...]}`` or
  ``{"prompt": str, "response": str, "system"?: str}``;
* prompts (``fastgpt compare``): ``{"prompt": str}`` or ``{"messages": [...]}``;
* comparisons (``fastgpt rank``): ``{"prompt", "responses": [str], "finished"?: [bool]}``;
* preferences (reward model): rankings ``{"prompt", "responses", "finished"?, "ranking"}`` with
  ``ranking`` best-first, 0-based, ties as nested lists; or pairs ``{"prompt", "chosen",
  "rejected"}``, where chosen/rejected may also be whole conversations (the prompt is then
  everything before their last assistant message).

Training data is read *skip-and-count*: one bad record never stops a run, it is skipped,
counted and named (file:line) in one summary printed when loading ends; only when more than
``max_bad_fraction`` of the records are bad does loading fail, with a one-line error.
Files a person edits by hand for a tool (comparisons for ``fastgpt rank``) are read strictly.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .console import plural
from .data import DataError, PackedBatch, first_fit, pack_rows
from .tokenizer import Message, TokenizerError, validate_messages

T = TypeVar("T")
MAX_RESPONSES = 9  # K in 2..9: a person ranks with single digits; InstructGPT used 4..9


class BadRecord(Exception):
    """One record that cannot be used; the reader adds file:line and counts it."""


def _fail(msg: str) -> None:
    raise BadRecord(msg)


# ----------------------------------------------------------------------- bookkeeping
@dataclass
class LoadReport:
    """What happened while reading a file: records kept, skipped (with reasons), truncated."""

    path: str
    total: int = 0
    kept: int = 0
    bad: list[str] = field(default_factory=list)  # "file:line: reason", in file order
    truncated: int = 0
    ignored: int = 0  # valid records that carry nothing to learn (an all-tied ranking)

    def summary(self, context: int | None = None) -> str:
        parts = []
        if self.bad:
            parts.append(f"skipped {len(self.bad)} of {self.total} bad records (first: {self.bad[0]})")
        if self.ignored:
            parts.append(f"ignored {plural(self.ignored, 'all-tied ranking')} (no preference)")
        if self.truncated:
            parts.append(f"truncated {plural(self.truncated, 'record')} longer than the context"
                         + (f" ({context} tokens)" if context else ""))
        return f"{self.path}: " + "; ".join(parts) if parts else ""

    def finish(self, stage: str, max_bad_fraction: float, what: str = "records", context: int | None = None) -> None:
        """End of loading: fail with one line when too many records were bad or none is usable;
        otherwise print the one summary line of skipped / truncated records (stderr), if any.
        A failure is reported once, by the error alone."""
        if self.total and len(self.bad) / self.total > max_bad_fraction:
            raise DataError(f"{self.path}: {len(self.bad)} of {self.total} {what} are bad, more than "
                            f"max_bad_fraction={max_bad_fraction} (first: {self.bad[0]})")
        if self.kept - self.ignored <= 0:
            reason = (f" (first problem: {self.bad[0]})" if self.bad else
                      f" ({self.ignored} all-tied, holding no preference)" if self.ignored else "")
            raise DataError(f"{self.path}: no usable {what}{reason}")
        text = self.summary(context)
        if text:
            print(f"{stage}: warning: {text}", file=sys.stderr)


def read_records(path: str | Path, parse: Callable[[Any], T], report: LoadReport | None = None,
                 strict: bool = False) -> Iterator[tuple[str, T]]:
    """(``file:line``, parse(obj)) for each usable line of a JSONL file.

    Malformed JSON and records ``parse`` rejects (by raising BadRecord, TokenizerError or
    DataError) are counted in ``report`` and skipped, or raised as a DataError when ``strict``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    report = report if report is not None else LoadReport(str(p))
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            report.total += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadRecord(f"malformed JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise BadRecord("expected a JSON object")
                value = parse(obj)
            except (BadRecord, TokenizerError, DataError) as e:
                if strict:
                    raise DataError(f"{where}: {e}") from None
                report.bad.append(f"{where}: {e}")
                continue
            report.kept += 1
            yield where, value


# --------------------------------------------------------------------------- prompts
def parse_prompt(value: Any, where: str = "prompt") -> list[Message]:
    """A prompt (string or messages list) as messages; the last message must not be the
    assistant's (the model answers next)."""
    if isinstance(value, str):
        if not value.strip():
            _fail(f"{where} is empty")
        return [{"role": "user", "content": value}]
    msgs = validate_messages(value, where)
    if msgs[-1]["role"] == "assistant":
        _fail(f"{where}: ends with an assistant message (expected the turn before the answer)")
    return list(msgs)


def parse_prompt_record(obj: dict) -> Any:
    """``{"prompt": str | messages}`` or ``{"messages": [...]}`` -> the prompt value as given
    (kept as-is so comparison files repeat it verbatim); validated by :func:`parse_prompt`."""
    value = obj.get("prompt", obj.get("messages"))
    if value is None:
        _fail("expected a 'prompt' string or a 'messages' list")
    if "system" in obj and isinstance(value, str):
        value = [{"role": "system", "content": obj["system"]}, {"role": "user", "content": value}]
    parse_prompt(value)
    return value


# --------------------------------------------------------------------- conversations
def parse_conversation(obj: dict) -> list[Message]:
    """A training conversation with at least one assistant turn."""
    if "messages" in obj:
        msgs = list(validate_messages(obj["messages"]))
    elif "prompt" in obj and "response" in obj:
        if not isinstance(obj["response"], str):
            _fail("'response' must be a string")
        msgs = parse_prompt(obj["prompt"])
        if isinstance(obj.get("system"), str) and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": obj["system"]}] + msgs
        msgs.append({"role": "assistant", "content": obj["response"]})
    else:
        _fail("expected 'messages' or 'prompt' + 'response'")
    if not any(m["role"] == "assistant" for m in msgs):
        _fail("conversation has no assistant turn (nothing to learn)")
    return msgs


# ----------------------------------------------------------------------- comparisons
@dataclass
class Comparison:
    """K responses to one prompt and, once ranked, their best-first ranking (0-based)."""

    prompt: Any                       # as in the file: str or messages
    responses: list[str]
    finished: list[bool]
    ranking: list[Any] | None = None  # ints and tie groups (sorted lists)

    @property
    def messages(self) -> list[Message]:
        return parse_prompt(self.prompt)

    def to_json(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "responses": self.responses, "finished": self.finished}
        if self.ranking is not None:
            out["ranking"] = self.ranking
        return out


def normalize_ranking(ranking: Any, k: int) -> list[Any]:
    """Check ``ranking`` orders each of 0..k-1 exactly once; ties become sorted lists."""
    if not isinstance(ranking, list) or not ranking:
        _fail("'ranking' must be a non-empty list")
    flat: list[int] = []
    out: list[Any] = []
    for g in ranking:
        members = g if isinstance(g, list) else [g]
        if not members or not all(isinstance(i, int) and not isinstance(i, bool) for i in members):
            _fail(f"'ranking' entries must be indices or lists of tied indices, got {g!r}")
        flat += members
        out.append(sorted(members) if len(members) > 1 else members[0])
    if sorted(flat) != list(range(k)):
        _fail(f"'ranking' {ranking} is not a permutation of the {k} responses (0..{k - 1})")
    return out


def parse_comparison(obj: dict, need_ranking: bool = False) -> Comparison:
    prompt = obj.get("prompt")
    if prompt is None:
        _fail("expected a 'prompt'")
    parse_prompt(prompt)
    responses = obj.get("responses")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        _fail("'responses' must be a list of strings")
    k = len(responses)
    if not 2 <= k <= MAX_RESPONSES:
        _fail(f"{k} responses: need between 2 and {MAX_RESPONSES} to compare")
    finished = obj.get("finished", [True] * k)
    if not isinstance(finished, list) or len(finished) != k or not all(isinstance(f, bool) for f in finished):
        _fail(f"'finished' must be a list of {k} booleans")
    ranking = obj.get("ranking")
    if ranking is None and need_ranking:
        _fail("expected a 'ranking' (or 'chosen' + 'rejected')")
    if ranking is not None:
        ranking = normalize_ranking(ranking, k)
    return Comparison(prompt, list(responses), list(finished), ranking)


def _split_conversation(value: Any, name: str) -> tuple[list[Message], str]:
    msgs = validate_messages(value, name)
    if msgs[-1]["role"] != "assistant":
        _fail(f"'{name}' must end with an assistant message")
    return list(msgs[:-1]), msgs[-1]["content"]


def parse_preference(obj: dict) -> Comparison:
    """A ranking record, or a chosen/rejected pair as a 2-way ranking ``[0, 1]``."""
    if "chosen" not in obj and "rejected" not in obj:
        return parse_comparison(obj, need_ranking=True)
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        (p1, chosen), (p2, rejected) = _split_conversation(chosen, "chosen"), _split_conversation(rejected, "rejected")
        if p1 != p2:
            _fail("'chosen' and 'rejected' conversations differ before their last assistant message")
        prompt: Any = obj.get("prompt", p1)
        if not p1 and "prompt" not in obj:
            _fail("'chosen' has no prompt before its assistant message")
    else:
        prompt = obj.get("prompt")
        if prompt is None:
            _fail("expected a 'prompt' with 'chosen' and 'rejected'")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        _fail("'chosen' and 'rejected' must be strings or messages lists")
    if chosen == rejected:
        _fail("'chosen' and 'rejected' are the same response")
    parse_prompt(prompt)
    return Comparison(prompt, [chosen, rejected], [True, True], [0, 1])


def read_comparisons(path: str | Path, strict: bool = True) -> list[Comparison]:
    """Comparisons for the ranking tool (rankings, if present, are kept and checked)."""
    return [c for _, c in read_records(path, parse_comparison, strict=strict)]


# --------------------------------------------------------------- order and packing
class EpochOrder:
    """Epoch-based data order: every item once per epoch, reshuffled each epoch from
    (seed, epoch), so the position ``(epoch, pos)`` alone restores the exact order on resume.
    Under data parallelism every process walks the same order and takes every ``world_size``-th
    packed batch from its ``rank`` on (:meth:`take`), so N processes train on the batches one
    process would pack in their place."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        import numpy as np
        ids = np.arange(self.n)
        if self.shuffle:
            ids = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return ids.tolist()

    def window(self, group_lengths: list[list[int]], capacity: int) -> list[int]:
        """The next items, just enough of them to overflow ``capacity`` tokens (or the epoch's
        rest); starts a new epoch when this one is used up."""
        if self.pos >= len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        out, total = [], 0
        for i in self._perm[self.pos:]:
            out.append(i)
            total += sum(group_lengths[i])
            if total > capacity:
                break
        return out

    def take(self, group_lengths: list[list[int]], n_rows: int, row_len: int) -> list[int]:
        """The items of this process's next batch of whole groups (``group_lengths[i]``: the
        lengths of item i's examples) packed first-fit into ``n_rows`` rows of ``row_len``; the
        other processes' batches are counted from the lengths alone, never packed."""
        mine: list[int] = []
        for turn in range(self.world_size):
            window = self.window(group_lengths, n_rows * row_len)
            used = complete_groups([group_lengths[i] for i in window], n_rows, row_len)
            if used == 0:
                raise DataError(f"item {window[0]} does not fit in one batch of {n_rows} x {row_len} tokens")
            if turn == self.rank:
                mine = window[:used]
            self.advance(used)
        return mine

    def advance(self, count: int) -> None:
        self.pos += count

    @property
    def progress(self) -> float:
        """Epochs completed, fractional."""
        return self.epoch + self.pos / max(1, len(self._perm))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


Example = tuple[list[int], list[int] | None]  # (input ids, labels or None)


def complete_groups(group_lengths: list[list[int]], n_rows: int, row_len: int) -> int:
    """How many leading groups first-fit packs whole into ``n_rows`` rows of ``row_len``."""
    placed = len(first_fit([n for g in group_lengths for n in g], n_rows, row_len)[0])
    complete = seen = 0
    for g in group_lengths:
        if seen + len(g) > placed:
            break
        seen += len(g)
        complete += 1
    return complete


def pack_groups(groups: list[list[Example]], n_rows: int, row_len: int, pad_id: int):
    """Pack whole groups (a conversation, or all K responses of one prompt) into one batch.

    Returns (PackedBatch, groups used). A group is never split across batches: the batch holds
    the complete groups that fit (first-fit is prefix-stable, so their layout is the one they
    would have with the rest packed after them).
    """
    used = complete_groups([[len(ids) for ids, _ in g] for g in groups], n_rows, row_len)
    batch, _ = pack_rows([ex for g in groups[:used] for ex in g], n_rows, row_len, pad_id)
    return batch, used


def fits_one_batch(lengths: list[int], n_rows: int, row_len: int) -> bool:
    """Whether a group of examples of these lengths packs into one batch (first-fit)."""
    return len(first_fit(lengths, n_rows, row_len)[0]) == len(lengths)


def iter_batches(items: Sequence[T], pack: Callable[..., tuple[PackedBatch, int]], n_rows: int, row_len: int,
                 pad_id: int) -> Iterator[tuple[PackedBatch, int]]:
    """Consecutive packed batches covering ``items`` in order: (batch, how many items it holds).
    ``pack(items, n_rows, row_len, pad_id) -> (batch, used)`` is :func:`pack_groups` or a
    packer built on it."""
    pos = 0
    while pos < len(items):
        batch, used = pack(items[pos:pos + n_rows * row_len], n_rows, row_len, pad_id)
        if used == 0:
            raise DataError(f"item {pos} does not fit in one batch of {n_rows} x {row_len} tokens")
        yield batch, used
        pos += used


def batches_per_epoch(group_lengths: list[list[int]], n_rows: int, row_len: int) -> int:
    """Micro-batches one pass over the groups takes when packed in file order (an estimate of
    the shuffled count, used to turn ``epochs`` into optimizer steps)."""
    batches, fill = 0, None
    for lengths in group_lengths:
        for attempt in range(2):
            if fill is None:
                fill, batches = [0] * n_rows, batches + 1
            placed, trial = first_fit(lengths, n_rows, row_len, fill)
            if len(placed) == len(lengths):
                fill = trial
                break
            fill = None  # start a new batch and retry the group there
    return batches
