"""Flags built from config dataclasses, and the sampling flags shared by the generating commands.

Stage commands take ``--config FILE.toml`` and one flag per (nested) config field
(``--lr 3e-4``, ``--model.n_layer 6``, dashes or underscores); ``pretrain`` also takes
``--preset``. Later sources win: defaults < preset < TOML file < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, get_type_hints

DEFAULT_PRESET = "tiny"


def _config_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _config_fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], default))
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """--preset, --config and one --flag per (nested) field of the stage config ``cls``."""
    from ..config import PRESETS
    # Presets size a model, so only stages that build one (pre-training) take them; later
    # stages inherit the architecture from their start checkpoint.
    if "model" in {f.name for f in dataclasses.fields(cls)}:
        parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                            help=f"named preset: model size and training defaults (default: {DEFAULT_PRESET}; "
                                 "none with init_from, whose model brings its own)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (after any preset)")
    group = parser.add_argument_group("settings (override preset and config file)")
    for name, typ, default in _config_fields(cls):
        tname = getattr(typ, "__name__", str(typ))
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # --max_steps or --max-steps
        group.add_argument(*flags, dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar=tname.upper(),
                           help=f"default: {default!r}")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The stage config of ``cls`` from --preset, --config and the setting flags. A stage that
    builds a model gets the default preset unless it starts from one (init_from)."""
    from ..config import START_SETTINGS, ConfigError, build_config, given_keys
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    preset = getattr(args, "preset", None)
    cfg = build_config(cls, preset, args.config, overrides)
    if not hasattr(cfg, "model"):
        return cfg
    if getattr(cfg, "init_from", ""):
        if preset:
            raise ConfigError(f"--preset {preset} sizes a new model, but init_from={cfg.init_from} brings its own "
                              "(set model.block_size or model.dropout instead)")
        start = {f"model.{name}" for name in START_SETTINGS}
        for key in sorted(given_keys(args.config, overrides)):
            if key.startswith("model.") and key not in start:
                raise ConfigError(f"{key}: the model comes from init_from={cfg.init_from}; only model.block_size "
                                  "(up to its context) and model.dropout can change without other weights")
        return cfg
    return build_config(cls, preset or DEFAULT_PRESET, args.config, overrides)


def add_sampling_arguments(parser: argparse.ArgumentParser, *, temperature: float, top_p: float,
                           max_new_tokens: int) -> None:
    """The sampling flags of every command that generates text interactively, plus --device."""
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=top_p)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def sampling_params(args: argparse.Namespace, stop_ids: tuple[int, ...]) -> Any:
    from ..engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_ids=stop_ids,
                          seed=args.seed)
