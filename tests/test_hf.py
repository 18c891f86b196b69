"""Hugging Face import/export against `transformers` itself, for GPT-2 and the Llama family
(Llama 3.1-style with llama3 RoPE scaling, SmolLM2-style tied, Qwen2 with q/k/v biases,
Mistral): same fp32 logits, same greedy tokens, export -> transformers reload, clear errors."""
from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from fastgpt.config import ModelConfig
from fastgpt.engine import SamplingParams, generate
from fastgpt.hf import HFModelError, load_hf_model, read_hf_config, resize_vocab, save_hf
from fastgpt.model import GPT, ScalarModel
from fastgpt.tokenizer import encode_chat, encode_prompt, load_tokenizer

from hf_models import ARCHITECTURES, END_OF_TURN, hf_causal_lm, write_model

transformers = pytest.importorskip("transformers")

TOL = 1e-4
CHAT = [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "hello world"}]


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def ours_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


def random_ids(vocab: int, shape=(2, 23), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def imported(request, tmp_path_factory):
    """(architecture, transformers reference, its folder, fastgpt model) per architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = write_model(folder, request.param)
    model, _ = load_hf_model(folder)
    return request.param, ref, folder, model.eval()


# ------------------------------------------------------------------------------ import
def test_import_matches_transformers(imported):
    arch, ref, folder, model = imported
    cfg = model.config
    idx = random_ids(cfg.vocab_size)
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL
    assert cfg.tie_embeddings == ref.config.tie_word_embeddings
    assert (model.lm_head.weight is model.wte.weight) == cfg.tie_embeddings
    if arch != "gpt2":
        assert (cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.hidden_dim, cfg.norm_eps) == (60, 6, 2, 94, 1e-5)
        assert cfg.qkv_bias == (arch == "qwen2") and not cfg.bias
        assert cfg.rope_scaling == ("llama3" if arch == "llama" else "none")
        assert cfg.rope_theta == {"llama": 5000.0, "smollm": 1e5, "qwen2": 1e6, "mistral": 10000.0}[arch]


def test_sharded_import(tmp_path):
    ref = write_model(tmp_path, "llama", seed=4, shard=True)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model, _ = load_hf_model(tmp_path)
    idx = random_ids(model.config.vocab_size)
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_greedy_generation_matches_transformers(imported):
    """fastgpt's KV-cache engine (two prompts packed in one prefill) against transformers'
    generate, one prompt at a time, token for token."""
    _, ref, _, model = imported
    prompts = [random_ids(model.config.vocab_size, (1, 9), seed=2)[0].tolist(),
               random_ids(model.config.vocab_size, (1, 4), seed=3)[0].tolist()]
    ours = generate(model, prompts, SamplingParams(max_new_tokens=20, temperature=0.0))
    for p, g in zip(prompts, ours):
        want = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                            pad_token_id=0, min_new_tokens=20)[0, len(p):].tolist()
        assert g.tokens == want


def test_chat_template_and_stop_tokens(imported):
    arch, _, folder, _ = imported
    style = {"gpt2": "chatml", "llama": "llama3", "smollm": "smollm", "qwen2": "chatml", "mistral": "mistral"}[arch]
    tok = load_tokenizer(folder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat.end_token == END_OF_TURN[style] and tok.end_id in tok.stop_ids
    assert tok.pad_id != tok.end_id  # SmolLM2's own pad token is its end of turn: fastgpt picks another
    ids, mask = encode_chat(tok, CHAT)
    assert ids == hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert encode_prompt(tok, CHAT[:1]) == hf_tok.apply_chat_template(CHAT[:1], tokenize=True, return_dict=True,
                                                                      add_generation_prompt=True)["input_ids"]
    runs = [[i for i, _ in group] for trained, group in itertools.groupby(zip(ids, mask), key=lambda x: x[1])
            if trained]
    assert [tok.decode(run, skip_special=False).strip() for run in runs] == [
        m["content"] + tok.chat.end_token for m in CHAT if m["role"] == "assistant"]


# ------------------------------------------------------------------------------ export
def test_export_reloads_in_transformers(imported, tmp_path):
    arch, ref, folder, model = imported
    tok = load_tokenizer(folder)
    save_hf(model, tmp_path, tokenizer=tok)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    want = {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}.get(arch, "LlamaForCausalLM")
    assert type(again).__name__ == want
    idx = random_ids(model.config.vocab_size)
    assert (hf_logits(again, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"] == encode_chat(tok, CHAT)[0]
    gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert list(tok.stop_ids) == gen.eos_token_id and gen.pad_token_id == tok.pad_id
    back, cfg = load_hf_model(tmp_path)  # and back into fastgpt, bit for bit
    assert cfg == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_reward_model_exports_as_sequence_classifier(tmp_path, arch):
    write_model(tmp_path / "src", arch, seed=5)
    gpt, cfg = load_hf_model(tmp_path / "src")
    tok = load_tokenizer(tmp_path / "src")
    rm = ScalarModel(cfg)
    rm.gpt.load_state_dict(gpt.state_dict())
    torch.nn.init.normal_(rm.head.bias)
    save_hf(rm.eval(), tmp_path / "rm", tokenizer=tok, reward={"offset": 0.5, "scale": 2.0})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm",
                                                                          attn_implementation="eager").eval()
    seqs = [encode_chat(tok, CHAT)[0], encode_chat(tok, CHAT[:2])[0]]
    width = max(map(len, seqs))  # right-padded: transformers scores each row's last non-pad token
    batch = torch.tensor([s + [tok.pad_id] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        theirs = hf(batch).logits[:, 0]
        ours = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    extra = json.loads((tmp_path / "rm" / "config.json").read_text())["fastgpt_reward"]
    assert extra == {"score_bias": pytest.approx(float(rm.head.bias.detach())), "offset": 0.5, "scale": 2.0}
    assert (theirs + extra["score_bias"] - ours).abs().max().item() <= TOL


def test_byte_tokenizer_model_exports_with_equivalent_tokenizer(tmp_path):
    from fastgpt.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    model = GPT(ModelConfig(vocab_size=320, block_size=64, n_layer=1, n_head=4, n_embd=32, norm="rmsnorm",
                            mlp="swiglu", position="rope", bias=False, tie_embeddings=False))
    save_hf(model, tmp_path, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello", "naïve café 東京 🙂", "<|end|> typed"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"][:len(tok.encode(text))] in (
            tok.encode(text), hf_tok(text, add_special_tokens=False)["input_ids"])
    assert hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"] == encode_chat(tok, CHAT)[0]
    idx = random_ids(320)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf_logits(again, idx) - ours_logits(model, idx)).abs().max().item() <= TOL


# --------------------------------------------------------------------- GPT-2 specifics
def test_gpt2_bin_and_unprefixed_weights(tmp_path):
    from safetensors.torch import save_file
    ref = write_model(tmp_path, "gpt2", seed=3)
    idx = random_ids(ref.config.vocab_size)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")  # what older GPT-2 uploads ship
    model, _ = load_hf_model(tmp_path)
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL
    (tmp_path / "pytorch_model.bin").unlink()
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    # The original OpenAI uploads also carry each layer's causal mask as a tensor.
    sd.update({f"h.{i}.attn.bias": torch.ones(1, 1, 96, 96).tril() for i in range(3)})
    sd.update({f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(3)})
    save_file(sd, str(tmp_path / "model.safetensors"))
    model, _ = load_hf_model(tmp_path)
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_imported_model_trains_one_step(imported):
    _, _, folder, _ = imported
    model, _ = load_hf_model(folder)
    model.train()
    idx = random_ids(model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = model.wte.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.wte.weight)
    assert (model.lm_head.weight is model.wte.weight) == model.config.tie_embeddings


def test_vocab_resize_keeps_old_logits(tmp_path):
    ref = write_model(tmp_path, "qwen2")
    V = ref.config.vocab_size
    model, cfg = load_hf_model(tmp_path, vocab_size=V + 17)
    assert cfg.vocab_size == V + 17 and model.lm_head.weight is model.wte.weight
    idx = random_ids(V)
    logits = ours_logits(model, idx)
    assert logits.shape[-1] == V + 17
    assert (logits[..., :V] - hf_logits(ref, idx)).abs().max().item() <= TOL
    with pytest.raises(HFModelError, match="smaller"):
        resize_vocab(model, 64)


# ------------------------------------------------------------------------------ errors
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(HFModelError, match="model folder not found"):
        load_hf_model(tmp_path / "nope")
    with pytest.raises(HFModelError, match=r"config\.json not found"):
        load_hf_model(tmp_path)
    hf_causal_lm("gpt2", 101).config.to_json_file(tmp_path / "config.json")
    with pytest.raises(HFModelError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_model(tmp_path)


def edited_config(tmp_path, arch: str, **changes) -> str:
    """Write ``arch``'s random model, then change config.json; returns the one-line error."""
    write_model(tmp_path, arch)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(HFModelError) as e:
        load_hf_model(tmp_path)
    assert "\n" not in str(e.value) and str(path.parent) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("arch, changes, message", [
    ("llama", {"model_type": "mixtral"}, "model_type 'mixtral' is not supported"),
    ("qwen2", {"num_experts": 8}, "num_experts=8 is not supported"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_scaling type 'yarn' is not supported"),
    ("llama", {"head_dim": 16}, "head_dim=16 is not hidden_size / num_attention_heads"),
    ("llama", {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ("mistral", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("gpt2", {"activation_function": "relu"}, "unsupported activation_function 'relu'"),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    ("gpt2", {"n_embd": 36}, "tensor shapes .* do not match config.json"),
])
def test_unsupported_settings_are_named(tmp_path, arch, changes, message):
    assert re.search(message, edited_config(tmp_path, arch, **changes))


def test_sliding_window_in_use_caps_the_context(tmp_path):
    """Within the window, sliding-window attention is full causal attention: the import's
    context becomes the window, and logits there still match."""
    ref = write_model(tmp_path / "m", "mistral", sliding_window=40)
    model, cfg = load_hf_model(tmp_path / "m")
    assert cfg.block_size == 40
    idx = random_ids(cfg.vocab_size, (1, 40))
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL
    write_model(tmp_path / "q", "qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=1)
    assert read_hf_config(tmp_path / "q")[0].block_size == 24
    write_model(tmp_path / "off", "qwen2", use_sliding_window=False, sliding_window=24)
    assert read_hf_config(tmp_path / "off")[0].block_size == 96


def test_damaged_weights(tmp_path):
    write_model(tmp_path, "llama")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HFModelError, match=r"model\.safetensors: cannot read weights"):
        load_hf_model(tmp_path)


def test_export_refuses_layouts_without_an_hf_equivalent(tmp_path):
    mixed = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=1, n_head=4, n_embd=64, position="rope"))
    with pytest.raises(HFModelError, match="model.norm='layernorm' cannot be exported as llama"):
        save_hf(mixed, tmp_path)
    gqa = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64))
    with pytest.raises(HFModelError, match="grouped-query"):
        save_hf(gqa, tmp_path)


def test_export_refuses_a_larger_tokenizer(tmp_path):
    from fastgpt.tokenizer import ByteTokenizer
    small = GPT(ModelConfig(vocab_size=200, block_size=64, n_layer=1, n_head=4, n_embd=64))
    with pytest.raises(HFModelError, match="tokenizer has 262 ids but the model only 200"):
        save_hf(small, tmp_path / "small", tokenizer=ByteTokenizer())
