"""GPT-2 import/export against `transformers` itself: same logits both ways, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from fastgpt.config import ModelConfig
from fastgpt.hf import HFModelError, load_hf_gpt2, resize_vocab, save_hf_gpt2
from fastgpt.model import GPT

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=64)
TOL = 1e-4


def hf_model(seed: int = 0, **overrides) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**{**SMALL, **overrides}, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # zero-initialised biases and unit LayerNorms would hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def ours_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


@pytest.fixture(scope="module")
def idx() -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_import_matches_transformers(tmp_path, idx, safe):
    ref = hf_model()
    ref.save_pretrained(tmp_path)
    if not safe:  # transformers 5 always writes safetensors; a .bin is what older GPT-2 uploads ship
        (tmp_path / "model.safetensors").unlink()
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model, cfg = load_hf_gpt2(tmp_path)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size) == (2, 64, 4, 101, 64)
    assert model.lm_head.weight is model.wte.weight
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_import_without_transformer_prefix(tmp_path, idx):
    from safetensors.torch import save_file

    ref = hf_model(seed=3)
    ref.save_pretrained(tmp_path)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in ref.state_dict().items()
          if k != "lm_head.weight"}
    # The original OpenAI uploads also carry each layer's causal mask as a tensor.
    sd.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(SMALL["n_layer"])})
    sd.update({f"h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(SMALL["n_layer"])})
    save_file(sd, str(tmp_path / "model.safetensors"))
    model, _ = load_hf_gpt2(tmp_path)
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_export_loads_in_transformers(tmp_path, idx):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=2, n_head=4, n_embd=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_hf_gpt2(model, tmp_path / "export")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    assert (ours_logits(model, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL

    back, cfg = load_hf_gpt2(tmp_path / "export")
    assert cfg == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_import_then_export_roundtrip_through_transformers(tmp_path, idx):
    ref = hf_model(seed=5, n_inner=96, layer_norm_epsilon=1e-6)
    ref.save_pretrained(tmp_path / "a")
    model, cfg = load_hf_gpt2(tmp_path / "a")
    assert cfg.hidden_dim == 96 and cfg.norm_eps == 1e-6
    save_hf_gpt2(model, tmp_path / "b")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    assert (hf_logits(again, idx) - hf_logits(ref, idx)).abs().max().item() <= TOL


def test_imported_model_trains_one_step(tmp_path, idx):
    hf_model().save_pretrained(tmp_path)
    model, _ = load_hf_gpt2(tmp_path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = model.wte.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.wte.weight)
    assert model.lm_head.weight is model.wte.weight  # still tied after the step


def test_vocab_resize_keeps_old_logits(tmp_path, idx):
    ref = hf_model()
    ref.save_pretrained(tmp_path)
    model, cfg = load_hf_gpt2(tmp_path, vocab_size=128)
    assert cfg.vocab_size == 128 and model.wte.weight.shape == (128, 64)
    assert model.lm_head.weight is model.wte.weight
    logits = ours_logits(model, idx)
    assert logits.shape[-1] == 128
    assert (logits[..., :101] - hf_logits(ref, idx)).abs().max().item() <= TOL
    with pytest.raises(HFModelError, match="smaller"):
        resize_vocab(model, 64)


# ------------------------------------------------------------------------------ errors
def test_missing_folder_and_files(tmp_path):
    with pytest.raises(HFModelError, match="model folder not found"):
        load_hf_gpt2(tmp_path / "nope")
    with pytest.raises(HFModelError, match=r"config\.json not found"):
        load_hf_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **SMALL}))
    with pytest.raises(HFModelError, match="no model.safetensors or pytorch_model.bin"):
        load_hf_gpt2(tmp_path)


def test_not_gpt2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 101}))
    with pytest.raises(HFModelError, match="model_type 'llama' is not GPT-2") as e:
        load_hf_gpt2(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_bad_activation_and_shape(tmp_path):
    hf_model().save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(HFModelError, match="unsupported activation_function 'relu'"):
        load_hf_gpt2(tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(HFModelError, match=r"model\.safetensors: tensor '.*' has shape") as e:
        load_hf_gpt2(tmp_path)
    assert "\n" not in str(e.value)


def test_damaged_weights(tmp_path):
    hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HFModelError, match=r"model\.safetensors: cannot read weights"):
        load_hf_gpt2(tmp_path)


def test_export_refuses_modern_layout(tmp_path):
    model = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=1, n_head=4, n_embd=64,
                            norm="rmsnorm", mlp="swiglu", position="rope", bias=False))
    with pytest.raises(HFModelError, match="only the GPT-2 layout is exportable"):
        save_hf_gpt2(model, tmp_path)
    gqa = GPT(ModelConfig(vocab_size=101, block_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64))
    with pytest.raises(HFModelError, match="grouped-query"):
        save_hf_gpt2(gqa, tmp_path)


def test_export_with_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")
    from fastgpt.tokenizer_hf import HFTokenizer, train_bpe

    texts = [f"line {i} of some text about cats and dogs" for i in range(200)]
    tok = train_bpe(texts, vocab_size=300, show_progress=False)
    model = GPT(ModelConfig(vocab_size=320, block_size=64, n_layer=1, n_head=4, n_embd=64))
    save_hf_gpt2(model, tmp_path, tokenizer=tok)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == tok.eot_id
    gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert gen.eos_token_id == [tok.eot_id, tok.end_id] and gen.pad_token_id == tok.pad_id
    again = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("cats and dogs") == tok.encode("cats and dogs")
    small = GPT(ModelConfig(vocab_size=200, block_size=64, n_layer=1, n_head=4, n_embd=64))
    with pytest.raises(HFModelError, match="tokenizer has 300 ids but the model only 200"):
        save_hf_gpt2(small, tmp_path / "small", tokenizer=tok)
