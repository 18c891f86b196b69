"""Comparisons and the terminal ranking tool (driven through a pseudo-terminal)."""
from __future__ import annotations

import json
import signal
import sys

import pexpect
import pytest

from fastgpt.demo.labeler import SimulatedLabeler, rank_file
from fastgpt.chatdata import read_comparisons
from fastgpt.rank import RankError, compare, parse_order
from fastgpt.stages.reward import load_preferences
from helpers import TOK, cli, tiny_checkpoint, write_jsonl

ASK = "u undo, q quit > "


def read_jsonl(path):
    return [json.loads(ln) for ln in open(path) if ln.strip()]


# ------------------------------------------------------------------------ compare
def test_compare_writes_k_responses_per_prompt(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "2+2?"},
                                                 {"messages": [{"role": "user", "content": "yo"}]}])
    out = compare(ckpt, prompts, str(tmp_path / "c.jsonl"), k=3, max_new_tokens=5, seed=1, batch_size=4)
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows][:2] == ["hi", "2+2?"] and rows[2]["prompt"][0]["content"] == "yo"
    assert all(len(r["responses"]) == 3 and len(r["finished"]) == 3 for r in rows)
    assert all(isinstance(f, bool) for r in rows for f in r["finished"])
    again = compare(ckpt, prompts, str(tmp_path / "c2.jsonl"), k=3, max_new_tokens=5, seed=1, batch_size=4)
    assert read_jsonl(again) == rows  # seeded
    with pytest.raises(RankError, match="between 2 and 9"):
        compare(ckpt, prompts, str(tmp_path / "x.jsonl"), k=10)
    # the simulated labeler (string prompts only) and the reward reader accept the format as-is
    rank_file(write_jsonl(tmp_path / "c3.jsonl", rows[:2]), tmp_path / "r.jsonl", SimulatedLabeler(seed=0))
    assert len(read_comparisons(tmp_path / "r.jsonl")) == 2  # strict: every line valid


