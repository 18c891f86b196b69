"""Hugging Face GPT-2 import and export.

Lets a run start from published GPT-2 weights (``gpt2`` ... ``gpt2-xl`` downloaded by the user
into a local folder) and lets a fastgpt model leave the project as a folder that
``transformers.GPT2LMHeadModel.from_pretrained`` loads.  Only the GPT-2 layout maps one-to-one
(LayerNorm, tanh GELU, learned positions, biases, multi-head attention); the modern layout has
no GPT-2 equivalent and is refused with a one-line error.  Nothing here downloads anything, and
``transformers`` itself is not needed: the files are read with ``safetensors`` / ``torch``.
"""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .errors import FastGPTError
from .model import GPT
from .tokenizer import Tokenizer


class HFModelError(FastGPTError, ValueError):
    """A Hugging Face model folder that cannot be imported, or a model that cannot be exported."""


# GPT-2 calls the tanh approximation by several names; the exact erf GELU would change outputs.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Per-layer tensors: fastgpt name -> (GPT-2 name, stored as Conv1D (in, out) so transposed).
_LAYER_MAP = {
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "mlp.up.weight": ("mlp.c_fc.weight", True), "mlp.up.bias": ("mlp.c_fc.bias", False),
    "mlp.down.weight": ("mlp.c_proj.weight", True), "mlp.down.bias": ("mlp.c_proj.bias", False),
}
_TOP_MAP = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight",
            "norm_f.weight": "ln_f.weight", "norm_f.bias": "ln_f.bias"}
