"""``fastgpt demo``: the whole pipeline on the built-in world (:mod:`fastgpt.demo.pipeline`)."""
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


def run_demo(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_pipeline
    from ..demo.report import format_table
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    scale = 0.05 if args.quick else args.scale
    figures = run_pipeline(args.out, args.preset, args.device, args.seed, scale)
    print(format_table(figures))
    return 0
