"""Model configuration, named presets, and stage configs loaded from TOML files and flags.

Every stage has one dataclass (``PretrainConfig``, ``SFTConfig``, ...) that extends
:class:`TrainConfig` and nests a :class:`ModelConfig`.  Values are resolved in this order, later
wins: dataclass defaults < named preset < TOML file < command-line flags.  Presets are data,
not code paths.  An unknown key anywhere is an error that names the key and where it came from.
"""
from __future__ import annotations

from .errors import FastGPTError

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(FastGPTError, ValueError):
    """A configuration value or key that is not what was expected (one-line message)."""


@dataclass
class ModelConfig:
    """Shape of a decoder-only GPT. Defaults are GPT-2 small's layout."""

    vocab_size: int = 50304
    block_size: int = 1024          # longest sequence the model is trained for
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0              # 0 = n_head (multi-head); fewer = grouped-query attention
    n_embd: int = 768
    mlp_hidden: int = 0             # 0 = 4 * n_embd (gelu) or ~8/3 * n_embd rounded (swiglu)
    norm: str = "layernorm"         # "layernorm" | "rmsnorm"
    mlp: str = "gelu"               # "gelu" | "swiglu"
    position: str = "learned"       # "learned" | "rope"
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long contexts: "none", "linear" (positions / rope_factor) or
    # "llama3" (Llama 3.1+: low frequencies / rope_factor, high ones kept, a smooth band between)
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the model was pre-trained at before scaling
    tie_embeddings: bool = True
    bias: bool = True               # biases on every linear layer and LayerNorm
    qkv_bias: bool = False          # biases on the q/k/v projection even when bias=False (Qwen2)
    dropout: float = 0.0            # residual / embedding dropout
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        checks = {
            "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"),
            "position": ("learned", "rope"), "rope_scaling": ("none", "linear", "llama3"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):  # before any % by them
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)}: expected a positive integer")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.position='rope' needs an even head size, got model.n_embd / model.n_head "
                              f"= {self.head_dim}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ConfigError(f"model.rope_factor={self.rope_factor}: expected a positive number")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be positive and below "
                              f"model.rope_high_freq_factor={self.rope_high_freq_factor}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: expected a value in [0, 1)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # keeps parameter count close to the 4x GELU MLP
            return 64 * ((8 * self.n_embd // 3 + 63) // 64)
        return 4 * self.n_embd


# Model settings that may differ from a start model's (init_from) without touching its weights.
START_SETTINGS = ("block_size", "dropout")


@dataclass
class TrainConfig:
    """Fields of the one trainer loop, shared by every stage."""

    out_dir: str = "runs/pretrain"
    device: str = "auto"            # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"             # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False           # torch.compile the model
    seed: int = 1337
    max_steps: int = 1000           # optimizer steps
    batch_size: int = 8             # rows (or examples) per micro-batch
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr_ratio: float = 0.1       # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0          # 0 disables
    grad_checkpointing: bool = False  # recompute each block in backward instead of keeping its activations
    eval_interval: int = 200        # steps between evaluations (0: only at the end)
    log_interval: int = 10
    ckpt_interval: int = 500        # steps between checkpoints (the last step always saves)
    max_bad_steps: int = 10         # non-finite losses tolerated (skipped) before the run stops
    resume: bool = True             # continue from out_dir/checkpoint.pt when it exists
    progress: bool = True           # progress bar


# Presets are data: a "model" part (ModelConfig fields) and a "train" part (any stage's fields).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU in minutes: byte-level vocabulary, short context.
    "tiny": {
        "model": dict(block_size=256, n_layer=4, n_head=4, n_embd=128,
                      dropout=0.0),
        "train": dict(batch_size=16, lr=2e-3, warmup_steps=30, max_steps=600, eval_interval=100,
                      log_interval=10, ckpt_interval=200, weight_decay=0.1),
    },
    # A little larger, still CPU-friendly; the demo's "small" preset.
    "small": {
        "model": dict(block_size=256, n_layer=6, n_head=6, n_embd=192),
        "train": dict(batch_size=16, lr=1.5e-3, warmup_steps=50, max_steps=1500),
    },
    "gpt2-small": {  # 124M
        "model": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        "train": dict(batch_size=32, grad_accum=16, lr=6e-4, warmup_steps=700, max_steps=19073),
    },
    "gpt2-medium": {  # 350M
        "model": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
        "train": dict(batch_size=16, grad_accum=32, lr=3e-4, warmup_steps=700, max_steps=19073),
    },
    # ~1.1B modern layout (RoPE, RMSNorm, SwiGLU, GQA); pre-trains on one 80 GB GPU in bf16
    # with fp32 master weights and AdamW state (~18 GB) plus activations at batch 8 x 2048.
    "gpt-1b": {
        "model": dict(vocab_size=50304, block_size=2048, n_layer=22, n_head=16, n_kv_head=4,
                      n_embd=2048, mlp_hidden=5632, norm="rmsnorm", mlp="swiglu",
                      position="rope", bias=False),
        "train": dict(batch_size=8, grad_accum=32, lr=3e-4, warmup_steps=2000, max_steps=50000),
    },
}

C = TypeVar("C")


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML or flag value to the dataclass field's type, or fail naming ``where``."""
    origin = getattr(typ, "__args__", None)
    if origin and type(None) in origin:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        typ = next(t for t in origin if t is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ in (int, float) and isinstance(value, bool):  # TOML `n_layer = true` is not a number
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: expected {getattr(typ, '__name__', typ)}") from None
    return value


def _apply(obj: Any, values: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set dataclass fields of ``obj`` from a nested dict, recursing into nested dataclasses."""
    types = _field_types(type(obj))
    names = [f.name for f in fields(obj)]
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown config key '{where}' (expected one of: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{where}' must be a table of settings")
            _apply(current, value, source, prefix=f"{where}.")
        else:
            setattr(obj, key, _coerce(value, types[key], f"{source}: {where}"))


def build_config(cls: type[C], preset: str | None = None, toml_path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> C:
    """Resolve a stage config: defaults < preset < TOML file < overrides (dotted keys)."""
    cfg = cls()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}' (expected one of: {', '.join(PRESETS)})")
        parts = PRESETS[preset]
        train_part = {k: v for k, v in parts.get("train", {}).items()
                      if k in {f.name for f in fields(cls)}}
        _apply(cfg, train_part, f"preset '{preset}'")
        if hasattr(cfg, "model"):
            _apply(cfg, {"model": parts.get("model", {})}, f"preset '{preset}'")
    if toml_path:
        path = Path(toml_path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        _apply(cfg, values, str(path))
    for dotted, value in (overrides or {}).items():
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        _apply(cfg, nested, "command line")
    if hasattr(cfg, "model") and dataclasses.is_dataclass(cfg.model):
        try:
            cfg.model = ModelConfig(**dataclasses.asdict(cfg.model))  # re-run validation
        except TypeError as e:
            raise ConfigError(f"model config: {e}") from None
    return cfg


def given_keys(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> set[str]:
    """The dotted keys a TOML file and overrides set (what a user asked for, defaults aside)."""
    keys = set(overrides or {})
    if toml_path:
        def walk(table: dict[str, Any], prefix: str) -> None:
            for key, value in table.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    keys.add(f"{prefix}{key}")
        walk(tomllib.loads(Path(toml_path).read_text()), "")
    return keys


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
