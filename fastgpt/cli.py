"""``fastgpt <command>``: a thin layer that parses arguments and calls a stage or tool.

Stage commands (pretrain, sft, reward, ppo) take ``--config FILE.toml`` and one flag per config
field (``--lr 3e-4``, ``--model.n_layer 6``); ``pretrain`` also takes ``--preset``. Later sources
win. Every command's module is imported only when that command runs, so ``fastgpt --help`` is
instant.
Errors the user can fix are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any, Sequence, get_type_hints

from .errors import FastGPTError

# name -> (module, help). Each module defines add_arguments(parser) and run(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("fastgpt.commands", "tokenize .txt/.jsonl files or folders into token shards"),
    "pretrain": ("fastgpt.stages.pretrain", "stage 1: pre-train a GPT on token shards"),
    "sample": ("fastgpt.commands", "print text sampled from a checkpoint"),
    "sft": ("fastgpt.stages.sft", "stage 2: supervised fine-tuning on demonstrations"),
    "compare": ("fastgpt.rank", "sample K responses per prompt into a comparisons file"),
    "rank": ("fastgpt.rank", "rank compared responses in the terminal"),
    "reward": ("fastgpt.stages.reward", "stage 3a: train a reward model on rankings (or --score)"),
    "ppo": ("fastgpt.stages.ppo", "stage 3b: optimise the policy with PPO against the reward model"),
    "chat": ("fastgpt.chat", "chat with any stage's checkpoint in the terminal"),
    "demo": ("fastgpt.demo.pipeline", "run every stage end to end on built-in data and report"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------ config flags
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
    from .config import PRESETS
    # Presets size a model, so only stages that build one (pre-training) take them; later
    # stages inherit the architecture from their start checkpoint.
    if "model" in {f.name for f in dataclasses.fields(cls)}:
        parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                            help="named preset: model size and training defaults (default: tiny)")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (after any preset)")
    group = parser.add_argument_group("settings (override preset and config file)")
    for name, typ, default in _config_fields(cls):
        tname = getattr(typ, "__name__", str(typ))
        flags = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # --max_steps or --max-steps
        group.add_argument(*flags, dest=f"cfg:{name}", default=argparse.SUPPRESS, metavar=tname.upper(),
                           help=f"default: {default!r}")


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    from .config import build_config
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    return build_config(cls, getattr(args, "preset", None), args.config, overrides)


# --------------------------------------------------------------- sampling flags
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
    from .engine import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_ids=stop_ids,
                          seed=args.seed)


# ------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fastgpt", description="Train a ChatGPT-style assistant on one GPU: "
                                     "pre-training, SFT, reward model and PPO.")
    parser.add_argument("--version", action="version", version=f"fastgpt {__import__('fastgpt').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    parser = ArgumentParser(prog=f"fastgpt {name}", description=help_text)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        print(f"fastgpt {name}: not available in this build ({e})", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad environment setting read at import, e.g. FASTGPT_KERNELS
        print(f"fastgpt {name}: error: {e}", file=sys.stderr)
        return 2
    add = getattr(module, f"add_{name}_arguments", None) or getattr(module, "add_arguments")
    run = getattr(module, f"run_{name}", None) or getattr(module, "run")
    add(parser)
    args = parser.parse_args(argv[1:])
    try:
        code = run(args)
    except FastGPTError as e:
        print(f"fastgpt {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastgpt {name}: interrupted (the last checkpoint is intact)", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
