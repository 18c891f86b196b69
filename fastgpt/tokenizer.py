"""Tokenizers and the one chat template used by SFT, generation, reward and PPO.

Three kinds, one interface (:class:`Tokenizer`):
  * :class:`ByteTokenizer` -- the 256 byte values plus special tokens; works on any text with no
    training and no files, the default for built-in data;
  * :class:`HFTokenizer` -- a ``tokenizers`` BPE, trained on a user's corpus or loaded from a local
    GPT-2 ``tokenizer.json`` / ``vocab.json`` + ``merges.txt``.
Every tokenizer serialises to a JSON-able dict (:meth:`Tokenizer.to_dict`) saved in each
checkpoint, and :func:`tokenizer_from_dict` rebuilds it.

Chat format (special tokens, never produced by encoding plain text):
    [<|system|> system text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...
Only assistant text and the <|end|> that closes it are trained on (:func:`encode_chat`), so a
model learns to stop; padding uses <|pad|>, which is never the end-of-turn token.
"""
from __future__ import annotations

from .errors import FastGPTError

import json
from pathlib import Path
from typing import Any, Sequence

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class TokenizerError(FastGPTError, ValueError):
    """Bad tokenizer input or file (one-line message)."""


class Tokenizer:
    """Common interface: text <-> ids, special token ids, serialisation."""

    kind = "base"
    vocab_size: int
    special_ids: dict[str, int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    # Named special tokens, used everywhere instead of raw ids.
    @property
    def eot_id(self) -> int:
        """Document separator in pre-training data."""
        return self.special_ids["<|endoftext|>"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["<|pad|>"]

    @property
    def end_id(self) -> int:
        """End of a chat turn: generation stops here."""
        return self.special_ids["<|end|>"]

    def role_id(self, role: str) -> int:
        if role not in ROLE_TOKENS:
            raise TokenizerError(f"unknown chat role {role!r} (expected system, user or assistant)")
        return self.special_ids[ROLE_TOKENS[role]]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; special tokens follow."""

    kind = "byte"

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: t for t, i in self.special_ids.items()}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = bytearray()
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
                continue
            if not skip_special and i in self._special_by_id:
                pieces.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                pieces.append(self._special_by_id[i])
        pieces.append(out.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


_KINDS: dict[str, Any] = {"byte": lambda d: ByteTokenizer()}


def register_tokenizer_kind(kind: str, from_dict: Any) -> None:
    """Let another tokenizer class be rebuilt from checkpoints (``from_dict(d) -> Tokenizer``)."""
    _KINDS[kind] = from_dict


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("kind")
    if kind not in _KINDS:
        if kind == "hf":
            from . import tokenizer_hf  # noqa: F401  (registers the kind)
        if kind not in _KINDS:
            raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected one of {sorted(_KINDS)})")
    return _KINDS[kind](d)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer saved by fastgpt (JSON), or 'byte' for the built-in byte tokenizer."""
    if str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{p}: tokenizer file not found")
    if p.is_dir():  # a Hugging Face folder (tokenizer.json or vocab.json + merges.txt)
        from .tokenizer_hf import HFTokenizer
        return HFTokenizer.from_file(p)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{p}: not a JSON tokenizer file ({e.msg} at line {e.lineno})") from None
    if "kind" not in d:  # a Hugging Face tokenizer.json
        from .tokenizer_hf import HFTokenizer
        return HFTokenizer.from_file(p)
    return tokenizer_from_dict(d)


# ------------------------------------------------------------------------- chat template
Message = dict[str, str]


def validate_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Check the common ``messages`` format; raise TokenizerError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"{where}[{i}]: expected {{'role': ..., 'content': ...}}")
        if m["role"] not in ROLE_TOKENS:
            raise TokenizerError(f"{where}[{i}]: unknown role {m['role']!r} (expected system, user or assistant)")
        if not isinstance(m["content"], str):
            raise TokenizerError(f"{where}[{i}]: content must be a string")
        if m["role"] == "system" and i != 0:
            raise TokenizerError(f"{where}[{i}]: a system message may only come first")
    return messages


def encode_chat(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per id, whether it is trained on.

    The trained ids are the assistant's text and the <|end|> closing each assistant turn; the role
    tokens, system and user text are context only.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        is_assistant = m["role"] == "assistant"
        body = tok.encode(m["content"])
        ids += [tok.role_id(m["role"])] + body + [tok.end_id]
        mask += [False] + [is_assistant] * (len(body) + 1)
    return ids, mask


def encode_prompt(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation so far, ending with <|assistant|> so the model answers next."""
    ids, _ = encode_chat(tok, messages)
    return ids + [tok.role_id("assistant")]


def prompt_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """A user prompt string (or existing messages) as a messages list."""
    if isinstance(prompt, str):
        msgs: list[Message] = [{"role": "user", "content": prompt}]
    else:
        msgs = list(prompt)
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs
