"""Byte and BPE tokenizers: round trips, the chat template's training mask, special-token safety,
serialisation through checkpoints' dicts and files, and one-line errors for bad files."""
from __future__ import annotations

import json
import random

import pytest

from fastgpt.tokenizer import (SPECIAL_TOKENS, ByteTokenizer, TokenizerError, encode_chat, encode_prompt,
                               load_tokenizer, tokenizer_from_dict)

tokenizers = pytest.importorskip("tokenizers")
from fastgpt.tokenizer_hf import HFTokenizer, train_bpe  # noqa: E402

SAMPLES = ["hello world", "", "  leading and trailing  ", "naïve café — 東京 🙂 x²", "tabs\tand\nnewlines\r\n",
           "<|end|> typed by a user", "<|endoftext|><|user|>"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you 🙂"}]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sho", "ber", "ül", "東", "京", "ïv", "zor", "pla", "qu", "ex"]
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "naïve", "12", "345", "!", "?", ","]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return train_bpe(corpus(), vocab_size=400, show_progress=False)


def check_chat_mask(tok) -> None:
    ids, mask = encode_chat(tok, CHAT)
    assert len(ids) == len(mask)
    trained = [i for i, m in zip(ids, mask) if m]
    want = tok.encode("hello!") + [tok.end_id] + tok.encode("see you 🙂") + [tok.end_id]
    assert trained == want
    # Every turn opens with its role token and closes with <|end|>; none of those but the
    # assistant's <|end|> is trained on.
    for i, m in zip(ids, mask):
        if i in (tok.role_id("system"), tok.role_id("user"), tok.role_id("assistant")):
            assert not m
    assert ids.count(tok.end_id) == len(CHAT)
    prompt = encode_prompt(tok, CHAT[:2])
    assert prompt[-1] == tok.role_id("assistant") and prompt[0] == tok.role_id("system")


def check_plain_text_never_special(tok) -> None:
    specials = set(tok.special_ids.values())
    for text in ["<|end|>", "a<|end|>b", "".join(SPECIAL_TOKENS), " <|pad|> <|assistant|>"]:
        ids = tok.encode(text)
        assert not specials & set(ids), text
        assert tok.decode(ids) == text