# Old GPT-2 checkpoints store the causal mask as buffers; fastgpt builds its own.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# ----------------------------------------------------------------------------- import
def _read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFModelError(f"{cfg_path}: config.json not found (expected a Hugging Face model folder)")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFModelError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFModelError(f"{cfg_path}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise HFModelError(f"{cfg_path}: model_type {model_type!r} is not GPT-2 (expected 'gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise HFModelError(f"{cfg_path}: unsupported activation_function {act!r} "
                           f"(fastgpt's MLP is tanh GELU: {', '.join(_TANH_GELU)})")
    # These change the attention maths in ways fastgpt's kernels do not reproduce.
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise HFModelError(f"{cfg_path}: non-standard attention scaling is not supported")
    if hf.get("add_cross_attention", False):
        raise HFModelError(f"{cfg_path}: cross-attention GPT-2 models are not supported")
    try:
        n_embd = int(hf["n_embd"])
        n_inner = int(hf.get("n_inner") or 4 * n_embd)
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]), block_size=int(hf["n_positions"]),
            n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=n_embd,
            mlp_hidden=0 if n_inner == 4 * n_embd else n_inner,  # 0: ModelConfig's own default
            norm="layernorm", mlp="gelu", position="learned", bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            # GPT-2's dropouts (0.1) are pre-training settings; fine-tuning here starts without.
            dropout=0.0,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise HFModelError(f"{cfg_path}: missing GPT-2 config key {e.args[0]!r}") from None
    except (TypeError, ValueError, ConfigError) as e:
        raise HFModelError(f"{cfg_path}: invalid GPT-2 config ({e})") from None
    return cfg, hf


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        # weights_only: a .bin is a pickle, and a downloaded pickle must not run code.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFModelError(f"{path}: cannot read weights ({first})") from None
    except Exception as e:  # safetensors raises its own error type
        raise HFModelError(f"{path}: cannot read weights ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise HFModelError(f"{path}: expected a state dict of tensors")
    return sd


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of the folder (single file or sharded via an index) and the file they name."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_tensor_file(folder / name), folder / name
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise HFModelError(f"{index}: not a valid weight index") from None
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise HFModelError(f"{folder / shard}: shard named in {index.name} not found")
                sd.update(_load_tensor_file(folder / shard))
            return sd, index
    raise HFModelError(f"{folder}: no model.safetensors or pytorch_model.bin found")


def load_hf_gpt2(path: str | Path, *, vocab_size: int | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelConfig]:
    """A fastgpt :class:`GPT` holding the weights of a local Hugging Face GPT-2 folder.

    ``vocab_size`` larger than the checkpoint's pads the embedding with rows set to the mean
    embedding, so tokens added for the chat template start neutral and old logits are unchanged.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise HFModelError(f"{folder}: model folder not found")
    cfg, _ = _read_config(folder)
    raw, source = _read_weights(folder)

    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in raw.items()}
    lm_head = sd.pop("lm_head.weight", None)
    for k in [k for k in sd if k.endswith(_IGNORED_SUFFIXES)]:
        del sd[k]

    out: dict[str, torch.Tensor] = {}
    wanted = dict(_TOP_MAP)
    for i in range(cfg.n_layer):
        for ours, (theirs, _) in _LAYER_MAP.items():
            wanted[f"blocks.{i}.{ours}"] = f"h.{i}.{theirs}"
    transposed = {f"h.{i}.{theirs}" for i in range(cfg.n_layer)
                  for theirs, t in _LAYER_MAP.values() if t}
    missing = [theirs for theirs in wanted.values() if theirs not in sd]
    if missing:
        raise HFModelError(f"{source}: missing GPT-2 tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(sd) - set(wanted.values()))
    if unexpected:
        raise HFModelError(f"{source}: unexpected tensor {unexpected[0]!r} (not a GPT2LMHeadModel?)")

    with torch.device("meta"):
        model = GPT(cfg)
    expected = model.state_dict()
    for ours, theirs in wanted.items():
        t = sd[theirs]
        if theirs in transposed:
            t = t.t()
        if tuple(t.shape) != tuple(expected[ours].shape):
            shape = tuple(sd[theirs].shape)
            want = tuple(expected[ours].shape[::-1] if theirs in transposed else expected[ours].shape)
            raise HFModelError(f"{source}: tensor {theirs!r} has shape {shape}, config.json implies {want}")
        out[ours] = t.to(dtype).contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        if lm_head is None:
            raise HFModelError(f"{source}: tie_word_embeddings is false but lm_head.weight is missing")
        if tuple(lm_head.shape) != tuple(expected["lm_head.weight"].shape):
            raise HFModelError(f"{source}: tensor 'lm_head.weight' has shape {tuple(lm_head.shape)}, "
                               f"config.json implies {tuple(expected['lm_head.weight'].shape)}")
        out["lm_head.weight"] = lm_head.to(dtype).contiguous()

    # Built on the meta device so a 1.5B model is not randomly initialised only to be overwritten.
    model.load_state_dict(out, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the shared Parameter with two
        model.lm_head.weight = model.wte.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor model.py creates that GPT-2 has no counterpart for
        raise HFModelError(f"{source}: no GPT-2 weight for fastgpt tensor {leftover[0]!r}")
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        model, cfg = resize_vocab(model, vocab_size)
    return model, cfg


def resize_vocab(model: GPT, vocab_size: int) -> tuple[GPT, ModelConfig]:
    """Grow the token embedding (and an untied head) to ``vocab_size`` rows, in place.

    New rows are the mean of the existing ones: near what the model already predicts, instead of
    random vectors that would dominate the softmax of a trained model.
    """
    cfg = model.config
    old = cfg.vocab_size
    if vocab_size < old:
        raise HFModelError(f"vocab_size {vocab_size} is smaller than the model's {old}; shrinking drops tokens")
    if vocab_size == old:
        return model, cfg

    def grow(w: torch.Tensor) -> torch.nn.Parameter:
        extra = w.detach().mean(0, keepdim=True).expand(vocab_size - old, -1)
        return torch.nn.Parameter(torch.cat([w.detach(), extra], 0))

    model.wte.weight = grow(model.wte.weight)
    model.wte.num_embeddings = vocab_size
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    else:
        model.lm_head.weight = grow(model.lm_head.weight)
    model.lm_head.out_features = vocab_size
    cfg.vocab_size = vocab_size
    return model, cfg


# ----------------------------------------------------------------------------- export
def _check_exportable(cfg: ModelConfig) -> None:
    wrong = {
        "norm": (cfg.norm, "layernorm"), "mlp": (cfg.mlp, "gelu"),
        "position": (cfg.position, "learned"), "bias": (cfg.bias, True),
        "tie_embeddings": (cfg.tie_embeddings, True),
    }
    for name, (have, need) in wrong.items():
        if have != need:
            raise HFModelError(f"model.{name}={have!r} cannot be exported as GPT-2 (needs {need!r}); "
                               "only the GPT-2 layout is exportable")
    if cfg.kv_heads != cfg.n_head:
        raise HFModelError(f"model.n_kv_head={cfg.n_kv_head} cannot be exported as GPT-2 "
                           "(grouped-query attention has no GPT-2 equivalent)")


def save_hf_gpt2(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads.

    With a tokenizer, its end-of-text id becomes GPT-2's bos/eos id, ``generation_config.json``
    stops generation at <|end|> as well, and a Hugging Face BPE is written next to the weights as
    ``tokenizer.json``.  Returns the folder.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the real module
    cfg: ModelConfig = model.config
    _check_exportable(cfg)
    eos = None
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise HFModelError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                               f"{cfg.vocab_size}; it was not trained with this tokenizer")
        eos = tokenizer.eot_id
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_MAP.items():
        out[f"transformer.{theirs}"] = sd[ours]
    for i in range(cfg.n_layer):
        for ours, (theirs, transpose) in _LAYER_MAP.items():
            t = sd[f"blocks.{i}.{ours}"]
            out[f"transformer.h.{i}.{theirs}"] = t.t() if transpose else t
    # fp32 on disk: the master weights exactly, whatever autocast dtype training ran in.
    # lm_head is tied, so (as transformers does) it is not stored: safetensors refuses shared tensors.
    out = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})

    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.hidden_dim == 4 * cfg.n_embd else cfg.hidden_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,  # fastgpt has no attention dropout
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        # A chat model ends its turn with <|end|>, so generate() must stop there too.
        gen = {"bos_token_id": eos, "eos_token_id": [eos, tokenizer.end_id], "pad_token_id": tokenizer.pad_id}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    backend = getattr(tokenizer, "tokenizer", None)
    if tokenizer is not None and tokenizer.kind == "hf" and backend is not None:
        backend.save(str(folder / "tokenizer.json"))
    return folder
