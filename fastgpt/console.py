"""What fastgpt shows on a terminal or writes to a log: progress, counts in words, safe text.

:class:`Progress` is a tqdm bar when its stream is a terminal and otherwise (a log file, a pipe,
a CI job) one plain line every so often, so redirected output holds no carriage returns.
:func:`visible` makes untrusted model output safe to print: control and formatting characters
(which can move the cursor, clear a line or reorder text) are shown as escapes.
"""
from __future__ import annotations

import sys
import time
import unicodedata
from typing import Any, TextIO

# Unicode categories that a terminal does not print as a visible glyph: controls, formatting
# (zero-width, bidirectional overrides), surrogates, private use, unassigned, line separators.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
REPLACEMENT = "\ufffd"  # what decoding puts where bytes were not valid UTF-8


def plural(n: int, word: str, many: str | None = None) -> str:
    """``plural(1, "thread")`` -> "1 thread", ``plural(2, "thread")`` -> "2 threads"."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


def visible(text: str) -> str:
    """``text`` with every character a terminal would not show as itself written as an escape
    (``\\x0b``, ``\\u202e``), and U+FFFD (bytes that were not valid UTF-8) as ``\\ufffd``;
    newlines and tabs stay."""
    out = []
    for ch in text:
        if ch in "\n\t" or (ch != REPLACEMENT and unicodedata.category(ch) not in _INVISIBLE):
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of ``total`` units of work (steps, documents, prompts).

    On a terminal: a tqdm bar. Elsewhere: a line ``desc: 40/600 steps (7%) | loss 2.1 | 0:31
    elapsed, ~7:15 left`` every ``every`` units (default: a twentieth of the work), at least once
    a minute while work advances, and at the end. ``enabled=False`` shows nothing.
    """

    def __init__(self, total: int | None, desc: str, unit: str, *, initial: int = 0, enabled: bool = True,
                 every: int | None = None, stream: TextIO | None = None, min_seconds: float = 60.0,
                 delay: float = 0.0) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.postfix: dict[str, str] = {}
        self.bar: Any = None
        self.start = self.last_time = time.perf_counter()
        self.first, self.last_n = initial, initial
        self.shown_postfix: dict[str, str] = {}
        self.every = every or max(1, (total or 0) // 20)
        self.min_seconds, self.delay = min_seconds, delay
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=True, delay=delay)

    def set_postfix(self, values: dict[str, str]) -> None:
        self.postfix = dict(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (not self.total or self.n < self.total) and (
                self.n - self.last_n >= self.every or time.perf_counter() - self.last_time >= self.min_seconds):
            self._line()  # the last unit's line is close()'s, with the final postfix

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay:  # quick work (or a quick failure) leaves no progress behind
            return
        done = self.n - self.first
        parts = [f"{self.desc}: {self.n:,}"]
        if self.total:
            parts[0] += f"/{self.total:,} {self.unit}s ({self.n / self.total:.0%})"
        else:
            parts[0] += f" {self.unit}s"
        if self.postfix:
            parts.append(" ".join(f"{k} {v}" for k, v in self.postfix.items()))
        timing = f"{_clock(elapsed)} elapsed"
        if self.total and done > 0 and self.n < self.total:
            timing += f", ~{_clock(elapsed / done * (self.total - self.n))} left"
        parts.append(timing)
        print(" | ".join(parts), file=self.stream, flush=True)
        self.last_n, self.last_time, self.shown_postfix = self.n, time.perf_counter(), dict(self.postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and (self.n != self.last_n or self.postfix != self.shown_postfix):
            self._line()  # the final state, e.g. the last evaluation, is always shown
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self.bar is None:
            self.enabled = False  # an error is reported by itself, not after a last progress line
        self.close()
