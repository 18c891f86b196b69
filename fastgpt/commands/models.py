"""The commands about models and their data rather than training: ``inspect-data`` (how a
conversations file is tokenized for a model), ``export`` (a checkpoint as a Hugging Face folder)
and ``plan`` (memory of a stage on one GPU, or on each GPU of a sharded run)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_inspect_data_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("file", help='conversations JSONL ({"messages": [...]} or {"prompt", "response"})')
    parser.add_argument("--model", required=True, help="hf:FOLDER (a Hugging Face model), a fastgpt checkpoint or "
                        "run folder, or a tokenizer file / folder / 'byte'")
    parser.add_argument("--show", type=int, default=2, help="conversations to print (default 2); all are checked")
    parser.add_argument("--block-size", type=int, default=0, help="context to check truncation against "
                        "(default: the model's)")
    parser.add_argument("--tokens", action="store_true", help="one token per line: id, trained or not, text")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="highlight trained tokens in colour (auto: when printing to a terminal)")


def run_inspect_data(args: argparse.Namespace) -> int:
    from ..inspect_data import inspect_file, model_tokenizer
    tok, context, folder = model_tokenizer(args.model)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    inspect_file(args.file, tok, args.block_size or context, sys.stdout, show=args.show, color=color,
                 tokens=args.tokens, folder=folder)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("checkpoint", help="a run folder or checkpoint file of any stage (a PPO run exports its "
                        "policy, a reward run a sequence classifier)")
    parser.add_argument("--hf", required=True, metavar="OUT", help="folder to write (config.json, "
                        "model.safetensors, tokenizer files)")


def run_export(args: argparse.Namespace) -> int:
    import json
    from ..checkpoint import load_checkpoint, load_model
    from ..hf import save_hf
    kind = "scalar" if load_checkpoint(args.checkpoint)["model_kind"] == "scalar" else "gpt"
    model, tok, ckpt = load_model(args.checkpoint, kind=kind)
    extra = ckpt.get("extra", {})
    reward = ({"offset": extra["reward_offset"], "scale": extra["reward_scale"]}
              if kind == "scalar" and "reward_offset" in extra else None)
    out = save_hf(model, args.hf, tokenizer=tok, reward=reward)
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"export: {ckpt['stage']} checkpoint {args.checkpoint} -> {out} ({arch}; load it with transformers' "
          "from_pretrained)")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..plan import KNOWN_MODELS, STAGES
    parser.add_argument("--model", required=True, help="a known model (" + ", ".join(KNOWN_MODELS) + "), a preset, "
                        "hf:FOLDER or a checkpoint")
    parser.add_argument("--stage", default="sft", choices=STAGES)
    parser.add_argument("--gpu-memory", default="80GB", help="memory of the GPU (default 80GB)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row (PPO: prompt and answer)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="with activation checkpointing")
    parser.add_argument("--value-model", default="reward", choices=("reward", "head"), help="PPO's value model")
    parser.add_argument("--fsdp", type=int, default=0, metavar="GPUS", help="one of GPUS GPUs of a sharded run "
                        "(the stages' --fsdp true under torchrun)")


def run_plan(args: argparse.Namespace) -> int:
    from ..plan import format_plan, model_config, parse_size, plan
    cfg = model_config(args.model)
    p = plan(cfg, args.stage, seq_len=args.seq_len, budget=parse_size(args.gpu_memory), model_name=args.model,
             grad_checkpointing=args.grad_checkpointing, value_model=args.value_model, fsdp=args.fsdp)
    print(format_plan(p, cfg))
    return 0
