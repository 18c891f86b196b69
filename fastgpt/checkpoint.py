"""Checkpoints: one file, written atomically, holding everything needed to resume or reuse a run.

A checkpoint is ``<out_dir>/checkpoint.pt``: model weights and config, tokenizer, optimizer,
trainer step, RNG states, data position and stage-specific extras (for example the reward
model's normalisation offset).  It is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the old one, so an interrupted save never damages what was there.
"""
from __future__ import annotations

from .errors import FastGPTError

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import files
from .config import ConfigError, ModelConfig
from .lora import strip_adapters
from .model import GPT, ScalarModel
from .tokenizer import Tokenizer, tokenizer_from_dict

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"          # weights of the best evaluation so far, when a stage ranks them
BEST_RECORD = "best.json"      # its {"step", "score"}
FORMAT = "fastgpt-checkpoint-1"


class CheckpointError(FastGPTError, ValueError):
    """A checkpoint that is missing, damaged or of the wrong kind (one-line message)."""


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself if it names a .pt file, else ``path/checkpoint.pt`` (a run folder)."""
    p = Path(path)
    return p if p.suffix == ".pt" and not p.is_dir() else p / CHECKPOINT_NAME


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with files.atomic_write(path, "wb") as f:
        torch.save(obj, f)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete half-written checkpoint files that a killed save left in ``folder`` (each about a
    checkpoint's size); returns what was removed."""
    return files.remove_stale_temporaries(Path(folder) / CHECKPOINT_NAME)


def save_checkpoint(path: str | Path, *, model: nn.Module, model_kind: str, model_config: ModelConfig,
                    tokenizer: Tokenizer, stage: str, weights: dict[str, torch.Tensor] | None = None,
                    **state: Any) -> Path:
    """Atomically write a checkpoint; ``state`` holds optimizer, trainer, rng, task, config, extra.
    ``weights``: the model's whole state when ``model`` holds only a shard of it."""
    path = checkpoint_path(path)
    payload = {
        "format": FORMAT,
        "stage": stage,
        "model_kind": model_kind,
        "model_config": vars(model_config).copy(),
        "model": {k: v.detach().cpu() for k, v in (model.state_dict() if weights is None else weights).items()},
        "tokenizer": tokenizer.to_dict(),
        **state,
    }
    atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = checkpoint_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:  # a cut-off zip/pickle fails in many ways (RuntimeError, OSError, EOFError, ...)
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastgpt checkpoint (expected format {FORMAT})")
    return ckpt


def model_config_of(ckpt: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig(**ckpt["model_config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"checkpoint model_config is invalid: {e}") from None


MODEL_KINDS = {"gpt": GPT, "scalar": ScalarModel}


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load weights, failing with one line if the architecture differs."""
    check_architecture(model, state, where)
    model.load_state_dict(state)


def check_architecture(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Fail with one line unless ``state`` has exactly the weights of ``model`` (names and whole
    shapes: a sharded model's parameters report their unsharded shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"{where}: checkpoint is for another architecture ({detail})")


def load_model(path: str | Path, kind: str = "gpt", device: str | torch.device = "cpu"
               ) -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """Rebuild a model from any stage's checkpoint.

    ``kind`` is what the caller wants: "gpt" (a language model; from a PPO, DPO or GRPO
    checkpoint this is the policy) or "scalar" (reward / value model). Returns (model in eval
    mode, tokenizer, ckpt). A LoRA run's checkpoint loads as the plain model, adapters merged.
    """
    path = checkpoint_path(path)
    ckpt = load_checkpoint(path)
    cfg = model_config_of(ckpt)
    state = strip_adapters(ckpt["model"])
    saved = ckpt["model_kind"]
    # PPO: the policy is a GPT under "policy.", the value under "value."; DPO, GRPO: "policy." only
    if saved in ("policy_value", "policy"):
        prefix = "policy." if kind == "gpt" else "value."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if kind == "scalar" and "value_config" in ckpt.get("extra", {}):
            cfg = ModelConfig(**ckpt["extra"]["value_config"])
    elif kind == "gpt" and saved == "scalar":
        raise CheckpointError(f"{path}: is a {ckpt['stage']} (scalar-head) checkpoint, expected a language model")
    elif kind == "scalar" and saved == "gpt":
        raise CheckpointError(f"{path}: is a language-model checkpoint, expected a reward/value model")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r} (expected one of {sorted(MODEL_KINDS)})")
    model = MODEL_KINDS[kind](cfg)
    load_state_strict(model, state, str(path))
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"]), ckpt
