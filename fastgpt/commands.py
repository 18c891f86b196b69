"""Small commands that are not training stages: ``prepare`` and ``sample``."""
from __future__ import annotations

import argparse
import sys

from .cli import add_sampling_arguments, sampling_params
from .errors import FastGPTError


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help=".txt files (one document each), .jsonl files (one document "
                        "per line) or folders of them")
    parser.add_argument("--out", required=True, help="dataset folder to write (shards + meta.json)")
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte' (default), 'bpe:<vocab size>' to train a BPE on the inputs, or a "
                             "tokenizer file (fastgpt JSON or a GPT-2 tokenizer.json)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--seed", type=int, default=0)


def run_prepare(args: argparse.Namespace) -> int:
    from .data import iter_documents, prepare
    from .tokenizer import load_tokenizer
    if args.tokenizer.startswith("bpe:"):
        from .tokenizer_hf import train_bpe
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


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder or checkpoint file of any stage")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    parser.add_argument("--chat", action="store_true", help="treat --prompt as a user message and answer it")
    parser.add_argument("--num-samples", type=int, default=1)
    add_sampling_arguments(parser, temperature=0.8, top_p=1.0, max_new_tokens=200)


def run_sample(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .engine import generate
    from .tokenizer import encode_prompt, prompt_messages
    from .trainer import resolve_device
    device = resolve_device(args.device)
    model, tok, _ = load_model(args.checkpoint, kind="gpt", device=device)
    if args.chat:
        prompt = encode_prompt(tok, prompt_messages(args.prompt))
        stops: tuple[int, ...] = (tok.end_id,)
    else:
        prompt = [tok.eot_id] + tok.encode(args.prompt)
        stops = (tok.eot_id,)
    params = sampling_params(args, stops)
    outs = generate(model, [prompt] * args.num_samples, params, vocab_limit=tok.vocab_size)
    for i, g in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        text = tok.decode(g.tokens)
        print(text if args.chat else args.prompt + text)
    sys.stdout.flush()
    return 0
