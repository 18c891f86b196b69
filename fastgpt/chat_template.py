"""Chat formats: how a conversation becomes token ids, and which of those ids are trained on.

A chat format is a Jinja chat template, rendered the way Hugging Face transformers renders the
``chat_template`` of a ``tokenizer_config.json`` (sandboxed, ``trim_blocks`` and
``lstrip_blocks``, a JSON ``tojson``, ``raise_exception`` and ``strftime_now``), plus the names
of the special tokens that matter to training: the one that ends an assistant turn (SFT trains on
it, generation stops at it), every token generation stops at, the padding token and the token
between pre-training documents.  fastgpt's own format is such a template too
(:data:`NATIVE_TEMPLATE`), so every tokenizer goes through the one path below.

Which tokens carry loss is read off the rendering itself, with no markers in the template: for
assistant message i, ``render(messages[:i], add_generation_prompt=True)`` is what the model sees
before it answers and ``render(messages[:i + 1])`` ends after its answer; the characters between
the two, up to and including the end-of-turn token, are trained on (a trailing newline after it
is not).  A token is trained when its first character is.  A template that renders a prefix of
a conversation as something other than a prefix of the whole (one that rewrites earlier turns)
is refused with one line.

The rendered text is tokenized in one piece with special tokens parsed, as ``apply_chat_template``
does, except inside message contents: a message whose text contains a special token ("<|im_end|>"
typed by a user) is encoded as plain text, so no one can forge a turn boundary.
"""
from __future__ import annotations

import bisect
import functools
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol, Sequence

from .errors import TokenizerError

Message = dict[str, str]

# fastgpt's own format: [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...
NATIVE_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
                   "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass
class ChatFormat:
    """A chat template and the special tokens (by their text) that training and generation use."""

    template: str = NATIVE_TEMPLATE
    end_token: str | None = "<|end|>"        # ends an assistant turn; None: the template has none
    stop_tokens: tuple[str, ...] = ("<|end|>",)
    pad_token: str = "<|pad|>"
    document_token: str = "<|endoftext|>"    # separates pre-training documents
    variables: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for the template

    @property
    def native(self) -> bool:
        return self.template == NATIVE_TEMPLATE

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_tokens"] = list(self.stop_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ChatFormat":
        try:
            return cls(**{**d, "stop_tokens": tuple(d["stop_tokens"])})
        except (TypeError, KeyError) as e:
            raise TokenizerError(f"chat format entry is damaged ({e})") from None

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The template's text for ``messages`` (the prompt for the next assistant turn when
        ``add_generation_prompt``)."""
        import jinja2
        try:
            return _compile(self.template).render(messages=[dict(m) for m in messages],
                                                  add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None


# ----------------------------------------------------------------------------- Jinja
@functools.lru_cache(maxsize=8)
def _compile(source: str):
    """The template compiled in a sandbox with the helpers Hugging Face chat templates call."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template: Jinja syntax error at line {e.lineno} ({e.message})") from None


# --------------------------------------------------------------------------- layout
@dataclass
class Rendered:
    """A rendered conversation: its text, the character spans trained on, and the spans of
    message contents to encode as plain text (they hold a special token's text)."""

    text: str
    trained: list[tuple[int, int]]
    literal: list[tuple[int, int]]


def _prefix_or_fail(whole: str, part: str, i: int) -> None:
    if not whole.startswith(part):
        raise TokenizerError(f"chat template renders the conversation up to message {i} as something other "
                             "than the start of the whole conversation (it rewrites earlier turns), so the "
                             "trained tokens cannot be found")


