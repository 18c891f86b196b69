"""The training stage commands: ``pretrain``, ``sft``, ``reward``, ``ppo``, ``dpo`` and ``grpo``.

Each builds its stage's config from flags (:mod:`.settings`), fills data the user left out
with the built-in world (:func:`fastgpt.demo.builtin.fill_builtin_data`, the one place that
decides it), calls the stage function and prints a one-line summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import ConfigError
from .settings import add_config_arguments, config_from_args


def _stage_config(cls: type, args: argparse.Namespace) -> Any:
    from ..demo.builtin import fill_builtin_data
    return fill_builtin_data(config_from_args(cls, args))


# ------------------------------------------------------------------------ pretrain
def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import PretrainConfig
    add_config_arguments(parser, PretrainConfig)


def run_pretrain(args: argparse.Namespace) -> int:
    from ..stages.configs import PretrainConfig
    from ..stages.pretrain import pretrain
    summary = pretrain(_stage_config(PretrainConfig, args))
    print(f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f}s; "
          f"val_loss {summary['eval'].get('val_loss', float('nan')):.4f}; checkpoint in {summary['out_dir']}")
    return 0


# ----------------------------------------------------------------------------- sft
def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import SFTConfig
    add_config_arguments(parser, SFTConfig)


def run_sft(args: argparse.Namespace) -> int:
    from ..stages.configs import SFTConfig
    from ..stages.sft import sft
    summary = sft(_stage_config(SFTConfig, args))
    ev, d = summary["eval"], summary["data"]
    print(f"sft: {summary['steps']} steps on {d['train']} conversations ({d['val']} held out, {d['skipped']} "
          f"skipped, {d['truncated']} truncated) in {summary['seconds']:.0f}s; val_loss "
          f"{ev.get('val_loss', float('nan')):.4f}, format_rate {ev.get('format_rate', float('nan')):.2f}; "
          f"checkpoint in {summary['out_dir']}")
    return 0


# -------------------------------------------------------------------------- reward
def add_reward_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import RewardConfig
    parser.add_argument("--score", metavar="FILE", help="instead of training: score each {prompt, response} "
                        "line of FILE with --checkpoint and print JSONL with a 'score' field")
    parser.add_argument("--checkpoint", metavar="CKPT", help="reward model checkpoint for --score")
    add_config_arguments(parser, RewardConfig)


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
                       [r.get("finished", True) for r in records], extra, batch_size=cfg.batch_size)
        for rec, s in zip(records, scores):
            print(json.dumps({**rec, "score": s}, ensure_ascii=False))
        sys.stdout.flush()
        return 0
    summary = train_reward(cfg)
    ev, d = summary["eval"], summary["data"]
    print(f"reward: {summary['steps']} steps on {d['train']} prompts ({d['val']} held out, {d['skipped']} skipped, "
          f"{d['truncated']} responses truncated) in {summary['seconds']:.0f}s; val_accuracy "
          f"{ev.get('val_accuracy', float('nan')):.3f}, val_margin {ev.get('val_margin', float('nan')):.3f}; "
          f"SFT responses: offset {summary['reward_offset']:.3f} scale {summary['reward_scale']:.3f}; "
          f"checkpoint in {summary['out_dir']}")
    return 0


# ----------------------------------------------------------------------------- ppo
def add_ppo_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import PPOConfig
    add_config_arguments(parser, PPOConfig)


def run_ppo(args: argparse.Namespace) -> int:
    from ..stages.configs import PPOConfig
    from ..stages.ppo import ppo
    print(_policy_summary("ppo", ppo(_stage_config(PPOConfig, args))))
    return 0


def _policy_summary(stage: str, summary: dict[str, Any]) -> str:
    """The held-out line of an RL stage (PPO, GRPO): final policy vs the SFT start."""
    ev, sft, nan = summary["eval"], summary["sft"], float("nan")
    return (f"{stage}: {summary['steps']} steps, {summary['rollouts']} rollouts in {summary['seconds']:.0f}s; "
            f"held-out score (greedy) {ev.get('score_greedy', nan):+.3f} vs SFT {sft.get('score_greedy', nan):+.3f}, "
            f"(sampled) {ev.get('score_sampled', nan):+.3f} vs SFT {sft.get('score_sampled', nan):+.3f}; "
            f"KL to SFT {ev.get('kl_to_ref', nan):.3f} nats/response; checkpoint in {summary['out_dir']}")


# ----------------------------------------------------------------------------- dpo
def add_dpo_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import DPOConfig
    add_config_arguments(parser, DPOConfig)


def run_dpo(args: argparse.Namespace) -> int:
    from ..stages.configs import DPOConfig
    from ..stages.dpo import dpo
    summary = dpo(config_from_args(DPOConfig, args))
    ev, d, nan = summary["eval"], summary["data"], float("nan")
    print(f"dpo: {summary['steps']} steps on {d['train']} prompts ({d['val']} held out, {d['skipped']} skipped, "
          f"{d['truncated']} responses truncated) in {summary['seconds']:.0f}s; held-out reward accuracy "
          f"{ev.get('val_accuracy', nan):.3f}, margin {ev.get('val_margin', nan):.3f}; checkpoint in {summary['out_dir']}")
    return 0


# ---------------------------------------------------------------------------- grpo
def add_grpo_arguments(parser: argparse.ArgumentParser) -> None:
    from ..stages.configs import GRPOConfig
    add_config_arguments(parser, GRPOConfig)


def run_grpo(args: argparse.Namespace) -> int:
    from ..stages.configs import GRPOConfig
    from ..stages.grpo import grpo
    print(_policy_summary("grpo", grpo(_stage_config(GRPOConfig, args))))
    return 0
