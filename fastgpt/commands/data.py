"""The data commands: ``prepare`` (text -> token shards), ``compare`` (K answers per prompt) and
``rank`` (order them by hand in the terminal)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import FastGPTError


def add_prepare_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("inputs", nargs="+", help="files, folders or glob patterns ('src/**/*.py'): a .jsonl "
                        "file holds one document per line, any other file is one document of text; a folder "
                        "gives its files ending in --ext")
    parser.add_argument("--ext", default=".txt,.jsonl", help="comma-separated endings of the files taken from "
                        "folders, e.g. .py,.md (default: %(default)s)")
    parser.add_argument("--out", required=True, help="dataset folder to write (shards + meta.json)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (default), 'bpe:<vocab size>' to train a BPE on the inputs, a "
                             "tokenizer file (fastgpt JSON or a tokenizer.json), or a Hugging Face model "
                             "folder (the tokenizer a model started from it uses)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="share of documents held out for validation (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000,
                        help="tokens per shard file (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: %(default)s)")


def run_prepare(args: argparse.Namespace) -> int:
    from ..data import iter_documents, prepare
    from ..tokenizer import load_tokenizer
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in (x.strip() for x in args.ext.split(",")) if e)
    if not extensions:
        raise FastGPTError(f"--ext {args.ext!r}: expected file endings such as .txt,.md")
    if not 0 <= args.val_fraction < 1 or args.shard_tokens < 1:
        raise FastGPTError("expected 0 <= --val-fraction < 1 and --shard-tokens >= 1")
    if args.tokenizer.startswith("bpe:"):
        from ..tokenizer_hf import train_bpe
        try:
            size = int(args.tokenizer[4:])
        except ValueError:
            raise FastGPTError(f"--tokenizer {args.tokenizer}: expected bpe:<vocab size>") from None
        tok = train_bpe((text for _, text in iter_documents(args.inputs, args.text_field, extensions)), size,
                        show_progress=sys.stderr.isatty())  # its bar is carriage returns in a log
    else:
        tok = load_tokenizer(args.tokenizer)
    meta = prepare(args.inputs, args.out, tok, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                   text_field=args.text_field, seed=args.seed, extensions=extensions)
    print(f"prepare: {meta['documents']['train']:,} train / {meta['documents']['val']:,} val documents, "
          f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens ({tok.kind} tokenizer, "
          f"{tok.vocab_size} ids) -> {args.out}")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("checkpoint", help="the policy to sample from (usually the SFT run)")
    parser.add_argument("--prompts", required=True, help='JSONL of {"prompt": str} or {"messages": [...]}')
    parser.add_argument("--out", required=True, help="comparisons JSONL to write")
    parser.add_argument("-k", type=int, default=4, help="responses per prompt, 2..9 (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows sampled together (default: %(default)s)")


def run_compare(args: argparse.Namespace) -> int:
    from ..rank import compare
    out = compare(args.checkpoint, args.prompts, args.out, k=args.k, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device, batch_size=args.batch_size)
    print(f"compare: {args.k} responses per prompt -> {out}")
    return 0


def add_rank_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("comparisons", help="comparisons JSONL from `fastgpt compare`")
    parser.add_argument("--out", required=True, help="rankings JSONL (appended to; resumed from)")


def run_rank(args: argparse.Namespace) -> int:
    from ..rank import rank_interactive
    rank_interactive(args.comparisons, args.out)
    return 0
