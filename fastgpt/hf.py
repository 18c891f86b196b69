"""Hugging Face import and export: GPT-2 and the Llama family (Llama 2/3.x, SmolLM2, Qwen2/2.5, Mistral).

Import reads a local model folder (``config.json`` and single or sharded safetensors / .bin
weights) into a fastgpt :class:`~fastgpt.model.GPT`; export writes a folder that
``transformers``' ``from_pretrained`` loads, with the tokenizer files.  Nothing here downloads
anything, and ``transformers`` itself is not needed: the files are read with ``safetensors`` /
``torch``.

The layouts map one to one.  GPT-2: LayerNorm, tanh GELU, learned positions, biases, Conv1D
weights stored transposed.  Llama family: RMSNorm, SwiGLU, RoPE in the rotate-half layout (as
fastgpt's), grouped-query attention; fastgpt fuses q/k/v into one projection and the gate and up
projections into one, so those are concatenated on import and split on export.  Qwen2 adds q/k/v
biases (``qkv_bias``); Llama 3.1+ its RoPE scaling (``rope_scaling="llama3"``).  A Mistral or
Qwen2 sliding window is exact full attention for sequences no longer than the window, so the
imported context is capped at the window.  Anything else that would change the maths (other
activations, MoE, other RoPE scalings, partial rotary, quantized weights, ...) is refused with one
line naming the config field.  A Llama-family model is exported as Llama, or as Qwen2 when it has
q/k/v biases; a reward model (``ScalarModel``) as ``...ForSequenceClassification``.
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
from .model import GPT, ScalarModel, rope_tables
from .tokenizer import Tokenizer


class HFModelError(FastGPTError, ValueError):
    """A Hugging Face model folder that cannot be imported, or a model that cannot be exported."""


LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2", *LLAMA_FAMILY)
# GPT-2 calls the tanh approximation by several names; the exact erf GELU would change outputs.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Where each family keeps its backbone, and the causal-LM / sequence-classification classes.
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mistral": "model.", "qwen2": "model."}
_CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
            "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
            "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")}
# Buffers some checkpoints store that fastgpt derives itself (causal masks, RoPE frequencies).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
# Config keys that mean a layout fastgpt does not have (mixture of experts, quantized weights).
_REFUSED_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
                 "quantization_config")


# ---------------------------------------------------------------------------- configs
def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise HFModelError(f"{path}: expected a JSON object")
    return value


def read_hf_config(folder: str | Path) -> tuple[ModelConfig, str]:
    """The fastgpt config of a Hugging Face model folder and its ``model_type``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFModelError(f"{path}: config.json not found (expected a Hugging Face model folder)")
    hf = _read_json(path)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise HFModelError(f"{path}: model_type {model_type!r} is not supported (expected one of "
                           f"{', '.join(SUPPORTED)})")
    for key in _REFUSED_KEYS:
        if hf.get(key):
            raise HFModelError(f"{path}: {key}={hf[key]!r} is not supported (dense, unquantized models only)")
    try:
        fields = _gpt2_fields(hf, path) if model_type == "gpt2" else _llama_fields(hf, path, model_type)
        return ModelConfig(**fields), model_type
    except KeyError as e:
        raise HFModelError(f"{path}: missing config key {e.args[0]!r}") from None
    except (TypeError, ValueError, ConfigError) as e:
        raise HFModelError(f"{path}: invalid config ({e})") from None


def _gpt2_fields(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _TANH_GELU:
        raise HFModelError(f"{path}: unsupported activation_function {act!r} "
                           f"(fastgpt's MLP is tanh GELU: {', '.join(_TANH_GELU)})")
    # These change the attention maths in ways fastgpt's kernels do not reproduce.
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise HFModelError(f"{path}: non-standard attention scaling is not supported")
    if hf.get("add_cross_attention", False):
        raise HFModelError(f"{path}: cross-attention GPT-2 models are not supported")
    n_embd = int(hf["n_embd"])
    n_inner = int(hf.get("n_inner") or 4 * n_embd)
    return dict(vocab_size=int(hf["vocab_size"]), block_size=int(hf["n_positions"]), n_layer=int(hf["n_layer"]),
                n_head=int(hf["n_head"]), n_embd=n_embd,
                mlp_hidden=0 if n_inner == 4 * n_embd else n_inner,  # 0: ModelConfig's own default
                norm="layernorm", mlp="gelu", position="learned", bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                # GPT-2's dropouts (0.1) are pre-training settings; fine-tuning here starts without.
                dropout=0.0, norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))


