"""The data commands: ``prepare`` (text -> token shards), ``compare`` (K answers per prompt) and
``rank`` (order them by hand in the terminal)."""
from __future__ import annotations

import argparse

from ..errors import FastGPTError


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt files (one document each), .jsonl files (one document "
                        "per line) or folders of them")
    parser.add_argument("--out", required=True, help="dataset folder to write (shards + meta.json)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (default), 'bpe:<vocab size>' to train a BPE on the inputs, a "
                             "tokenizer file (fastgpt JSON or a tokenizer.json), or a Hugging Face model "
                             "folder (the tokenizer a model started from it uses)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--seed", type=int, default=0)


def run_prepare(args: argparse.Namespace) -> int:
    from ..data import iter_documents, prepare
    from ..tokenizer import load_tokenizer
    if args.tokenizer.startswith("bpe:"):
        from ..tokenizer_hf import train_bpe
        try:
            size = int(args.tokenizer[4:])
        except ValueError:
            raise FastGPTError(f"--tokenizer {args.tokenizer}: expected bpe:<vocab size>") from None
        tok = train_bpe((text for _, text in iter_documents(args.inputs, args.text_field)), size)
    else:
        tok = load_tokenizer(args.tokenizer)
    meta = prepare(args.inputs, args.out, tok, val_fraction=args.val_fraction,
                   shard_tokens=args.shard_tokens, text_field=args.text_field, seed=args.seed)
    print(f"prepare: {meta['documents']['train']:,} train / {meta['documents']['val']:,} val documents, "
          f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens ({tok.kind} tokenizer, "
          f"{tok.vocab_size} ids) -> {args.out}")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the policy to sample from (usually the SFT run)")
    parser.add_argument("--prompts", required=True, help='JSONL of {"prompt": str} or {"messages": [...]}')
    parser.add_argument("--out", required=True, help="comparisons JSONL to write")
    parser.add_argument("-k", type=int, default=4, help="responses per prompt, 2..9 (default 4)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="rows sampled together")


def run_compare(args: argparse.Namespace) -> int:
    from ..rank import compare
    out = compare(args.checkpoint, args.prompts, args.out, k=args.k, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, device=args.device, batch_size=args.batch_size)
    print(f"compare: {args.k} responses per prompt -> {out}")
    return 0


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("comparisons", help="comparisons JSONL from `fastgpt compare`")
    parser.add_argument("--out", required=True, help="rankings JSONL (appended to; resumed from)")


def run_rank(args: argparse.Namespace) -> int:
    from ..rank import rank_interactive
    rank_interactive(args.comparisons, args.out)
    return 0
