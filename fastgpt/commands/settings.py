"""Flags built from config dataclasses, and the sampling flags shared by the generating commands.

Stage commands take ``--config FILE.toml`` and one flag per (nested) config field
(``--lr 3e-4``, ``--model.n_layer 6``, dashes or underscores); ``pretrain`` also takes
``--preset``. Later sources win: defaults < preset < TOML file < flags.

Each flag's help is the field's own: its description is the comment on the field's line in the
dataclass, its choices and range come from the field's type (``Literal``, ``Range``), and the
default shown is the one this very command line would use (``pretrain --preset small --help``
shows the small preset's values).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
from typing import Any, Sequence, get_type_hints

from ..config import PRESETS, build_config, split_type
from ..errors import FastGPTError

DEFAULT_PRESET = "tiny"


def field_comments(cls: type) -> dict[str, str]:
    """The comment on each field's line of dataclass ``cls``. A subclass that changes a default keeps
    the base class's description and adds its own comment after it ("...; constant learning rate")."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen build): flags keep their defaults and choices
            continue
        first: dict[int, str] = {}  # line -> first name on it, when the line starts `name:`
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        for i, tok in enumerate(tokens[:-1]):
            if tok.type == tokenize.NAME and tokens[i + 1].string == ":" and tok.start[1] == 4:
                first.setdefault(tok.start[0], tok.string)
            elif tok.type == tokenize.COMMENT and tok.start[0] in first:
                name, text = first[tok.start[0]], tok.string.lstrip("#").strip()
                out[name] = f"{out[name]}; {text}" if name in out else text
    return out


def config_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, type, description) of every leaf field of ``cls``, nested configs included."""
    out = []
    hints, comments = get_type_hints(cls, include_extras=True), field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += config_fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], comments.get(f.name, "")))
    return out


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if value == "" else str(value)


def _defaults(cls: type, argv: Sequence[str], has_preset: bool) -> tuple[Any, str]:
    """The config this command line starts from before its setting flags (preset and TOML file),
    and a note naming those sources; an unreadable one falls back to the plain defaults (the real
    parse reports it)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset")
    peek.add_argument("--config")
    peek.add_argument("--init_from", "--init-from")
    known, _ = peek.parse_known_args(argv)
    if has_preset and not known.preset and not known.init_from:  # a start model brings its own settings
        known.preset = DEFAULT_PRESET
    try:
        cfg = build_config(cls, known.preset, known.config)
    except FastGPTError:
        return build_config(cls, DEFAULT_PRESET if has_preset else None), ""
    sources = [f"preset {known.preset}"] if known.preset else []
    sources += [known.config] if known.config else []
    return cfg, f" (defaults from {' and '.join(sources)})" if sources else ""


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] = ()) -> None:
    """--preset (stages that build a model), --config, --fresh and one --flag per field of ``cls``."""
    # Presets size a model, so only stages that build one (pre-training) take them; later
    # stages inherit the architecture from their start checkpoint.
    has_preset = "model" in {f.name for f in dataclasses.fields(cls)}
    if has_preset:
        parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                            help=f"named preset: model size and training defaults (default: {DEFAULT_PRESET}; "
                                 "none with init_from, whose model brings its own)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (after any preset)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over in out_dir, replacing its checkpoint and metrics (same as --resume false)")
    defaults, sources = _defaults(cls, argv, has_preset)
    group = parser.add_argument_group(f"settings{sources}; each flag overrides them")
    for name, typ, description in config_fields(cls):
        base, choices, rng = split_type(typ)
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # --max_steps or --max-steps
        extra: dict[str, Any] = {}
        if base is bool:  # `--compile` alone means true
            extra = dict(nargs="?", const="true", metavar="{true,false}")
        elif choices:
            extra = dict(choices=choices)
        else:
            extra = dict(metavar=base.__name__.upper())
        limits = f"; {rng}" if rng is not None else ""
        group.add_argument(*flags, dest=f"cfg:{name}", default=argparse.SUPPRESS,
                           help=f"{description} (default: {_shown(_value(defaults, name))}{limits})".lstrip(), **extra)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The stage config of ``cls`` from --preset, --config and the setting flags (--fresh: resume
    off). A stage that builds a model gets the default preset unless it starts from one (init_from)."""
    from ..config import START_SETTINGS, ConfigError, given_keys
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    if getattr(args, "fresh", False):
        overrides["resume"] = False
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
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="sampling temperature; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0 = all "
                        "(default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling: the smallest set of tokens "
                        "with this much probability (default: %(default)s)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="> 1 discourages tokens already in the text; 1 = off (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help="longest answer, in tokens (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")


def sampling_params(args: argparse.Namespace, stop_ids: tuple[int, ...]) -> Any:
    from ..engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_ids=stop_ids,
                          seed=args.seed)
