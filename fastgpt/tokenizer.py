"""Tokenizers: text <-> ids, the special tokens every stage names, and the chat format.

Three kinds, one interface (:class:`Tokenizer`):
  * :class:`ByteTokenizer` -- the 256 byte values plus special tokens; works on any text with no
    training and no files, the default for built-in data;
  * :class:`HFTokenizer` -- a ``tokenizers`` BPE, trained on a user's corpus, loaded from a local
    GPT-2 ``tokenizer.json``, or a Hugging Face model folder's tokenizer with its chat template.
Every tokenizer serialises to a JSON-able dict (:meth:`Tokenizer.to_dict`) saved in each
checkpoint, and :func:`tokenizer_from_dict` rebuilds it.

Each tokenizer carries a :class:`~fastgpt.chat_template.ChatFormat`: a Jinja chat template plus
the names of its end-of-turn, stop, padding and document tokens. fastgpt's own format (the
default, special tokens never produced by encoding plain text) is

    [<|system|> system text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

and a Hugging Face folder brings its own (Llama 3, ChatML, ...). Either way :func:`encode_chat`
trains on the assistant's text and the end-of-turn token that closes it, so a model learns to
stop; padding is never the end-of-turn token.
"""
from __future__ import annotations

from .errors import TokenizerError  # noqa: F401  (part of this module's API)

import json
import re
from pathlib import Path
from typing import Any, Sequence

from .chat_template import ChatFormat, Message, encode_chat, encode_prompt  # noqa: F401  (re-exported)

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


class Tokenizer:
    """Common interface: text <-> ids, special token ids, chat format, serialisation."""

    kind = "base"
    vocab_size: int
    special_ids: dict[str, int]
    chat: ChatFormat = ChatFormat()  # fastgpt's own format unless a subclass loads another

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: special tokens' text stays text."""
        raise NotImplementedError

    def encode_with_offsets(self, text: str, specials: bool) -> tuple[list[int], list[int]]:
        """Ids of ``text`` (special tokens' text parsed as special tokens when ``specials``) and
        the index of the character each id starts at."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    # Named special tokens, used everywhere instead of raw ids.
    @property
    def special_tokens(self) -> list[str]:
        return list(self.special_ids)

    @property
    def eot_id(self) -> int:
        """Document separator in pre-training data."""
        return self.special_ids[self.chat.document_token]

    @property
    def pad_id(self) -> int:
        return self.special_ids[self.chat.pad_token]

    @property
    def end_id(self) -> int:
        """End of an assistant turn: SFT trains on it, generation stops at it."""
        if self.chat.end_token is None:
            raise TokenizerError("the chat template ends an assistant turn with no special token, so a model "
                                 "could not learn to stop (fix the template)")
        return self.special_ids[self.chat.end_token]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the end of turn first, then the model's other stops."""
        ids = [self.end_id] + [self.special_ids[t] for t in self.chat.stop_tokens]
        return tuple(dict.fromkeys(ids))

    def role_id(self, role: str) -> int:
        """The role token of fastgpt's own chat format."""
        if role not in ROLE_TOKENS:
            raise TokenizerError(f"unknown chat role {role!r} (expected system, user or assistant)")
        if ROLE_TOKENS[role] not in self.special_ids:
            raise TokenizerError("role tokens belong to fastgpt's own chat format; this tokenizer has another")
        return self.special_ids[ROLE_TOKENS[role]]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; special tokens follow."""

    kind = "byte"

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: t for t, i in self.special_ids.items()}
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str, specials: bool) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []

        def plain(a: int, b: int) -> None:
            piece = text[a:b]
            if piece.isascii():
                ids.extend(piece.encode("ascii"))
                starts.extend(range(a, b))
                return
            for j, char in enumerate(piece, a):
                raw = char.encode("utf-8")
                ids.extend(raw)
                starts.extend([j] * len(raw))

        pos = 0
        for m in self._special_re.finditer(text) if specials else ():
            plain(pos, m.start())
            ids.append(self.special_ids[m.group()])
            starts.append(m.start())
            pos = m.end()
        plain(pos, len(text))
        return ids, starts

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
    """A tokenizer saved by fastgpt (JSON), a Hugging Face tokenizer.json or model folder, or
    'byte' for the built-in byte tokenizer."""
    if str(path) == "byte":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{p}: tokenizer file not found")
    if p.is_dir():  # a Hugging Face folder (tokenizer.json or vocab.json + merges.txt)
        from .tokenizer_hf import HFTokenizer
        return HFTokenizer.from_folder(p)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{p}: not a JSON tokenizer file ({e.msg} at line {e.lineno})") from None
    if "kind" not in d:  # a Hugging Face tokenizer.json
        from .tokenizer_hf import HFTokenizer
        return HFTokenizer.from_file(p)
    return tokenizer_from_dict(d)


# ---------------------------------------------------------------------------- messages
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


def prompt_messages(prompt: str | Sequence[Message], system: str | None = None) -> list[Message]:
    """A user prompt string (or existing messages) as a messages list."""
    if isinstance(prompt, str):
        msgs: list[Message] = [{"role": "user", "content": prompt}]
    else:
        msgs = list(prompt)
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs
