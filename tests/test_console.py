"""What goes to the terminal or a log: plain progress lines, counts in words, escaped model output."""
from __future__ import annotations

import io

from fastgpt.console import Progress, plural, visible


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_progress_lines_off_a_terminal():
    log = io.StringIO()
    with Progress(100, "sft", "step", stream=log, every=25) as bar:
        for step in range(100):
            bar.set_postfix({"loss": f"{3 - step / 50:.3g}"})
            bar.update(1)
        bar.set_postfix({"loss": "1.02", "val_loss": "1.5"})
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [ln.split(" |")[0] for ln in lines] == [f"sft: {n}/100 steps ({n}%)" for n in (25, 50, 75, 100)]
    assert "left" in lines[0] and "loss 1.02 | val_loss" not in lines[-1] and "val_loss 1.5" in lines[-1]


def test_progress_is_a_bar_on_a_terminal_and_nothing_when_disabled():
    term, log = Terminal(), io.StringIO()
    with Progress(10, "pretrain", "step", stream=term) as bar:
        bar.update(10)
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()
    with Progress(10, "pretrain", "step", stream=log, enabled=False) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_a_failure_leaves_no_last_progress_line():
    log = io.StringIO()
    try:
        with Progress(None, "prepare", "document", stream=log, every=1000) as bar:
            bar.update(5)
            raise ValueError("bad line")
    except ValueError:
        pass
    assert log.getvalue() == ""


def test_plural():
    assert plural(1, "thread") == "1 thread" and plural(2, "thread") == "2 threads"
    assert plural(0, "rollout") == "0 rollouts" and plural(1234, "token") == "1,234 tokens"


def test_visible_escapes_what_a_terminal_would_act_on():
    assert visible("a\x0bb\x1b[2Jc\u202ed\u200be\ufffd") == "a\\x0bb\\x1b[2Jc\\u202ed\\u200be\\ufffd"
    assert visible("line one\n\tindented — café, 日本") == "line one\n\tindented — café, 日本"
