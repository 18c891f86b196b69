"""Comparison data for the reward model: sample K answers per prompt, then rank them by hand.

``fastgpt compare CKPT --prompts FILE --out FILE -k 4`` samples K responses per prompt from a
(SFT) checkpoint and writes ``{"prompt", "responses", "finished"}`` per line.

``fastgpt rank COMPARISONS --out RANKINGS`` shows one prompt at a time with its numbered
responses; the person types an order best-first, e.g. ``3 1 4 2``, with ``=`` for ties
(``3 1=4 2``), ``s`` to skip, ``u`` to undo the last answer and ``q`` to quit.  Every answer is
appended to RANKINGS at once (write, flush, fsync), so a crash loses nothing; a restart resumes
at the first comparison without a ranking.  The ranking is stored 0-based with ties as nested
lists -- the same format the demo's simulated labeler writes.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from .chatdata import MAX_RESPONSES, Comparison, LoadReport, parse_prompt, parse_prompt_record, read_comparisons, read_records
from .console import Progress, plural, visible
from .errors import FastGPTError
from .files import atomic_write


class RankError(FastGPTError, ValueError):
    """Bad arguments for compare / rank (one-line message)."""


# ------------------------------------------------------------------------- compare
def compare(checkpoint: str, prompts_path: str, out_path: str, k: int = 4, temperature: float = 1.0,
            top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0, device: str = "auto",
            batch_size: int = 64, max_bad_fraction: float = 0.1) -> Path:
    """Sample ``k`` responses to every prompt of ``prompts_path``; write comparisons to ``out_path``.

    All k * prompts rows go through the engine in batches of about ``batch_size`` rows (a
    prompt's k rows stay together). The file appears complete or not at all (atomic rename).
    """
    from .checkpoint import load_model
    from .engine import SamplingParams, generate
    from .tokenizer import encode_prompt
    from .trainer import resolve_device
    if not 2 <= k <= MAX_RESPONSES:
        raise RankError(f"-k {k}: expected between 2 and {MAX_RESPONSES} responses per prompt")
    report = LoadReport(str(prompts_path))
    prompts = [p for _, p in read_records(prompts_path, parse_prompt_record, report)]
    report.finish("compare", max_bad_fraction, "prompts")
    model, tok, _ = load_model(checkpoint, kind="gpt", device=resolve_device(device))
    room = model.config.block_size - min(max_new_tokens, model.config.block_size // 2)
    encoded = [encode_prompt(tok, parse_prompt(p))[-room:] for p in prompts]  # keep room to answer
    per_batch = max(1, batch_size // k)
    out = Path(out_path)
    with atomic_write(out) as f, Progress(len(prompts), "compare", "prompt") as bar:
        for b, start in enumerate(range(0, len(prompts), per_batch)):
            chunk = encoded[start:start + per_batch]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    stop_ids=tok.stop_ids, seed=seed + b)
            gens = generate(model, [p for p in chunk for _ in range(k)], params, vocab_limit=tok.vocab_size)
            for i, prompt in enumerate(prompts[start:start + per_batch]):
                mine = gens[i * k:(i + 1) * k]
                texts = [tok.decode(g.tokens[:-1] if g.finished else g.tokens) for g in mine]
                row = {"prompt": prompt, "responses": texts, "finished": [g.finished for g in mine]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(len(chunk))
    return out


# ---------------------------------------------------------------------------- rank
def parse_order(text: str, k: int) -> list[Any]:
    """``"3 1=4 2"`` -> ``[2, [0, 3], 1]`` (0-based, ties sorted); ValueError explains a bad answer."""
    groups: list[Any] = []
    seen: list[int] = []
    for token in text.replace(",", " ").split():
        members = []
        for part in token.split("="):
            if not part.isdigit() or not 1 <= int(part) <= k:
                raise ValueError(f"{part!r} is not a response number 1..{k}")
            members.append(int(part) - 1)
        seen += members
        groups.append(sorted(members) if len(members) > 1 else members[0])
    if sorted(seen) != list(range(k)):
        raise ValueError(f"name each of 1..{k} exactly once")
    if len(groups) < 2:
        raise ValueError("all tied: that holds no preference (use s to skip)")
    return groups


def _key(c: Comparison) -> str:
    return json.dumps([c.prompt, c.responses], sort_keys=True)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_last(path: Path) -> dict | None:
    """Remove the last record of the rankings file (atomic rewrite); returns it."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        return None
    with atomic_write(path) as f:
        f.write("".join(ln + "\n" for ln in lines[:-1]))
    return json.loads(lines[-1])


def _show(c: Comparison, i: int, n: int, done: int, say: Callable[[str], None]) -> None:
    """One comparison as the person sees it. Model output is untrusted: characters a terminal
    would act on or not show are printed as escapes (see fastgpt.console.visible)."""
    say(f"\n=== comparison {i + 1} of {n} ({done} ranked) ===")
    texts = [m["content"] for m in c.messages] + list(c.responses)
    shown = [visible(t) for t in texts]
    for m, text in zip(c.messages, shown):
        say(f"[{m['role']}] {text}")
    for j, (r, text, fin) in enumerate(zip(c.responses, shown[len(c.messages):], c.finished), 1):
        say(f"--- {j}{'' if fin else ' (did not finish)'} ---")
        say(text if text.strip() else f"(empty{'' if not r else ', only whitespace: ' + repr(r)})")
    if shown != texts:
        say("(\\x.. and \\u.... are control or invisible characters, \\ufffd bytes that were not valid UTF-8)")


def rank_interactive(comparisons_path: str, rankings_path: str, ask: Callable[[str], str] = input,
                     say: Callable[[str], None] = print) -> int:
    """Rank comparisons in the terminal; returns how many were ranked in this session."""
    items = read_comparisons(comparisons_path)
    out = Path(rankings_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.touch()
    skipped: set[int] = set()
    history: list[tuple[str, int]] = []  # ("rank" | "skip", index), for undo
    session = 0

    def ranked() -> list[bool]:
        # match existing records to comparisons by (prompt, responses), in file order
        have = Counter(_key(c) for c in read_comparisons(out) if c.ranking is not None)
        flags = []
        for c in items:
            flags.append(have[_key(c)] > 0)
            have[_key(c)] -= flags[-1]
        return flags

    while True:
        flags = ranked()
        todo = [i for i, f in enumerate(flags) if not f and i not in skipped]
        if not todo:
            say(f"\nrank: done -- {sum(flags)} of {len(items)} ranked, {len(skipped)} skipped -> {out}")
            return session
        i, c = todo[0], items[todo[0]]
        k = len(c.responses)
        _show(c, i, len(items), sum(flags), say)
        while True:
            try:
                answer = ask(f"order best-first (e.g. {' '.join(map(str, range(k, 0, -1)))}; = ties), s skip, "
                             f"u undo, q quit > ").strip().lower()
            except EOFError:
                answer = "q"
            if answer == "q":
                say(f"rank: saved {plural(sum(flags), 'ranking')} to {out}; run again to continue")
                return session
            if answer == "s":
                skipped.add(i)
                history.append(("skip", i))
                break
            if answer == "u":
                if history and history[-1][0] == "skip":
                    skipped.discard(history.pop()[1])
                    say("undone: skip")
                elif _drop_last(out) is not None:
                    if history:
                        history.pop()
                    session = max(0, session - 1)
                    say("undone: last ranking removed")
                else:
                    say("nothing to undo")
                    continue
                break
            try:
                ranking = parse_order(answer, k)
            except ValueError as e:
                say(f"invalid: {e}")
                continue
            _append(out, {**c.to_json(), "ranking": ranking})
            history.append(("rank", i))
            session += 1
            break