def render_layout(fmt: ChatFormat, messages: Sequence[Message], specials: Sequence[str], *,
                  add_generation_prompt: bool = False, trained: bool = True) -> Rendered:
    """Render ``messages`` and locate the answers (``trained``) and the contents holding special
    tokens' text (see the module docstring)."""
    text = fmt.render(messages, add_generation_prompt)
    spans: list[tuple[int, int]] = []
    if trained:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = fmt.render(messages[:i], add_generation_prompt=True)
            turn = fmt.render(messages[:i + 1])
            _prefix_or_fail(turn, prompt, i)
            _prefix_or_fail(text, turn, i)
            answer = turn[len(prompt):]
            cut = answer.rfind(fmt.end_token) if fmt.end_token else -1
            end = len(prompt) + (cut + len(fmt.end_token) if cut >= 0 else len(answer))
            spans.append((len(prompt), end))
    literal = []
    for i, m in enumerate(messages):
        if not any(s in m["content"] for s in specials):
            continue
        before = fmt.render(messages[:i]) if i else ""
        upto = fmt.render(messages[:i + 1])
        _prefix_or_fail(upto, before, i)
        _prefix_or_fail(text, upto, i)
        turn = upto[len(before):]
        for content in (m["content"], m["content"].strip()):
            at = turn.rfind(content)
            if at >= 0:
                literal.append((len(before) + at, len(before) + at + len(content)))
                break
        else:
            raise TokenizerError(f"message {i} holds a special token's text and the chat template changes it "
                                 "beyond recognition, so it cannot be kept plain text")
    return Rendered(text, spans, literal)


# ------------------------------------------------------------------------- encoding
class ChatTokenizer(Protocol):
    chat: ChatFormat

    @property
    def special_tokens(self) -> list[str]: ...

    def encode_with_offsets(self, text: str, specials: bool) -> tuple[list[int], list[int]]: ...


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation, the character where each starts, and the loss mask."""

    rendered: Rendered
    ids: list[int]
    starts: list[int]
    mask: list[bool]


def encode_rendered(tok: ChatTokenizer, rendered: Rendered) -> tuple[list[int], list[int]]:
    """(ids, start character of each id) of a rendering: special tokens parsed except in its
    literal spans."""
    ids: list[int] = []
    starts: list[int] = []
    pos = 0
    pieces = []
    for a, b in sorted(rendered.literal):
        pieces += [(pos, a, True), (a, b, False)]
        pos = b
    pieces.append((pos, len(rendered.text), True))
    for a, b, specials in pieces:
        if a < b:
            piece_ids, piece_starts = tok.encode_with_offsets(rendered.text[a:b], specials)
            ids += piece_ids
            starts += [a + s for s in piece_starts]
    return ids, starts


def chat_encoding(tok: ChatTokenizer, messages: Sequence[Message]) -> ChatEncoding:
    """A whole conversation encoded with its trained tokens marked (the detail behind
    :func:`encode_chat`, for tools that show it)."""
    rendered = render_layout(tok.chat, messages, tok.special_tokens)
    ids, starts = encode_rendered(tok, rendered)
    begins = [a for a, _ in rendered.trained]
    mask = []
    for s in starts:
        k = bisect.bisect_right(begins, s) - 1
        mask.append(k >= 0 and s < rendered.trained[k][1])
    return ChatEncoding(rendered, ids, starts, mask)


def encode_chat(tok: ChatTokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per id, whether it is trained on: the assistant's
    answers and the end-of-turn token closing each of them; system and user turns and the
    template's headers are context only."""
    enc = chat_encoding(tok, messages)
    return enc.ids, enc.mask


def encode_prompt(tok: ChatTokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a conversation so far, ending where the assistant's answer begins."""
    rendered = render_layout(tok.chat, messages, tok.special_tokens, add_generation_prompt=True, trained=False)
    return encode_rendered(tok, rendered)[0]


# ------------------------------------------------------------------------- analysis
_PROBE = "fastgpt-probe-answer"


def find_end_token(template: str, variables: dict[str, str], specials: Sequence[str]) -> str | None:
    """The special token a template writes right after an assistant's answer (its end of turn),
    or None when it writes none."""
    fmt = ChatFormat(template=template, variables=variables)
    text = fmt.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}])
    at = text.find(_PROBE)
    if at < 0:
        raise TokenizerError("chat template does not write the assistant's message content")
    rest = text[at + len(_PROBE):]
    found = [(rest.find(s), -len(s), s) for s in specials if s and s in rest]
    return min(found)[2] if found else None
