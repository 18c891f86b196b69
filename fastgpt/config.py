"""Model configuration, named presets, and stage configs loaded from TOML files and flags.

Every stage has one dataclass (``PretrainConfig``, ``SFTConfig``, ... in
``fastgpt.stages.configs``) that extends :class:`TrainConfig`; pre-training nests a
:class:`ModelConfig`.  Values are resolved in this order, later wins: dataclass defaults < named
preset < TOML file < command-line flags.  Presets are data, not code paths.  An unknown key
anywhere is an error that names the key and where it came from.

A field's type says what values it takes, and the check is made from the type wherever a config
is built: ``Literal[...]`` lists the choices, ``Annotated[int, Range(1)]`` (:data:`Positive`,
...) bounds a number. The comment on a field's line is its one-line description (``--help``).
"""
from __future__ import annotations

from .errors import FastGPTError

import dataclasses
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(FastGPTError, ValueError):
    """A configuration value or key that is not what was expected (one-line message)."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``low <= value <= high`` (strict where open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


Positive = Annotated[int, Range(1)]
NonNegative = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1, high_open=True)]  # a share of something, below all of it
Ratio = Annotated[float, Range(0, 1)]


def split_type(typ: Any) -> tuple[Any, tuple[Any, ...], Range | None]:
    """(base type, choices or (), range or None) of a field's annotation."""
    rng = None
    if get_origin(typ) is Annotated:
        typ, *extras = get_args(typ)
        rng = next((e for e in extras if isinstance(e, Range)), None)
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        return type(choices[0]), choices, rng
    return typ, (), rng


def check_value(value: Any, typ: Any, where: str) -> None:
    """Fail with one line naming ``where`` if ``value`` is not among the type's choices or in
    its range."""
    _, choices, rng = split_type(typ)
    if choices and value not in choices:
        raise ConfigError(f"{where}={value!r}: expected one of {', '.join(map(str, choices))}")
    if rng is not None and value is not None and value not in rng:
        raise ConfigError(f"{where}={value!r}: expected a value {rng}")


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a config dataclass against its type's choices and range."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        check_value(getattr(obj, f.name), hints[f.name], f"{prefix}{f.name}")