def test_cli_compare(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "there"}])
    r = cli("compare", ckpt, "--prompts", prompts, "--out", str(tmp_path / "c.jsonl"), "-k", "2",
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 2
    r = cli("compare", ckpt, "--prompts", prompts, "--out", str(tmp_path / "c.jsonl"), "-k", "1")
    assert r.returncode == 2 and "between 2 and 9" in r.stderr and "Traceback" not in r.stderr
    r = cli("compare", ckpt, "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "c.jsonl"))
    assert r.returncode == 2 and "no such file" in r.stderr


# --------------------------------------------------------------------------- rank
def test_parse_order():
    assert parse_order("3 1=4 2", 4) == [2, [0, 3], 1]
    assert parse_order("2,1", 2) == [1, 0]
    for bad in ("1 2", "1 1 2", "1 2 5", "a b c", "1=2=3", ""):
        with pytest.raises(ValueError):
            parse_order(bad, 3)


COMPARISONS = [
    {"prompt": "A?", "responses": ["a1", "a2", "a3", "a4"], "finished": [True, True, True, False]},
    {"prompt": "B?", "responses": ["b1", "b2"], "finished": [True, True]},
    {"prompt": "C?", "responses": ["c1", "c2", "c3"], "finished": [True, True, True]},
    {"prompt": "D?", "responses": ["d1", "d2"]},
]


def _sigint_as_from_a_terminal() -> None:
    # A background job of a non-interactive shell (CI started with `&`) ignores SIGINT, and an
    # ignored signal stays ignored across exec: the CLI would never see the Ctrl-C sent here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(comps, out):
    return pexpect.spawn(sys.executable, ["-m", "fastgpt.cli", "rank", comps, "--out", out], encoding="utf-8",
                         timeout=30, env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
                         preexec_fn=_sigint_as_from_a_terminal)


def answer(child, text, expect=ASK):
    child.sendline(text)
    child.expect_exact(expect)


def test_rank_session_ties_skip_undo_invalid_quit_and_resume(tmp_path):
    comps = write_jsonl(tmp_path / "c.jsonl", COMPARISONS)
    out = str(tmp_path / "r.jsonl")
    child = spawn(comps, out)
    child.expect_exact("comparison 1 of 4")
    child.expect_exact("--- 4 (did not finish) ---")
    child.expect_exact(ASK)
    answer(child, "3 1=4 2")                       # A ranked, with a tie
    assert read_jsonl(out)[0]["ranking"] == [2, [0, 3], 1]  # on disk at once
    child.sendline("1 1")                          # invalid: re-asked
    child.expect_exact("invalid: name each of 1..2 exactly once")
    child.expect_exact(ASK)
    answer(child, "s")                             # B skipped
    answer(child, "2 1 3")                         # C ranked
    assert len(read_jsonl(out)) == 2
    child.sendline("u")                            # undo C: removed from the file, asked again
    child.expect_exact("undone: last ranking removed")
    child.expect_exact("comparison 3 of 4")
    child.expect_exact(ASK)
    assert len(read_jsonl(out)) == 1
    child.sendline("u")                            # undo the skip of B
    child.expect_exact("undone: skip")
    child.expect_exact("comparison 2 of 4")
    child.expect_exact(ASK)
    child.sendline("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [r["prompt"] for r in read_jsonl(out)] == ["A?"]

    child = spawn(comps, out)                      # resume at the first unranked comparison
    child.expect_exact("comparison 2 of 4 (1 ranked)")
    child.expect_exact(ASK)
    answer(child, "2 1")                           # B
    answer(child, "1 3 2")                         # C
    child.sendline("1=2")                          # all tied: no preference
    child.expect_exact("invalid: all tied")
    child.expect_exact(ASK)
    child.sendline("2 1")                          # D, the last one
    child.expect_exact("done -- 4 of 4 ranked")
    child.expect(pexpect.EOF)
    child.close()
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["A?", "B?", "C?", "D?"]
    assert [r["ranking"] for r in rows] == [[2, [0, 3], 1], [1, 0], [0, 2, 1], [1, 0]]
    assert rows[0]["finished"] == [True, True, True, False] and rows[3]["finished"] == [True, True]
    groups, report = load_preferences(out, TOK, 64, 8, max_bad_fraction=0.0)
    assert len(groups) == 4


def test_rank_undo_across_restart_and_bad_comparisons(tmp_path):
    comps = write_jsonl(tmp_path / "c.jsonl", COMPARISONS[:2])
    out = write_jsonl(tmp_path / "r.jsonl", [{**COMPARISONS[0], "ranking": [0, 1, 2, 3]}])
    child = spawn(comps, out)
    child.expect_exact("comparison 2 of 2")
    child.expect_exact(ASK)
    child.sendline("u")                            # removes the ranking saved by an earlier session
    child.expect_exact("comparison 1 of 2 (0 ranked)")
    child.expect_exact(ASK)
    child.sendeof()                                # Ctrl-D quits like q
    child.expect(pexpect.EOF)
    child.close()
    assert read_jsonl(out) == []
    bad = write_jsonl(tmp_path / "bad.jsonl", [COMPARISONS[0], {"prompt": "x", "responses": ["only one"]}])
    r = cli("rank", bad, "--out", str(tmp_path / "r2.jsonl"))
    assert r.returncode == 2 and "bad.jsonl:2:" in r.stderr and "need between 2 and 9" in r.stderr


def test_untrusted_text_is_shown_escaped_and_ctrl_c_says_what_is_saved(tmp_path):
    """Control characters (a vertical tab, a terminal escape, a bidi override) and U+FFFD from
    broken UTF-8 are printed as visible escapes; Ctrl-C tells the truth: every ranking is saved."""
    comps = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "A?", "responses": ["x\x0by", "caf\ufffd", "\x1b[2Jgone", "ok \u202eevil"]},
        {"prompt": "B?", "responses": ["b1", "b2"]}])
    out = str(tmp_path / "r.jsonl")
    child = spawn(comps, out)
    for shown in ("x\\x0by", "caf\\ufffd", "\\x1b[2Jgone", "ok \\u202eevil", "bytes that were not valid UTF-8"):
        child.expect_exact(shown)
    child.expect_exact(ASK)
    assert "\x0b" not in child.before and "\x1b[2J" not in child.before
    answer(child, "1 2 3 4")
    child.sendintr()
    child.expect_exact("interrupted; every ranking given so far is saved: run the same command to continue")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 and [r["prompt"] for r in read_jsonl(out)] == ["A?"]


def test_compare_and_undo_write_files_with_umask_permissions(tmp_path):
    import os
    ckpt = tiny_checkpoint(tmp_path / "sft")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    old = os.umask(0o022)
    try:
        out = compare(ckpt, prompts, str(tmp_path / "c.jsonl"), k=2, max_new_tokens=2)
        rankings = write_jsonl(tmp_path / "r.jsonl", [{**COMPARISONS[1], "ranking": [0, 1]}] * 2)
        os.chmod(rankings, 0o644)
        from fastgpt.rank import _drop_last
        _drop_last(tmp_path / "r.jsonl")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644 and (tmp_path / "r.jsonl").stat().st_mode & 0o777 == 0o644
    assert len(read_jsonl(tmp_path / "r.jsonl")) == 1
