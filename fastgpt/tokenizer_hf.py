"""BPE tokenizers through the Hugging Face ``tokenizers`` library.

The byte tokenizer needs nothing but makes sequences ~4x longer than a BPE; this module gives a
real BPE: trained on a user's corpus (:func:`train_bpe`), loaded from local GPT-2 files, or the
tokenizer of a Hugging Face model folder (:meth:`HFTokenizer.from_folder`).  A folder whose
``tokenizer_config.json`` (or ``chat_template.jinja``) has a chat template keeps its own chat
format (Llama 3, ChatML, ...); any other BPE gets fastgpt's chat special tokens and format.  The
whole tokenizer JSON and the chat format are serialised into checkpoints, so a run never depends
on the original files.  Imported lazily by :mod:`fastgpt.tokenizer`, which keeps ``tokenizers``
off the byte-only path.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFBackend

from .chat_template import ChatFormat, find_end_token
from .tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, register_tokenizer_kind

# Padding when a model folder names none that differs from its end-of-turn token.
PAD_TOKEN = "<|pad|>"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind fastgpt's :class:`Tokenizer` interface.

    Without a ``chat`` format it gets fastgpt's own chat special tokens and format."""

    kind = "hf"

    def __init__(self, tokenizer: _HFBackend, chat: ChatFormat | None = None) -> None:
        if chat is None:
            # Registering an existing token (GPT-2's <|endoftext|> = 50256) as special reuses its id,
            # so only the chat tokens a BPE lacks are appended to its vocabulary.
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
            chat = ChatFormat()
        # Text typed by a user ("<|end|>") must stay text: without this, `tokenizers` matches
        # special tokens inside any string it encodes and a prompt could forge a turn boundary.
        # The flag is not serialised, so it is set on every construction.
        tokenizer.encode_special_tokens = True
        self.tokenizer, self.chat = tokenizer, chat
        self.special_ids = {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}
        named = [chat.end_token, chat.pad_token, chat.document_token, *chat.stop_tokens]
        missing = [t for t in named if t is not None and t not in self.special_ids]
        if missing:
            raise TokenizerError(f"chat format names {missing[0]!r}, which is not a special token of this tokenizer")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ interface
    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor template (BOS/CLS...) around plain text.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, specials: bool) -> tuple[list[int], list[int]]:
        self.tokenizer.encode_special_tokens = not specials
        try:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = True
        return enc.ids, [a for a, _ in enc.offsets]

    def encode_like_transformers(self, text: str) -> list[int]:
        """What transformers' ``tokenizer(text)`` gives: special tokens' text parsed and the
        post-processor's tokens (a BOS) added. fastgpt never encodes this way; it is the reference
        for spotting a double BOS."""
        self.tokenizer.encode_special_tokens = False
        try:
            return self.tokenizer.encode(text, add_special_tokens=True).ids
        finally:
            self.tokenizer.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, in parallel inside ``tokenizers`` (data preparation)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "json": self.tokenizer.to_str()}
        if not self.chat.native:
            d["chat"] = self.chat.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HFTokenizer":
        if not isinstance(d.get("json"), str):
            raise TokenizerError("hf tokenizer entry has no 'json' string (damaged checkpoint?)")
        chat = ChatFormat.from_dict(d["chat"]) if "chat" in d else None
        try:
            backend = _HFBackend.from_str(d["json"])
        except Exception as e:  # tokenizers raises plain Exception
            raise TokenizerError(f"hf tokenizer entry is not a valid tokenizer ({_first_line(e)})") from None
        return cls(backend, chat)

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
        return cls(_load(p))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "HFTokenizer":
        """The tokenizer of a Hugging Face model folder: ``tokenizer.json`` with the chat template
        and special tokens of ``tokenizer_config.json`` (or ``chat_template.jinja``), and the stop
        ids of ``generation_config.json`` / ``config.json``. Without a chat template: fastgpt's."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            return cls.from_file(folder)
        tcfg = _read_json(folder / "tokenizer_config.json")
        template = chat_template_of(folder, tcfg)
        if template is None:
            return cls.from_file(folder / "tokenizer.json")
        backend = _load(folder / "tokenizer.json")
        return cls(backend, _chat_format(folder, backend, template, tcfg))

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


def _load(path: Path) -> _HFBackend:
    try:
        return _HFBackend.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception
        raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({_first_line(e)})") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_of(folder: Path, tcfg: dict[str, Any]) -> str | None:
    """The folder's chat template: ``tokenizer_config.json``'s ``chat_template`` (a string, or a
    list of named templates of which "default" is used) or ``chat_template.jinja``."""
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template lists no 'default' template "
                                 f"(has {sorted(map(str, named))})")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return template


def _chat_format(folder: Path, backend: _HFBackend, template: str, tcfg: dict[str, Any]) -> ChatFormat:
    """The chat format of a model folder: its template, and its special tokens by role.

    End of turn: the special token the template writes after an answer. Stops: that token and
    the eos ids of generation_config.json, config.json and tokenizer_config.json. Padding: the
    configured pad token, bos or eos, whichever first is a special token other than the end of
    turn (a pad equal to it would teach models never to stop), else a new <|pad|> token.
    Documents are separated by bos, else eos."""
    names = {k: _token_text(tcfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    variables = {k: v for k, v in names.items() if v is not None}
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    end = find_end_token(template, variables, sorted(specials))
    stops = [end] if end else []
    for cfg_name in ("generation_config.json", "config.json"):
        eos = _read_json(folder / cfg_name).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and backend.id_to_token(i) in specials:
                stops.append(backend.id_to_token(i))
    stops.append(names["eos_token"])
    stops = [t for t in dict.fromkeys(stops) if t in specials]
    pad = next((t for t in (names["pad_token"], names["bos_token"], names["eos_token"])
                if t in specials and t != end), None)
    if pad is None:
        backend.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
        pad = PAD_TOKEN
    document = next((t for t in (names["bos_token"], names["eos_token"], end) if t in specials), pad)
    return ChatFormat(template=template, end_token=end, stop_tokens=tuple(stops), pad_token=pad,
                      document_token=document, variables=variables)


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


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPEs (GPT-2's scheme) use for each byte value: printable
    Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def hf_backend(tok: Tokenizer) -> _HFBackend:
    """A ``tokenizers.Tokenizer`` that encodes exactly as ``tok``: its own backend, or for the
    byte tokenizer a byte-level BPE with no merges whose id for each byte is the byte's value."""
    if isinstance(tok, HFTokenizer):
        return tok.tokenizer
    if tok.kind != "byte":
        raise TokenizerError(f"a {tok.kind!r} tokenizer has no Hugging Face equivalent")
    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    backend = _byte_level(_HFBackend(models.BPE(vocab=vocab, merges=[])))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend
