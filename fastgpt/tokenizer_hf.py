"""BPE tokenizers through the Hugging Face ``tokenizers`` library.

The byte tokenizer needs nothing but makes sequences ~4x longer than a BPE; this module gives a
real BPE: trained on a user's corpus (:func:`train_bpe`) or loaded from local GPT-2 files.  Any
such tokenizer gets fastgpt's chat special tokens, so the one chat template works unchanged, and
serialises its whole JSON into checkpoints so a run never depends on the original files.
Imported lazily by :mod:`fastgpt.tokenizer`, which keeps ``tokenizers`` off the byte-only path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFBackend

from .tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, register_tokenizer_kind


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind fastgpt's :class:`Tokenizer` interface."""

    kind = "hf"

    def __init__(self, tokenizer: _HFBackend) -> None:
        # Registering an existing token (GPT-2's <|endoftext|> = 50256) as special reuses its id,
        # so only the chat tokens a BPE lacks are appended to its vocabulary.
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        # Text typed by a user ("<|end|>") must stay text: without this, `tokenizers` matches
        # special tokens inside any string it encodes and a prompt could forge a turn boundary.
        # The flag is not serialised, so it is set on every construction.
        tokenizer.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ interface
    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor template (BOS/CLS...) around plain text.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, in parallel inside ``tokenizers`` (data preparation)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "json": self.tokenizer.to_str()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HFTokenizer":
        if not isinstance(d.get("json"), str):
            raise TokenizerError("hf tokenizer entry has no 'json' string (damaged checkpoint?)")
        try:
            return cls(_HFBackend.from_str(d["json"]))
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerError(f"hf tokenizer entry is not a valid tokenizer ({_first_line(e)})") from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """A Hugging Face ``tokenizer.json``, or a folder with one (or vocab.json + merges.txt)."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return cls.from_vocab_merges(p / "vocab.json", p / "merges.txt")
            else:
                raise TokenizerError(f"{p}: no tokenizer.json or vocab.json + merges.txt in this folder")
        if not p.is_file():
            raise TokenizerError(f"{p}: tokenizer file not found")
        try:
            backend = _HFBackend.from_file(str(p))
        except Exception as e:
            raise TokenizerError(f"{p}: not a Hugging Face tokenizer.json ({_first_line(e)})") from None
        return cls(backend)

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | Path, merges_txt: str | Path) -> "HFTokenizer":
        """GPT-2's original ``vocab.json`` + ``merges.txt`` as a byte-level BPE."""
        vocab_p, merges_p = Path(vocab_json), Path(merges_txt)
        for p in (vocab_p, merges_p):
            if not p.is_file():
                raise TokenizerError(f"{p}: tokenizer file not found")
        try:
            vocab = json.loads(vocab_p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{vocab_p}: not a JSON vocabulary ({_first_line(e)})") from None
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerError(f"{vocab_p}: expected a JSON object of token -> id")
        try:
            bpe = models.BPE.from_file(str(vocab_p), str(merges_p))
        except Exception as e:  # a bad merges.txt is reported by tokenizers
            raise TokenizerError(f"{merges_p}: not a BPE merges file for {vocab_p.name} ({_first_line(e)})") from None
        return cls(_byte_level(_HFBackend(bpe)))


def _byte_level(tok: _HFBackend) -> _HFBackend:
    """GPT-2's byte-level pipeline: every string encodes, and decoding restores it exactly."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _texts(items: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    for item in items:
        if _is_file(item):
            with open(item, encoding="utf-8", errors="replace") as f:
                yield from f
        else:
            yield str(item)


def _is_file(item: str | os.PathLike[str]) -> bool:
    # A str is a file name only when it names an existing file; anything else is corpus text.
    if isinstance(item, os.PathLike):
        if not Path(item).is_file():
            raise TokenizerError(f"{item}: training file not found")
        return True
    return len(item) < 4096 and "\n" not in item and os.path.isfile(item)


def train_bpe(files_or_texts: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], vocab_size: int,
              *, min_frequency: int = 2, show_progress: bool = True) -> HFTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens included) on files or texts.

    Items that are ``Path`` objects, or strings naming existing files, are read as files; other
    strings are training text.
    """
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    items = list(files_or_texts)
    floor = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the specials always fit
    if vocab_size < floor:
        raise TokenizerError(f"BPE vocab_size={vocab_size} is too small (at least {floor})")
    if not items:
        raise TokenizerError("train_bpe: no training files or texts given")
    tok = _byte_level(_HFBackend(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if all(_is_file(i) for i in items):
        tok.train([str(i) for i in items], trainer)  # Rust reads the files in parallel
    else:
        tok.train_from_iterator(_texts(items), trainer)
    return HFTokenizer(tok)


register_tokenizer_kind("hf", HFTokenizer.from_dict)
