"""``fastgpt inspect-data``: how conversations become tokens for a model, and the classic bugs.

For a conversations file (the SFT format) and a model's tokenizer and chat format, each shown
conversation is printed as the model will see it, the tokens that carry loss highlighted (green in
a terminal, between ⟦ ⟧ otherwise).  Then the whole file is checked for what silently ruins
fine-tuning runs: a double BOS (the template writes one and the tokenizer adds another when the
rendered text is tokenized with ``add_special_tokens=True``, transformers' default); an
end-of-turn token that is missing or equal to the padding token (a trainer that masks padding
would never teach the model to stop); conversations cut by the context inside an answer; and
round-trip mismatches (ids that do not decode to the rendered text, a tokenization that differs
from tokenizing the rendered text in one piece, or a prompt whose ids are not the start of the
conversation's, so that generation and training see different tokens).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .chat_template import chat_encoding, encode_prompt
from .chatdata import LoadReport, parse_conversation, read_records
from .tokenizer import Message, Tokenizer

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


@dataclass
class Finding:
    """One kind of problem: how many conversations have it and where it was first seen."""

    message: str
    count: int = 0
    first: str = ""

    def add(self, where: str) -> None:
        self.count += 1
        self.first = self.first or where


@dataclass
class Inspection:
    """What ``inspect_file`` found: per-file counts and the problems, in a fixed order."""

    conversations: int = 0
    tokens: int = 0
    trained: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # problems of the tokenizer itself, not of a record

    def flag(self, key: str, message: str, where: str) -> None:
        self.findings.setdefault(key, Finding(message)).add(where)

    @property
    def warnings(self) -> list[str]:
        out = list(self.notes)
        out += [f"{f.count} conversation{'s' * (f.count != 1)}: {f.message} (first: {f.first})"
                for f in self.findings.values()]
        return out


def tokenizer_notes(tok: Tokenizer, folder: Path | None = None) -> list[str]:
    """Problems of the tokenizer and chat format themselves."""
    notes = []
    chat = tok.chat
    if chat.end_token is None:
        notes.append("end-of-turn token missing: the chat template writes no special token after an answer, so a "
                     "model cannot learn to stop")
    elif tok.pad_id == tok.end_id:
        notes.append(f"end-of-turn token {chat.end_token} is also the padding token")
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if pad is not None and pad == chat.end_token:
            notes.append(f"{folder / 'tokenizer_config.json'} sets pad_token to the end-of-turn token {pad}: a trainer "
                         f"that masks padding never teaches the model to stop (fastgpt pads with {chat.pad_token})")
    bos = chat.variables.get("bos_token")
    text = chat.render([{"role": "user", "content": "hi"}])
    if bos and hasattr(tok, "encode_like_transformers") and text.startswith(bos):
        if tok.encode_like_transformers(text)[:2] == [tok.special_ids.get(bos)] * 2:
            notes.append(f"double BOS: the chat template writes {bos} and the tokenizer adds another when the rendered "
                         "text is tokenized with add_special_tokens=True (transformers' default); fastgpt encodes "
                         "without, so its ids start with one")
    return notes


def check_conversation(tok: Tokenizer, messages: list[Message], context: int, where: str,
                       found: Inspection) -> None:
    """Add the problems of one conversation to ``found``."""
    enc = chat_encoding(tok, messages)
    ids, mask = enc.ids, enc.mask
    found.conversations += 1
    found.tokens += min(len(ids), context + 1)
    found.trained += sum(mask[1:context + 1])
    bos = tok.special_ids.get(tok.chat.variables.get("bos_token", ""))
    if bos is not None and ids[:2] == [bos, bos]:
        found.flag("double_bos", f"starts with two BOS tokens ({tok.chat.variables['bos_token']})", where)
    if tok.chat.end_token is not None:
        for run_trained, run in itertools.groupby(zip(ids, mask), key=lambda x: x[1]):
            if run_trained and [i for i, _ in run][-1] != tok.end_id:
                found.flag("no_end", "an answer does not end with the end-of-turn token", where)
                break
    if len(ids) > context + 1:  # SFT keeps ids[:context + 1]: inputs and the targets they predict
        lost = mask[context + 1:]
        if mask[context] and lost[0]:
            found.flag("cut_answer", f"the context ({context} tokens) cuts an answer: it loses its end", where)
        elif any(lost):
            found.flag("cut_later", f"later answers fall beyond the context ({context} tokens) and are not trained",
                       where)
    if tok.decode(ids, skip_special=False) != enc.rendered.text:
        found.flag("decode", "the ids do not decode back to the rendered template text", where)
    if enc.rendered.literal:
        joint = tok.encode_with_offsets(enc.rendered.text, True)[0]
        if joint != ids:
            found.flag("literal", "a message contains a special token's text (kept as plain text, so the ids differ "
                                  "from tokenizing the rendered text in one piece)", where)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = encode_prompt(tok, messages[:i])
            if ids[:len(prompt)] != prompt:
                found.flag("prefix", f"the prompt before answer {i} tokenizes differently inside the conversation: "
                                     "generation and training see different tokens", where)
                break


def show_conversation(tok: Tokenizer, messages: list[Message], out: TextIO, color: bool, tokens: bool) -> None:
    """Print a conversation as its tokens, the trained ones highlighted."""
    enc = chat_encoding(tok, messages)
    if tokens:
        for i, m in zip(enc.ids, enc.mask):
            piece = json.dumps(tok.decode([i], skip_special=False), ensure_ascii=False)
            line = f"{i:>8} {'T' if m else '.'} {piece}"
            out.write((f"{GREEN}{line}{RESET}" if m else line) + "\n") if color else out.write(line + "\n")
        return
    for trained, run in itertools.groupby(zip(enc.ids, enc.mask), key=lambda x: x[1]):
        text = tok.decode([i for i, _ in run], skip_special=False)
        if color:
            out.write(f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}")
        else:
            out.write(f"⟦{text}⟧" if trained else text)
    out.write("\n")


def inspect_file(path: str, tok: Tokenizer, context: int, out: TextIO, *, show: int = 2, color: bool = False,
                 tokens: bool = False, folder: Path | None = None) -> Inspection:
    """Show the first ``show`` conversations of ``path`` and check all of them; the findings are
    printed at the end and returned."""
    found = Inspection(notes=tokenizer_notes(tok, folder))
    report = LoadReport(path)
    for n, (where, messages) in enumerate(read_records(path, parse_conversation, report)):
        if n < show:
            header = f"── {where} ({len(chat_encoding(tok, messages).ids)} tokens)"
            out.write((f"{DIM}{header}{RESET}" if color else header) + "\n")
            show_conversation(tok, messages, out, color, tokens)
        check_conversation(tok, messages, context, where, found)
    legend = "trained tokens in green" if color else "trained tokens between ⟦ ⟧"
    out.write(f"{found.conversations} conversations, {found.tokens:,} tokens, {found.trained:,} trained "
              f"({legend}); context {context}, end of turn {tok.chat.end_token}, padding {tok.chat.pad_token}\n")
    if report.bad:
        out.write(f"skipped {len(report.bad)} bad records (first: {report.bad[0]})\n")
    for w in found.warnings:
        out.write(f"warning: {w}\n")
    if not found.warnings:
        out.write("no problems found\n")
    return found


def model_tokenizer(model: str) -> tuple[Tokenizer, int, Path | None]:
    """(tokenizer, context, Hugging Face folder or None) of ``hf:FOLDER``, a fastgpt checkpoint or
    run folder, or a tokenizer file / 'byte' (context 1024)."""
    from .tokenizer import load_tokenizer
    if model.startswith("hf:"):
        from .hf import read_hf_config
        folder = Path(model[3:])
        context = read_hf_config(folder)[0].block_size if (folder / "config.json").exists() else 1024
        return load_tokenizer(folder), context, folder
    from .checkpoint import checkpoint_path
    if checkpoint_path(model).is_file():
        from .checkpoint import load_checkpoint, model_config_of
        from .tokenizer import tokenizer_from_dict
        ckpt = load_checkpoint(model)
        return tokenizer_from_dict(ckpt["tokenizer"]), model_config_of(ckpt).block_size, None
    return load_tokenizer(model), 1024, Path(model) if Path(model).is_dir() else None
