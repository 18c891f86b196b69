"""The commands that generate text from a checkpoint: ``sample`` and ``chat``."""
from __future__ import annotations

import argparse
from typing import Sequence
import sys

from ..errors import FastGPTError
from .settings import add_sampling_arguments, sampling_params


def add_sample_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("checkpoint", help="a run folder or checkpoint file of any stage")
    parser.add_argument("--prompt", default="", help="text to continue (default: the start of a document)")
    parser.add_argument("--chat", action="store_true", help="treat --prompt as a user message and answer it "
                        "as the assistant (for a conversation: fastgpt chat)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to print (default: %(default)s)")
    add_sampling_arguments(parser, temperature=0.8, top_p=1.0, max_new_tokens=200)


def run_sample(args: argparse.Namespace) -> int:
    if args.chat and not args.prompt.strip():
        raise FastGPTError("--chat needs --prompt TEXT, the user message to answer (for a conversation: fastgpt chat)")
    if args.num_samples < 1:
        raise FastGPTError(f"--num-samples {args.num_samples}: expected at least 1")
    from ..checkpoint import load_model
    from ..engine import generate
    from ..tokenizer import encode_prompt, prompt_messages
    from ..trainer import resolve_device
    device = resolve_device(args.device)
    model, tok, _ = load_model(args.checkpoint, kind="gpt", device=device)
    if args.chat:
        prompt = encode_prompt(tok, prompt_messages(args.prompt))
        stops: tuple[int, ...] = tok.stop_ids
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


def add_chat_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    parser.add_argument("checkpoint", help="a run folder or checkpoint file of any stage (pretrain, sft, ppo)")
    parser.add_argument("--system", default=None, help="system message (default: none; /system TEXT sets one "
                        "while chatting)")
    add_sampling_arguments(parser, temperature=0.7, top_p=0.9, max_new_tokens=200)


def run_chat(args: argparse.Namespace) -> int:
    from ..chat import chat_loop
    from ..checkpoint import load_model
    from ..trainer import resolve_device
    model, tok, ckpt = load_model(args.checkpoint, kind="gpt", device=resolve_device(args.device))
    params = sampling_params(args, stop_ids=tok.stop_ids)
    print(f"fastgpt chat: {ckpt['stage']} checkpoint {args.checkpoint}")
    chat_loop(model, tok, params, input, sys.stdout, system=args.system)
    return 0
