"""``fastgpt demo``: the whole pipeline on the built-in world (:mod:`fastgpt.demo.pipeline`), and
``fastgpt compare-methods``: the demo with PPO, DPO and GRPO over several seeds (:mod:`fastgpt.demo.methods`)."""
from __future__ import annotations

import argparse
from typing import Sequence
import shutil
from pathlib import Path


def add_demo_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..demo.pipeline import BUDGETS
    parser.add_argument("--preset", choices=sorted(BUDGETS), default="tiny",
                        help="model size and stage budgets (tiny: under 10 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="runs/demo", help="run folder; re-running resumes it (default runs/demo)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the labeler and every stage")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count and data size")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (--scale 0.05), for CI")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    parser.add_argument("--methods", default="ppo", help="RL methods to run from the same SFT model and labels, "
                        "compared in the report: a comma-separated subset of ppo,dpo,grpo,ptx_only (ptx_only: PPO with "
                        "its reward set to 0, an ablation; default ppo)")


def run_demo(args: argparse.Namespace) -> int:
    from ..demo.methods import methods_table, parse_methods
    from ..demo.pipeline import run_pipeline
    from ..demo.report import format_table
    methods = parse_methods(args.methods)
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    scale = 0.05 if args.quick else args.scale
    figures = run_pipeline(args.out, args.preset, args.device, args.seed, scale, methods=methods)
    print(format_table(figures))
    if "methods" in figures:
        print("\n".join(methods_table(figures["methods"])))
    return 0


def add_compare_methods_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> None:
    from ..demo.pipeline import BUDGETS
    parser.add_argument("--methods", default="ppo,dpo,grpo", help="a comma-separated subset of ppo,dpo,grpo,ptx_only")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--preset", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--out", default="runs/methods", help="one demo run per seed under it, resumable")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count and data size")


def run_compare_methods(args: argparse.Namespace) -> int:
    from ..console import plural
    from ..demo.methods import aggregate_table, compare_methods, parse_methods
    from ..errors import FastGPTError
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise FastGPTError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    result = compare_methods(args.out, seeds, parse_methods(args.methods), args.preset, args.device, args.scale)
    print("\n".join(aggregate_table(result["aggregate"])))
    print(f"compare-methods: {plural(len(seeds), 'seed')}; table in {Path(args.out) / 'methods.md'}")
    return 0