# --------------------------------------------------------------------------------- byte
def test_byte_roundtrip_and_specials():
    tok = ByteTokenizer()
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert len(set(tok.special_ids.values())) == len(SPECIAL_TOKENS)
    assert tok.pad_id != tok.end_id
    check_plain_text_never_special(tok)
    ids = [tok.role_id("user")] + tok.encode("hi") + [tok.end_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|user|>hi<|end|>"


def test_byte_chat_template():
    check_chat_mask(ByteTokenizer())


def test_byte_load_and_dict():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(tokenizer_from_dict(ByteTokenizer().to_dict()), ByteTokenizer)
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'nope'"):
        tokenizer_from_dict({"kind": "nope"})


# ---------------------------------------------------------------------------------- BPE
def test_bpe_training_roundtrip(bpe):
    assert bpe.kind == "hf"
    assert bpe.vocab_size == 400
    assert sorted(bpe.special_ids) == sorted(SPECIAL_TOKENS)
    assert len(set(bpe.special_ids.values())) == len(SPECIAL_TOKENS)
    for s in SAMPLES + corpus(20, seed=1):
        assert bpe.decode(bpe.encode(s)) == s
    # It learned merges: the training text takes far fewer ids than bytes.
    text = " ".join(corpus(20, seed=2))
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert bpe.encode_batch(["the cat", "sat"]) == [bpe.encode("the cat"), bpe.encode("sat")]


def test_bpe_specials_and_chat(bpe):
    check_plain_text_never_special(bpe)
    check_chat_mask(bpe)
    ids = [bpe.role_id("assistant")] + bpe.encode("the cat") + [bpe.end_id]
    assert bpe.decode(ids) == "the cat"
    assert bpe.decode(ids, skip_special=False) == "<|assistant|>the cat<|end|>"


def test_bpe_train_from_files(tmp_path):
    files = []
    for i in range(2):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text("\n".join(corpus(200, seed=i)), encoding="utf-8")
    tok = train_bpe(files, vocab_size=350, show_progress=False)
    assert tok.vocab_size == 350
    assert tok.decode(tok.encode("the dog ran fast")) == "the dog ran fast"
    assert isinstance(train_bpe(str(files[0]), vocab_size=300, show_progress=False), HFTokenizer)
    with pytest.raises(TokenizerError, match="missing.txt: training file not found"):
        train_bpe([tmp_path / "missing.txt"], vocab_size=300)
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(["abc"], vocab_size=100)


def test_bpe_dict_and_file_roundtrip(bpe, tmp_path):
    d = bpe.to_dict()
    assert d["kind"] == "hf" and isinstance(d["json"], str)
    json.dumps(d)  # checkpoints store it as JSON-able data
    again = tokenizer_from_dict(d)
    assert isinstance(again, HFTokenizer) and again.special_ids == bpe.special_ids
    assert again.vocab_size == bpe.vocab_size
    text = "naïve cat <|end|> 東京"
    assert again.encode(text) == bpe.encode(text)
    check_plain_text_never_special(again)  # the safety flag is not in the JSON; it must be restored

    bpe.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert isinstance(loaded, HFTokenizer) and loaded.encode(text) == bpe.encode(text)

    # A raw Hugging Face tokenizer.json (no "kind") loads through the same entry point.
    bpe.tokenizer.save(str(tmp_path / "tokenizer.json"))
    raw = load_tokenizer(tmp_path / "tokenizer.json")
    assert raw.encode(text) == bpe.encode(text) and raw.special_ids == bpe.special_ids
    assert HFTokenizer.from_file(tmp_path).encode(text) == bpe.encode(text)  # a folder works too


def _gpt2_style_files(tmp_path):
    """A tiny byte-level BPE saved as GPT-2 ships it: vocab.json + merges.txt, <|endoftext|> last."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    vocab_path, merges_path = (tmp_path / p for p in tok.model.save(str(tmp_path)))
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    eot = len(vocab)
    vocab["<|endoftext|>"] = eot
    vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
    return tok, vocab_path, merges_path, eot


def test_vocab_merges_loading(tmp_path):
    ref, vocab_path, merges_path, eot = _gpt2_style_files(tmp_path)
    tok = HFTokenizer.from_vocab_merges(vocab_path, merges_path)
    assert tok.eot_id == eot  # reused, not added a second time
    assert tok.vocab_size == eot + len(SPECIAL_TOKENS)  # only the five chat tokens are new
    for s in SAMPLES + corpus(20, seed=3):
        assert tok.encode(s) == ref.encode(s).ids, s
        assert tok.decode(tok.encode(s)) == s
    check_plain_text_never_special(tok)
    check_chat_mask(tok)
    assert HFTokenizer.from_file(tmp_path).encode("the cat") == tok.encode("the cat")


def test_gpt2_tokenizer_json_reuses_endoftext(tmp_path):
    # GPT-2's tokenizer.json lists <|endoftext|> (the last vocab id) as an added special token.
    _, vocab_path, merges_path, eot = _gpt2_style_files(tmp_path)
    from tokenizers import AddedToken, Tokenizer, models

    raw = Tokenizer(models.BPE.from_file(str(vocab_path), str(merges_path)))
    raw.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.eot_id == eot
    assert tok.vocab_size == eot + len(SPECIAL_TOKENS)


# ------------------------------------------------------------------------------- errors
def _one_line(exc: pytest.ExceptionInfo, path) -> None:
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found") as e:
        load_tokenizer(tmp_path / "missing.json")
    _one_line(e, tmp_path / "missing.json")

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a JSON tokenizer file") as e:
        load_tokenizer(bad)
    _one_line(e, bad)

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json") as e:
        load_tokenizer(wrong)
    _one_line(e, wrong)

    with pytest.raises(TokenizerError, match="tokenizer file not found") as e:
        HFTokenizer.from_file(tmp_path / "nope" / "tokenizer.json")
    _one_line(e, tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json or vocab.json"):
        HFTokenizer.from_file(tmp_path)

    vocab = tmp_path / "vocab.json"
    merges = tmp_path / "merges.txt"
    with pytest.raises(TokenizerError, match="tokenizer file not found") as e:
        HFTokenizer.from_vocab_merges(vocab, merges)
    _one_line(e, vocab)
    vocab.write_text("[1, 2]")
    merges.write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="expected a JSON object") as e:
        HFTokenizer.from_vocab_merges(vocab, merges)
    _one_line(e, vocab)
    vocab.write_text(json.dumps({"a": 0, "b": 1}))
    merges.write_text("#version: 0.2\na c\n")  # merges a token the vocabulary lacks
    with pytest.raises(TokenizerError) as e:
        HFTokenizer.from_vocab_merges(vocab, merges)
    _one_line(e, merges)

    with pytest.raises(TokenizerError, match="no 'json'"):
        tokenizer_from_dict({"kind": "hf"})
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        tokenizer_from_dict({"kind": "hf", "json": "{}"})
