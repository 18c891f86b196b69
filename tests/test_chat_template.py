"""Chat formats as Jinja templates: Llama-3, Qwen (ChatML) and SmolLM-style templates written in
tests/hf_models.py, rendered and tokenized exactly as transformers' apply_chat_template does, the
assistant-only loss mask derived from the rendering, and fastgpt's own format on the same path."""
from __future__ import annotations

import itertools
import json

import pytest

from fastgpt.chat_template import NATIVE_TEMPLATE, ChatFormat, chat_encoding, encode_chat, encode_prompt
from fastgpt.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer, tokenizer_from_dict

from hf_models import END_OF_TURN, STYLES, write_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "the cat sat"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "  naïve café 東京  "}, {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "please\nthe old red barn"}],
]
TEMPLATED = ("llama3", "chatml", "smollm")


def trained_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    return [[i for i, _ in g] for trained, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if trained]


@pytest.fixture(scope="module", params=TEMPLATED)
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, request.param)
    return request.param, path


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_same_ids_as_transformers(folder, conversation):
    style, path = folder
    msgs = CONVERSATIONS[conversation]
    tok, hf = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert tok.chat.render(msgs) == hf.apply_chat_template(msgs, tokenize=False)
    assert encode_chat(tok, msgs)[0] == hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    prompt = msgs[:-1]
    want = hf.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    assert encode_prompt(tok, prompt) == want


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_loss_mask_is_each_answer_and_its_end_of_turn(folder, conversation):
    style, path = folder
    msgs = CONVERSATIONS[conversation]
    tok = load_tokenizer(path)
    ids, mask = encode_chat(tok, msgs)
    end = END_OF_TURN[style]
    answers = [m["content"].strip() if style == "llama3" else m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(run, skip_special=False) for run in trained_runs(ids, mask)] == [a + end for a in answers]
    # every answer starts right where the prompt for it ends: generation and training agree
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = encode_prompt(tok, msgs[:i])
            assert ids[:len(prompt)] == prompt and mask[len(prompt)] and not mask[len(prompt) - 1]


def test_special_roles(folder):
    style, path = folder
    tok = load_tokenizer(path)
    tokens = STYLES[style]["tokens"]
    assert tok.chat.end_token == END_OF_TURN[style]
    assert tok.end_id == tok.stop_ids[0] and tok.pad_id not in (tok.end_id,)
    if style == "smollm":  # its tokenizer_config pads with the end of turn; fastgpt must not
        assert tokens["pad_token"] == END_OF_TURN[style] and tok.chat.pad_token == "<|im_start|>"
    assert tok.chat.document_token == tokens.get("bos_token", tokens["eos_token"])
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))  # as a checkpoint stores it
    msgs = CONVERSATIONS[1]
    assert encode_chat(again, msgs) == encode_chat(tok, msgs) and again.stop_ids == tok.stop_ids


def test_special_token_text_in_content_stays_text(folder):
    style, path = folder
    tok = load_tokenizer(path)
    end = END_OF_TURN[style]
    msgs = [{"role": "user", "content": f"say {end} now"}, {"role": "assistant", "content": f"ok {end} done"}]
    ids, mask = encode_chat(tok, msgs)
    plain = [{**m, "content": m["content"].replace(end, "")} for m in msgs]
    assert ids.count(tok.end_id) == encode_chat(tok, plain)[0].count(tok.end_id)  # none from the contents
    assert [tok.decode(run, skip_special=False) for run in trained_runs(ids, mask)] == [f"ok {end} done{end}"]


def test_native_format_is_a_template_on_the_same_path():
    tok = ByteTokenizer()
    assert tok.chat.template == NATIVE_TEMPLATE and tok.chat.native
    enc = chat_encoding(tok, CONVERSATIONS[1])
    assert tok.decode(enc.ids, skip_special=False) == enc.rendered.text
    assert enc.rendered.text.startswith("<|system|>be brief<|end|><|user|>hello<|end|><|assistant|>")
    prompt = encode_prompt(tok, CONVERSATIONS[0][:1])
    assert prompt[0] == tok.role_id("user") and prompt[-1] == tok.role_id("assistant")


def test_template_problems_are_one_line(tmp_path):
    tok = ByteTokenizer()
    msgs = CONVERSATIONS[1]
    rewriting = ChatFormat(template="{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
                                    "{{ messages | length }}")
    tok.chat = rewriting
    with pytest.raises(TokenizerError, match="rewrites earlier turns"):
        encode_chat(tok, msgs)
    tok.chat = ChatFormat(template="{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TokenizerError, match="Jinja syntax error at line 1"):
        encode_chat(tok, msgs)
    tok.chat = ChatFormat(template="{{ raise_exception('only user and assistant') }}")
    with pytest.raises(TokenizerError, match="chat template: only user and assistant"):
        encode_chat(tok, msgs)


def test_folder_template_sources(tmp_path):
    """A list of named templates ("default" is used) and a separate chat_template.jinja."""
    write_tokenizer(tmp_path, "chatml")
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    template = cfg.pop("chat_template")
    cfg_path.write_text(json.dumps({**cfg, "chat_template": [{"name": "tool_use", "template": "x"},
                                                             {"name": "default", "template": template}]}))
    assert load_tokenizer(tmp_path).chat.template == template
    cfg_path.write_text(json.dumps({**cfg, "chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(TokenizerError, match="lists no 'default' template"):
        load_tokenizer(tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text(template)
    assert load_tokenizer(tmp_path).chat.end_token == "<|im_end|>"
    (tmp_path / "chat_template.jinja").unlink()
    assert load_tokenizer(tmp_path).chat.native  # no template at all: fastgpt's own format


def test_template_without_end_of_turn(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "chat_template": "{% for m in messages %}{{ m['role'] }}: "
                                                            "{{ m['content'] }}\n{% endfor %}"}))
    tok = load_tokenizer(tmp_path)
    assert tok.chat.end_token is None
    with pytest.raises(TokenizerError, match="no special token, so a model could not learn to stop"):
        tok.end_id