@dataclass
class ModelConfig:
    """Shape of a decoder-only GPT. Defaults are GPT-2 small's layout."""

    vocab_size: Positive = 50304          # embedding rows; pre-training from scratch sets it from the data's tokenizer
    block_size: Positive = 1024           # longest sequence the model is trained for (its context)
    n_layer: Positive = 12                # transformer blocks
    n_head: Positive = 12                 # attention heads (query heads under grouped-query attention)
    n_kv_head: NonNegative = 0            # key/value heads: 0 = n_head (multi-head); fewer = grouped-query
    n_embd: Positive = 768                # width of the residual stream
    mlp_hidden: NonNegative = 0           # MLP width: 0 = 4 * n_embd (gelu) or ~8/3 * n_embd (swiglu)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # normalisation layer
    mlp: Literal["gelu", "swiglu"] = "gelu"  # MLP activation
    position: Literal["learned", "rope"] = "learned"  # learned position embeddings or rotary (RoPE)
    rope_theta: PositiveFloat = 10000.0   # RoPE base frequency
    # RoPE frequency scaling for long contexts: "linear" divides positions by rope_factor; "llama3"
    # (Llama 3.1+) divides low frequencies by it, keeps high ones, with a smooth band between
    rope_scaling: Literal["none", "linear", "llama3"] = "none"  # RoPE frequency scaling for long contexts
    rope_factor: PositiveFloat = 1.0      # RoPE scaling factor
    rope_low_freq_factor: PositiveFloat = 1.0  # llama3 scaling: the low-frequency edge of the smooth band
    rope_high_freq_factor: PositiveFloat = 4.0  # llama3 scaling: the high-frequency edge of the smooth band
    rope_original_context: Positive = 8192  # the context the model was pre-trained at before scaling
    tie_embeddings: bool = True           # output layer shares the token embedding's weights
    bias: bool = True                     # biases on every linear layer and LayerNorm
    qkv_bias: bool = False                # biases on the q/k/v projection even when bias=false (Qwen2)
    dropout: Fraction = 0.0               # residual / embedding dropout
    norm_eps: PositiveFloat = 1e-5        # epsilon of the normalisation layers

    def __post_init__(self) -> None:
        check_fields(self, "model.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.position='rope' needs an even head size, got model.n_embd / model.n_head "
                              f"= {self.head_dim}")
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be below "
                              f"model.rope_high_freq_factor={self.rope_high_freq_factor}")

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

    out_dir: str = "runs/pretrain"  # run folder: checkpoint.pt, metrics.jsonl; an existing checkpoint is resumed
    device: str = "auto"            # auto (CUDA if present), cpu, cuda or cuda:N
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False           # torch.compile the model
    seed: int = 1337                # seed of initialisation, data order and sampling
    max_steps: Positive = 1000      # optimizer steps in all (a resumed run continues to this step)
    batch_size: Positive = 8        # rows (or examples) per micro-batch
    grad_accum: Positive = 1        # micro-batches per optimizer step
    lr: PositiveFloat = 6e-4        # peak learning rate, reached after warmup
    min_lr_ratio: Ratio = 0.1       # cosine decay ends at lr * min_lr_ratio
    warmup_steps: NonNegative = 100  # steps of linear warmup from 0 to lr
    weight_decay: NonNegativeFloat = 0.1  # AdamW weight decay on weight matrices (not norms or biases)
    beta1: Fraction = 0.9           # AdamW first-moment decay
    beta2: Fraction = 0.95          # AdamW second-moment decay
    adam_eps: PositiveFloat = 1e-8  # AdamW epsilon
    grad_clip: NonNegativeFloat = 1.0  # clip the gradient norm to this; 0 disables
    grad_checkpointing: bool = False  # recompute each block in backward instead of keeping its activations
    fsdp: bool = False              # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    eval_interval: NonNegative = 200  # steps between evaluations (0: only at the end)
    log_interval: Positive = 10     # steps between metrics.jsonl records
    ckpt_interval: Positive = 500   # steps between checkpoints (the last step always saves)
    max_bad_steps: NonNegative = 10  # non-finite losses tolerated (skipped) before the run stops
    resume: bool = True             # continue from out_dir/checkpoint.pt when it exists (false: start over)
    progress: bool = True           # show progress (a bar on a terminal, plain lines in a log)
    tensorboard: bool = False       # also log metrics to TensorBoard in out_dir/tensorboard (needs tensorboard)
    wandb: bool = False             # also log metrics to Weights & Biases (needs wandb; project $WANDB_PROJECT)

    # Settings a resumed run may change: how long it runs, how it computes and what it shows,
    # never what it learns from (max_steps extends or shortens the schedule). Every other setting
    # must match the checkpoint's, or the trainer refuses to resume.
    RESUME_SAFE: ClassVar[frozenset[str]] = frozenset({
        "out_dir", "device", "compile", "grad_checkpointing", "fsdp", "max_steps", "eval_interval", "log_interval",
        "ckpt_interval", "max_bad_steps", "resume", "progress", "tensorboard", "wandb"})

    # Sizes of one process's share of a step: a run resumed on another number of processes may
    # change them so that value x processes stays the same (the same global batch).
    PER_PROCESS: ClassVar[frozenset[str]] = frozenset({"grad_accum"})

    def __post_init__(self) -> None:
        check_fields(self)


# Presets are data: a "model" part (ModelConfig fields) and a "train" part (any stage's fields).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU in minutes: byte-level vocabulary, short context. Rotary positions: a model this small
    # learns to copy from a question into its answer much sooner with them (demo: validation loss
    # 0.39 vs 0.47 after 650 steps).
    "tiny": {
        "model": dict(block_size=256, n_layer=4, n_head=4, n_embd=128, position="rope",
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
    return get_type_hints(cls, include_extras=True)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML or flag value to the dataclass field's type and check it against the type's
    choices and range, or fail naming ``where``."""
    base, _, _ = split_type(typ)
    try:
        if base is bool:
            if isinstance(value, bool):
                converted: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                converted = True
            elif isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                converted = False
            else:
                raise ValueError(value)
        elif base in (int, float) and isinstance(value, bool):  # TOML `n_layer = true` is not a number
            raise ValueError(value)
        elif base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            converted = int(value)
        elif base is float:
            converted = float(value)
        elif base is str:
            converted = str(value)
        else:
            converted = value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r}: expected {getattr(base, '__name__', base)}") from None
    check_value(converted, typ, where)
    return converted


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
