"""The training stage commands: ``pretrain``, ``sft``, ``reward``, ``ppo``, ``dpo`` and ``grpo``.

Each builds its stage's config from flags (:mod:`.settings`), fills data the user left out
with the built-in world (:func:`fastgpt.demo.builtin.fill_builtin_data`, the one place that
decides it), calls the stage function and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ..config import ConfigError
from ..console import plural
from .settings import add_config_arguments, config_from_args

NAN = float("nan")


def _stage_config(cls: type, args: argparse.Namespace) -> Any:
    """The stage's config from flags, with the built-in world's files for data left out; under
    torchrun rank 0 writes those files before the other processes read them."""
    from ..demo.builtin import fill_builtin_data
    from ..distributed import distributed_env, init_process_group, main_first
    from ..trainer import resolve_device
    cfg = config_from_args(cls, args)
    info = distributed_env()
    init_process_group(info, resolve_device(cfg.device, info), cfg.fsdp)
    with main_first(info):
        return fill_builtin_data(cfg)


def _steps(summary: dict[str, Any]) -> str:
    """'30 steps in 12s' for a run from scratch; this run's share and the total after a resume."""
    text = f"{plural(summary['steps_this_run'], 'step')} in {summary['seconds']:.0f}s"
    if summary["resumed_from"] is not None:
        text += f" this run ({summary['steps']:,} in all, {summary['seconds_total']:.0f}s in all)"
    return text


# ------------------------------------------------------------------------ pretrain
def add_pretrain_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import PretrainConfig
    add_config_arguments(parser, PretrainConfig, argv)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..stages.configs import PretrainConfig
    from ..stages.pretrain import pretrain
    summary = pretrain(_stage_config(PretrainConfig, args))
    print(f"pretrain: {_steps(summary)}, {summary['tokens_this_run']:,} tokens; val_loss "
          f"{summary['eval'].get('val_loss', NAN):.4f}; checkpoint in {summary['out_dir']}")
    return 0


# ----------------------------------------------------------------------------- sft
def add_sft_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import SFTConfig
    add_config_arguments(parser, SFTConfig, argv)


def run_sft(args: argparse.Namespace) -> int:
    from ..stages.configs import SFTConfig
    from ..stages.sft import sft
    summary = sft(_stage_config(SFTConfig, args))
    ev, d = summary["eval"], summary["data"]
    print(f"sft: {_steps(summary)} on {plural(d['train'], 'conversation')} ({d['val']:,} held out, "
          f"{d['skipped']:,} skipped, {d['truncated']:,} truncated); val_loss {ev.get('val_loss', NAN):.4f}, "
          f"format_rate {ev.get('format_rate', NAN):.2f}; checkpoint in {summary['out_dir']}")
    return 0


# -------------------------------------------------------------------------- reward
def add_reward_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import RewardConfig
    parser.add_argument("--score", metavar="FILE", help="instead of training: score each {prompt, response} "
                        "line of FILE with --checkpoint and print JSONL with a 'score' field")
    parser.add_argument("--checkpoint", metavar="CKPT", help="reward model checkpoint for --score")
    add_config_arguments(parser, RewardConfig, argv)


def run_reward(args: argparse.Namespace) -> int:
    from ..stages.configs import RewardConfig
    from ..stages.reward import load_reward_model, read_scoring_file, score, train_reward
    from ..trainer import resolve_device
    cfg = config_from_args(RewardConfig, args)
    if args.score:
        if not args.checkpoint:
            raise ConfigError("--score needs --checkpoint CKPT (a reward model)")
        records = read_scoring_file(args.score)
        model, tok, extra = load_reward_model(args.checkpoint, resolve_device(cfg.device))
        scores = score(model, tok, [r["prompt"] for r in records], [r["response"] for r in records],
                       [r.get("finished", True) for r in records], extra,
                       batch_size=cfg.batch_size or 16)  # no gradients: any row count fits
        for rec, s in zip(records, scores):
            print(json.dumps({**rec, "score": s}, ensure_ascii=False))
        sys.stdout.flush()
        return 0
    summary = train_reward(cfg)
    ev, d = summary["eval"], summary["data"]
    print(f"reward: {_steps(summary)} on {plural(d['train'], 'ranked prompt')} ({d['val']:,} held out, "
          f"{d['skipped']:,} skipped, {plural(d['truncated'], 'response')} truncated); val_accuracy "
          f"{ev.get('val_accuracy', NAN):.3f}, val_margin {ev.get('val_margin', NAN):.3f}; SFT responses: offset "
          f"{summary['reward_offset']:.3f} scale {summary['reward_scale']:.3f}; checkpoint in {summary['out_dir']}")
    return 0


# ----------------------------------------------------------------------------- ppo
def add_ppo_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import PPOConfig
    add_config_arguments(parser, PPOConfig, argv)


def run_ppo(args: argparse.Namespace) -> int:
    from ..stages.configs import PPOConfig
    from ..stages.ppo import ppo
    print(_policy_summary("ppo", ppo(_stage_config(PPOConfig, args))))
    return 0


def _policy_summary(stage: str, summary: dict[str, Any]) -> str:
    """The one-line summary of an RL stage (PPO, GRPO): the final policy's held-out scores vs the SFT start."""
    ev, sft = summary["eval"], summary["sft"]
    if summary["held_out_prompts"]:
        scores = (f"held-out score on {plural(summary['held_out_prompts'], 'prompt')} (greedy) "
                  f"{ev.get('score_greedy', NAN):+.3f} vs SFT {sft.get('score_greedy', NAN):+.3f}, (sampled) "
                  f"{ev.get('score_sampled', NAN):+.3f} vs SFT {sft.get('score_sampled', NAN):+.3f}; KL to SFT "
                  f"{ev.get('kl_to_ref', NAN):.3f} nats/response")
    else:
        scores = "no held-out prompts, so no held-out score (give --eval_prompts, or --eval_fraction above 0)"
    return f"{stage}: {_steps(summary)}, {plural(summary['rollouts'], 'rollout')}; {scores}; " \
           f"checkpoint in {summary['out_dir']}"


# ----------------------------------------------------------------------------- dpo
def add_dpo_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import DPOConfig
    add_config_arguments(parser, DPOConfig, argv)


def run_dpo(args: argparse.Namespace) -> int:
    from ..stages.configs import DPOConfig
    from ..stages.dpo import dpo
    summary = dpo(config_from_args(DPOConfig, args))
    ev, d = summary["eval"], summary["data"]
    print(f"dpo: {_steps(summary)} on {plural(d['train'], 'ranked prompt')} ({d['val']:,} held out, "
          f"{d['skipped']:,} skipped, {plural(d['truncated'], 'response')} truncated); held-out reward accuracy "
          f"{ev.get('val_accuracy', NAN):.3f}, margin {ev.get('val_margin', NAN):.3f}; checkpoint in {summary['out_dir']}")
    return 0


# ---------------------------------------------------------------------------- grpo
def add_grpo_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..stages.configs import GRPOConfig
    add_config_arguments(parser, GRPOConfig, argv)


def run_grpo(args: argparse.Namespace) -> int:
    from ..stages.configs import GRPOConfig
    from ..stages.grpo import grpo
    print(_policy_summary("grpo", grpo(_stage_config(GRPOConfig, args))))
    return 0
