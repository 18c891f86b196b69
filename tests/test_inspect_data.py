"""`fastgpt inspect-data`: conversations shown as the model's tokens with the trained ones marked,
and the classic chat-data bugs named."""
from __future__ import annotations

import json

import pytest

from fastgpt.cli import main

from helpers import write_jsonl
from hf_models import write_tokenizer

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "the cat"}]},
    {"prompt": "hello", "response": "thanks world"},
]


def inspect(capsys, file, model, *flags: str) -> str:
    assert main(["inspect-data", str(file), "--model", model, "--color", "never", *flags]) == 0
    return capsys.readouterr().out


def test_trained_tokens_are_marked(tmp_path, capsys):
    write_tokenizer(tmp_path / "m", "chatml")
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS), f"hf:{tmp_path / 'm'}")
    assert "<|im_start|>assistant\n⟦the cat<|im_end|>⟧\n" in out
    assert "<|im_start|>system\nYou are a cat.<|im_end|>" in out  # the template's default system turn, untrained
    assert "2 conversations" in out and "no problems found" in out
    coloured = main(["inspect-data", str(tmp_path / "c.jsonl"), "--model", f"hf:{tmp_path / 'm'}", "--color",
                     "always", "--tokens"])
    assert coloured == 0 and "\033[1;32m" in capsys.readouterr().out


def test_native_format_and_byte_tokenizer(tmp_path, capsys):
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS), "byte")
    assert "<|user|>what is two plus three<|end|><|assistant|>⟦the cat<|end|>⟧" in out


def test_double_bos_and_pad_equal_to_end_of_turn(tmp_path, capsys):
    write_tokenizer(tmp_path / "llama", "llama3")
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS), f"hf:{tmp_path / 'llama'}")
    assert "warning: double BOS: the chat template writes <|begin_of_text|> and the tokenizer adds another" in out
    write_tokenizer(tmp_path / "smol", "smollm")
    out = inspect(capsys, tmp_path / "c.jsonl", f"hf:{tmp_path / 'smol'}")
    assert "sets pad_token to the end-of-turn token <|im_end|>" in out and "fastgpt pads with <|im_start|>" in out


def test_truncation_cutting_an_answer(tmp_path, capsys):
    write_tokenizer(tmp_path / "m", "chatml")
    long = {"prompt": "hello", "response": " ".join(["the old red barn"] * 20)}
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", [long, *CONVERSATIONS]), f"hf:{tmp_path / 'm'}",
                  "--block-size", "60")
    assert "warning: 1 conversation: the context (60 tokens) cuts an answer: it loses its end" in out
    assert "c.jsonl:1)" in out


def test_special_token_text_and_round_trip_mismatches(tmp_path, capsys):
    write_tokenizer(tmp_path / "m", "chatml")
    forged = {"prompt": "say <|im_end|> now", "response": "ok"}
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", [*CONVERSATIONS, forged]), f"hf:{tmp_path / 'm'}")
    assert "1 conversation: a message contains a special token's text" in out and "c.jsonl:3)" in out
    # A template whose prompt ends in a space: "assistant: " + "the" tokenizes as "assistant:" + " the"
    # inside the conversation, so generation would start from ids training never saw.
    cfg_path = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    out = inspect(capsys, tmp_path / "c.jsonl", f"hf:{tmp_path / 'm'}")
    assert "the prompt before answer 1 tokenizes differently inside the conversation" in out


def test_missing_end_of_turn(tmp_path, capsys):
    write_tokenizer(tmp_path / "m", "chatml")
    cfg_path = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    out = inspect(capsys, write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS), f"hf:{tmp_path / 'm'}")
    assert "end-of-turn token missing" in out


@pytest.mark.parametrize("model", ["hf:/no/such/folder", "nothing-here"])
def test_bad_model_is_one_line(tmp_path, capsys, model):
    assert main(["inspect-data", str(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)), "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastgpt inspect-data: error:") and "\n" not in err
