"""``fastgpt <command>``: finds the command, parses its arguments and runs it.

The commands themselves (their flags and what they call) live in :mod:`fastgpt.commands`. A
command's module is imported only when that command runs, and none of them imports torch before
its arguments are parsed, so ``fastgpt --help`` and ``fastgpt <command> --help`` are instant.
Errors the user can fix are printed as one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Sequence

from .errors import FastGPTError

# name -> (module, help, what an interruption leaves). Each module defines
# add_<name>_arguments(parser, argv) -- argv, the command's own arguments, lets help show the
# defaults they select -- and run_<name>(args) -> int (dashes in a name are underscores there).
RESUMES = "; the last checkpoint is intact: run the same command to resume"
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("fastgpt.commands.data", "tokenize text files or folders into token shards",
                "; the dataset folder is as it was"),
    "pretrain": ("fastgpt.commands.train", "stage 1: pre-train a GPT on token shards", RESUMES),
    "sample": ("fastgpt.commands.generate", "print text sampled from a checkpoint", ""),
    "sft": ("fastgpt.commands.train", "stage 2: supervised fine-tuning on demonstrations", RESUMES),
    "compare": ("fastgpt.commands.data", "sample K responses per prompt into a comparisons file",
                "; no comparisons file was written (it appears only when complete)"),
    "rank": ("fastgpt.commands.data", "rank compared responses in the terminal",
             "; every ranking given so far is saved: run the same command to continue"),
    "reward": ("fastgpt.commands.train", "stage 3a: train a reward model on rankings (or --score)", RESUMES),
    "ppo": ("fastgpt.commands.train", "stage 3b: optimise the policy with PPO against the reward model", RESUMES),
    "dpo": ("fastgpt.commands.train", "stage 3 without a reward model: DPO / IPO on rankings or chosen/rejected pairs",
            RESUMES),
    "grpo": ("fastgpt.commands.train", "stage 3b without a value model: GRPO / RLOO, K samples per prompt", RESUMES),
    "chat": ("fastgpt.commands.generate", "chat with any stage's checkpoint in the terminal", ""),
    "demo": ("fastgpt.commands.demo", "run every stage end to end on built-in data and report",
             "; finished stages are kept and the current one resumes from its checkpoint: run the same "
             "command to continue"),
    "compare-methods": ("fastgpt.commands.demo", "the demo with PPO, DPO and GRPO over several seeds: one table",
                        "; finished seeds and stages are kept: run the same command to continue"),
    "inspect-data": ("fastgpt.commands.models", "show how conversations are tokenized for a model; warn about bugs",
                     ""),
    "export": ("fastgpt.commands.models", "write a checkpoint as a Hugging Face folder (transformers from_pretrained)",
               "; the export folder may be incomplete: run it again"),
    "plan": ("fastgpt.commands.models", "memory of a stage on one GPU and the largest micro-batch that fits", ""),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (``prog: error: ...``), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="fastgpt", description="Train a ChatGPT-style assistant on one GPU: "
                                     "pre-training, SFT, reward model and PPO.")
    parser.add_argument("--version", action="version", version=f"fastgpt {__import__('fastgpt').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make a busy machine several times slower; waiting
    # passively costs little on an idle one. Set before torch loads, unless the user chose.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module_name, help_text, interrupted = COMMANDS[name]
    parser = ArgumentParser(prog=f"fastgpt {name}", description=help_text)
    module = importlib.import_module(module_name)
    function = name.replace("-", "_")
    getattr(module, f"add_{function}_arguments")(parser, argv[1:])
    args = parser.parse_args(argv[1:])
    try:
        importlib.import_module("fastgpt.kernels")
    except ModuleNotFoundError as e:
        print(f"fastgpt {name}: not available in this build ({e})", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad environment setting read at import, e.g. FASTGPT_KERNELS
        print(f"fastgpt {name}: error: {e}", file=sys.stderr)
        return 2
    run = getattr(module, f"run_{function}")
    # under torchrun every process runs the command; only rank 0 prints (errors still reach stderr)
    quiet = int(os.environ.get("RANK", "0")) > 0
    try:
        with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stdout) as out, \
                contextlib.redirect_stdout(out):
            code = run(args)
    except FastGPTError as e:
        print(f"fastgpt {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nfastgpt {name}: interrupted{interrupted}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return int(code or 0)


def _leave_process_group() -> None:
    """Under torchrun, leave the process group before exiting: left to the interpreter's exit,
    its background threads can abort a process that has finished its work (seen once in CI:
    "terminate called without an active exception" after a 2-process PPO run)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