def _rope_fields(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """RoPE base and scaling from either spelling: ``rope_theta`` + ``rope_scaling`` (checkpoints
    on the Hub) or ``rope_parameters`` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise HFModelError(f"{path}: partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
    if kind == "default":
        return dict(rope_theta=theta)
    if kind == "linear":
        return dict(rope_theta=theta, rope_scaling="linear", rope_factor=float(merged["factor"]))
    if kind == "llama3":
        return dict(rope_theta=theta, rope_scaling="llama3", rope_factor=float(merged["factor"]),
                    rope_low_freq_factor=float(merged["low_freq_factor"]),
                    rope_high_freq_factor=float(merged["high_freq_factor"]),
                    rope_original_context=int(merged.get("original_max_position_embeddings",
                                                         hf["max_position_embeddings"])))
    raise HFModelError(f"{path}: rope_scaling type {kind!r} is not supported (expected default, linear or llama3)")


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The attention window the model actually uses, or None (full attention in every layer)."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        windowed = ("sliding_attention" in layer_types if layer_types else
                    hf.get("use_sliding_window", False) and hf.get("max_window_layers", 0) < hf["num_hidden_layers"])
        return int(window) if windowed else None
    return int(window) if model_type == "mistral" else None


def _llama_fields(hf: dict[str, Any], path: Path, model_type: str) -> dict[str, Any]:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFModelError(f"{path}: hidden_act={act!r} is not supported (the Llama family's SwiGLU uses 'silu')")
    n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * n_head != n_embd:
        raise HFModelError(f"{path}: head_dim={head_dim} is not hidden_size / num_attention_heads = "
                           f"{n_embd / n_head:g} (not supported)")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:  # fastgpt's `bias` switches both on together
        raise HFModelError(f"{path}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                           "(both or neither)")
    context = int(hf["max_position_embeddings"])
    window = _sliding_window(hf, model_type)
    if window is not None:  # within the window, sliding-window attention is full causal attention
        context = min(context, window)
    return dict(vocab_size=int(hf["vocab_size"]), block_size=context, n_layer=int(hf["num_hidden_layers"]),
                n_head=n_head, n_kv_head=int(hf.get("num_key_value_heads") or n_head), n_embd=n_embd,
                mlp_hidden=int(hf["intermediate_size"]), norm="rmsnorm", mlp="swiglu", position="rope",
                bias=attention_bias, qkv_bias=model_type == "qwen2",
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **_rope_fields(hf, path))


# ----------------------------------------------------------------------- tensor names
def _tensor_layout(cfg: ModelConfig, arch: str) -> dict[str, tuple[list[tuple[str, int]], bool]]:
    """fastgpt tensor -> ([(HF tensor without the backbone prefix, its rows)], stored transposed).

    Several HF tensors are concatenated along rows into one fastgpt tensor (q/k/v, gate/up);
    rows of -1 mean the whole tensor. Biases are listed whether or not the model has them.
    """
    layout: dict[str, tuple[list[tuple[str, int]], bool]] = {}
    if arch == "gpt2":
        layer = {"norm1": ("ln_1", False), "attn.qkv": ("attn.c_attn", True), "attn.proj": ("attn.c_proj", True),
                 "norm2": ("ln_2", False), "mlp.up": ("mlp.c_fc", True), "mlp.down": ("mlp.c_proj", True)}
        top = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight", "norm_f.weight": "ln_f.weight",
               "norm_f.bias": "ln_f.bias"}
        layout.update({ours: ([(theirs, -1)], False) for ours, theirs in top.items()})
        for i in range(cfg.n_layer):
            for ours, (theirs, transposed) in layer.items():
                layout[f"blocks.{i}.{ours}.weight"] = ([(f"h.{i}.{theirs}.weight", -1)], transposed)
                layout[f"blocks.{i}.{ours}.bias"] = ([(f"h.{i}.{theirs}.bias", -1)], False)
        return layout
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    layer_parts = {"norm1": [("input_layernorm", -1)],
                   "attn.qkv": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
                   "attn.proj": [("self_attn.o_proj", -1)], "norm2": [("post_attention_layernorm", -1)],
                   "mlp.up": [("mlp.gate_proj", hidden), ("mlp.up_proj", hidden)], "mlp.down": [("mlp.down_proj", -1)]}
    layout["wte.weight"] = ([("embed_tokens.weight", -1)], False)
    layout["norm_f.weight"] = ([("norm.weight", -1)], False)
    for i in range(cfg.n_layer):
        for ours, parts in layer_parts.items():
            for kind in ("weight", "bias"):
                layout[f"blocks.{i}.{ours}.{kind}"] = ([(f"layers.{i}.{p}.{kind}", n) for p, n in parts], False)
    return layout


# ----------------------------------------------------------------------------- import
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


def load_hf_model(path: str | Path, *, vocab_size: int | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[GPT, ModelConfig]:
    """A fastgpt :class:`GPT` holding the weights of a local Hugging Face model folder.

    ``vocab_size`` larger than the checkpoint's pads the embedding with rows set to the mean
    embedding, so tokens added for the chat template start neutral and old logits are unchanged.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise HFModelError(f"{folder}: model folder not found")
    cfg, arch = read_hf_config(folder)
    raw, source = _read_weights(folder)
    prefix = _PREFIX[arch]
    sd = {k.removeprefix(prefix): v for k, v in raw.items() if not k.endswith(_IGNORED_SUFFIXES)}
    lm_head = sd.pop("lm_head.weight", None)

    # Built on the meta device so an 8B model is not randomly initialised only to be overwritten.
    with torch.device("meta"):
        model = GPT(cfg)
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for ours, (parts, transposed) in _tensor_layout(cfg, arch).items():
        if ours not in expected:  # a bias this configuration does not have
            continue
        missing = [name for name, _ in parts if name not in sd]
        if missing:
            raise HFModelError(f"{source}: missing tensor {prefix}{missing[0]!r} for the {arch} layout of config.json")
        pieces = [sd[name].t() if transposed else sd[name] for name, _ in parts]
        used.update(name for name, _ in parts)
        t = torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0]
        if tuple(t.shape) != tuple(expected[ours].shape):
            shapes = ", ".join(f"{prefix}{name} {tuple(sd[name].shape)}" for name, _ in parts)
            raise HFModelError(f"{source}: tensor shapes {shapes} do not match config.json "
                               f"(fastgpt {ours} expects {tuple(expected[ours].shape)})")
        out[ours] = t.to(dtype).contiguous()
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise HFModelError(f"{source}: unexpected tensor {unexpected[0]!r} (not a plain {arch} language model?)")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        if lm_head is None:
            raise HFModelError(f"{source}: tie_word_embeddings is false but lm_head.weight is missing")
        if tuple(lm_head.shape) != tuple(expected["lm_head.weight"].shape):
            raise HFModelError(f"{source}: tensor 'lm_head.weight' has shape {tuple(lm_head.shape)}, "
                               f"config.json implies {tuple(expected['lm_head.weight'].shape)}")
        out["lm_head.weight"] = lm_head.to(dtype).contiguous()

    model.load_state_dict(out, strict=True, assign=True)
    if cfg.tie_embeddings:  # assign=True replaced the shared Parameter with two
        model.lm_head.weight = model.wte.weight
    if cfg.position == "rope":  # non-persistent buffers are not in the state dict: compute them
        model.rope_cos, model.rope_sin = rope_tables(cfg)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor model.py creates that the checkpoint has no counterpart for
        raise HFModelError(f"{source}: no {arch} weight for fastgpt tensor {leftover[0]!r}")
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
def export_arch(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a fastgpt model is exported as, or a one-line refusal."""
    gpt2 = {"norm": "layernorm", "mlp": "gelu", "position": "learned", "bias": True, "tie_embeddings": True}
    llama = {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope"}
    wanted, arch = (gpt2, "gpt2") if cfg.position == "learned" else (llama, "llama")
    for name, need in wanted.items():
        if getattr(cfg, name) != need:
            raise HFModelError(f"model.{name}={getattr(cfg, name)!r} cannot be exported as {arch} (needs {need!r}): "
                               "only the GPT-2 and Llama layouts are exportable")
    if arch == "gpt2" and cfg.kv_heads != cfg.n_head:
        raise HFModelError(f"model.n_kv_head={cfg.n_kv_head} cannot be exported as GPT-2 "
                           "(grouped-query attention has no GPT-2 equivalent)")
    if arch == "llama" and cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return arch


def _hf_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    common = {"vocab_size": cfg.vocab_size, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
              "tie_word_embeddings": cfg.tie_embeddings}
    if arch == "gpt2":
        return {**common, "model_type": "gpt2", "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
                "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": None if cfg.hidden_dim == 4 * cfg.n_embd else cfg.hidden_dim,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": 0.0,  # fastgpt has no attention dropout
                "scale_attn_weights": True}
    scaling = None
    if cfg.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_context}
    out = {**common, "model_type": arch, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
           "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "attention_dropout": 0.0}
    if arch == "qwen2":
        return {**out, "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    return {**out, "head_dim": cfg.head_dim, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def _backbone_tensors(gpt: GPT, arch: str) -> dict[str, torch.Tensor]:
    """The backbone's tensors under their Hugging Face names (prefixed), fp32 on the CPU."""
    sd = gpt.state_dict()
    prefix = _PREFIX[arch]
    out: dict[str, torch.Tensor] = {}
    for ours, (parts, transposed) in _tensor_layout(gpt.config, arch).items():
        if ours not in sd:
            continue
        t = sd[ours]
        sizes = [n for _, n in parts]
        pieces = torch.split(t, sizes, 0) if len(parts) > 1 else [t]
        for (name, _), piece in zip(parts, pieces):
            out[prefix + name] = piece.t() if transposed else piece
    # fp32 on disk: the master weights exactly, whatever autocast dtype training ran in.
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def save_hf(model: GPT | ScalarModel, path: str | Path, tokenizer: Tokenizer | None = None,
            reward: dict[str, float] | None = None) -> Path:
    """Write a folder ``transformers``' ``from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` and, with a tokenizer, ``generation_config.json`` and the tokenizer files.

    A :class:`GPT` becomes ``...ForCausalLM`` (GPT-2: ``GPT2LMHeadModel``); a :class:`ScalarModel`
    (reward model) ``...ForSequenceClassification`` with one label.  Its score layer has no bias,
    so the head's bias (a constant that never changes a ranking) and the reward's normalisation
    (``reward`` = {"offset", "scale"} from the checkpoint) are written to ``config.json`` as
    ``fastgpt_reward``: normalised reward = (logit + score_bias - offset) / scale.  Returns the folder.
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the real module
    scalar = isinstance(model, ScalarModel)
    gpt: GPT = model.gpt if scalar else model
    cfg = gpt.config
    arch = export_arch(cfg)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise HFModelError(f"tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{cfg.vocab_size}; it was not trained with this tokenizer")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    tensors = _backbone_tensors(gpt, arch)
    hf_config = _hf_config(cfg, arch)
    causal_lm, classifier = _CLASSES[arch]
    if scalar:
        tensors["score.weight"] = model.head.weight.detach().to("cpu", torch.float32).contiguous()
        hf_config.update(architectures=[classifier], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                         fastgpt_reward={"score_bias": float(model.head.bias.detach()), **(reward or {})})
    else:
        hf_config["architectures"] = [causal_lm]
        if not cfg.tie_embeddings:
            tensors["lm_head.weight"] = gpt.lm_head.weight.detach().to("cpu", torch.float32).contiguous()
        # a tied lm_head is not stored (as transformers does): safetensors refuses shared tensors
    if tokenizer is not None:
        bos = tokenizer.special_ids.get(tokenizer.chat.variables.get("bos_token", ""), tokenizer.eot_id)
        hf_config.update(bos_token_id=bos, eos_token_id=tokenizer.end_id, pad_token_id=tokenizer.pad_id)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer is not None:
        write_hf_tokenizer(tokenizer, folder, cfg.block_size)
    return folder


def write_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, context: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and
    ``generation_config.json`` (stopping at every stop id) for ``tokenizer``."""
    from .tokenizer_hf import hf_backend
    folder = Path(folder)
    hf_backend(tokenizer).save(str(folder / "tokenizer.json"))
    chat = tokenizer.chat
    names = {**chat.variables, "pad_token": chat.pad_token}
    names.setdefault("eos_token", chat.end_token)
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat.template,
            "model_max_length": context, "clean_up_tokenization_spaces": False,
            **{k: v for k, v in names.items() if v is not None}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    # fastgpt's own format also stops at the end of a document, for plain-text sampling
    stops = list(tokenizer.stop_ids) + ([tokenizer.eot_id] if chat.native else [])
    gen = {"bos_token_id": tokenizer.special_ids.get(chat.variables.get("bos_token", ""), tokenizer.eot_id),
           "eos_token_id": list(dict.fromkeys(stops)), "pad_token_id": tokenizer.pad_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")



save_hf_gpt2 = save_hf  # the name benchmarks/bench_generation.py exports through
