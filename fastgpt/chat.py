"""``fastgpt chat CKPT``: talk to any stage's checkpoint in the terminal, answers streamed as
they are generated.

The conversation is re-encoded with the chat template each turn and generated through the KV-cache
engine; when it outgrows the model's context, the oldest turns are dropped (the system message
stays). Commands: ``/reset`` forgets the conversation, ``/system TEXT`` sets the system message
(and resets), ``/quit`` (or end of input) leaves.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, TextIO

from .tokenizer import Message, Tokenizer, encode_prompt

HELP = "commands: /reset, /system TEXT, /quit"


class StreamPrinter:
    """Decodes a growing list of ids and writes only the new text. Text is printed whole: a
    multi-byte character split over byte tokens waits until its last byte arrives."""

    def __init__(self, tok: Tokenizer, out: TextIO) -> None:
        self.tok, self.out = tok, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def fit_context(tok: Tokenizer, system: str | None, turns: list[Message], budget: int) -> tuple[list[int], int]:
    """Prompt ids of the conversation within ``budget`` tokens; returns (ids, turns dropped).

    The oldest exchanges (a user turn and its answer) go first, so the history still starts
    with a user turn; the system message always stays. If the newest user message alone is too
    long, its start is cut (the chat template's role tokens stay intact).
    """
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    dropped = 0
    while True:
        ids = encode_prompt(tok, head + turns[dropped:])
        if len(ids) <= budget:
            return ids, dropped
        if dropped + 2 > len(turns) - 1:
            break
        dropped += 2
    last = turns[-1]
    room = budget - len(encode_prompt(tok, head + [{"role": last["role"], "content": ""}]))
    if room <= 0:  # the system message alone overflows: keep the newest message's end only
        return ids[-budget:], dropped
    cut = {"role": last["role"], "content": tok.decode(tok.encode(last["content"])[-room:])}
    ids = encode_prompt(tok, head + [cut])
    return ids[-budget:], len(turns) - 1


def chat_loop(model, tok: Tokenizer, params, read: Callable[[str], str], out: TextIO,
              system: str | None = None) -> None:
    """Read user lines, answer each with streamed output, until /quit or end of input."""
    from .engine import generate
    turns: list[Message] = []
    block = model.config.block_size
    budget = block - min(params.max_new_tokens, block // 2)  # leave room for the answer
    out.write(f"({HELP})\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            turns = []
            out.write("(conversation reset)\n")
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            turns = []
            out.write(f"(system message {'set' if system else 'cleared'}; conversation reset)\n")
            continue
        if text.startswith("/"):
            out.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        turns.append({"role": "user", "content": text})
        ids, dropped = fit_context(tok, system, turns, budget)
        if dropped:
            turns = turns[dropped:]
            out.write(f"(dropped {dropped} old turn(s) to fit the context)\n")
        out.write("assistant> ")
        out.flush()
        printer = StreamPrinter(tok, out)
        turn_params = replace(params, seed=None if params.seed is None else params.seed + len(turns))
        gen = generate(model, [ids], turn_params, vocab_limit=tok.vocab_size, on_token=printer)[0]
        out.write("\n")
        turns.append({"role": "assistant", "content": tok.decode(gen.tokens)})
