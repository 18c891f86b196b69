"""Chat context trimming: whole exchanges go first, the system message stays, the template holds."""
from fastgpt.chat import fit_context
from fastgpt.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_drops_whole_exchanges_and_keeps_the_system_message():
    turns = _turns("a" * 10, "b" * 10, "c" * 10, "d" * 10, "e" * 10)
    ids, dropped = fit_context(TOK, "sys", turns, 45)
    assert dropped == 2  # one user turn and its answer
    text = TOK.decode(ids, skip_special=False)
    assert text.startswith("<|system|>sys<|end|><|user|>ccc") and text.endswith("<|assistant|>")
    assert len(ids) <= 45


def test_everything_fits_untouched():
    turns = _turns("hi", "hello", "how are you?")
    ids, dropped = fit_context(TOK, None, turns, 200)
    assert dropped == 0 and TOK.decode(ids, skip_special=False).count("<|user|>") == 2


def test_a_single_long_message_is_cut_from_its_start():
    ids, dropped = fit_context(TOK, "sys", _turns("x" * 50 + "END"), 30)
    text = TOK.decode(ids, skip_special=False)
    assert len(ids) == 30 and dropped == 0
    assert text.startswith("<|system|>sys<|end|><|user|>") and text.endswith("END<|end|><|assistant|>")
