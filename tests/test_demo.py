"""The demo pipeline end to end, shrunk (``--quick``): every stage writes its outputs and the
report, and a second run with the same folder resumes by skipping the finished stages.

The shrunk run trains for a few steps only, so these tests check plumbing, not quality; the
quality bars are measured by the full ``fastgpt demo`` run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.demo.methods import METHODS
from fastgpt.demo.pipeline import BUDGETS, DONE, STAGES, run_pipeline
from fastgpt.demo.report import format_table

QUICK = 0.05


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, float]:
    """One quick demo through the CLI, as a user runs it, with every method; returns (folder, seconds)."""
    out = tmp_path_factory.mktemp("demo") / "seed-1"  # the folder compare-methods gives seed 1
    start = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--seed", "1", "--methods", ",".join(METHODS)]) == 0
    return out, time.perf_counter() - start


def test_every_stage_wrote_its_outputs(demo_run):
    out, _ = demo_run
    for stage in STAGES:
        record = json.loads((out / stage / DONE).read_text())
        assert record["stage"] == stage and record["seconds"] >= 0 and "summary" in record
    for name in ("pretrain.jsonl", "sft.jsonl", "compare_prompts.jsonl", "ppo_prompts.jsonl", "eval.jsonl",
                 "dev_prompts.jsonl"):
        assert (out / "world" / name).stat().st_size > 0
    assert (out / "prepare" / "data" / "meta.json").exists()
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
        run = out / stage / "run"
        assert (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists(), stage
    comparisons = [json.loads(line) for line in (out / "compare" / "comparisons.jsonl").read_text().splitlines()]
    assert comparisons and all(len(c["responses"]) == BUDGETS["tiny"].k for c in comparisons)
    rankings = [json.loads(line) for line in (out / "rank" / "rankings.jsonl").read_text().splitlines()]
    # the same format `fastgpt rank` writes, and never an all-tied ranking (it holds no preference)
    assert rankings and all(set(r) >= {"prompt", "responses", "finished", "ranking"} for r in rankings)
    assert all(len(r["ranking"]) > 1 for r in rankings)
    for name in ("pretrain", "sft", "ppo", "ppo_best", "best_of_4", "best_of_16"):
        answers = (out / "evaluate" / f"answers_{name}.jsonl").read_text().splitlines()
        assert len(answers) == json.loads((out / "world" / DONE).read_text())["summary"]["eval_items"]


def test_report_has_table_plots_and_figures(demo_run):
    out, _ = demo_run
    md = (out / "report.md").read_text()
    for needle in ("| model |", "best-of-16 (SFT + RM)", "PPO (best.pt)", "## Over-optimisation",
                   "## Sample answers", "| **total** |"):
        assert needle in md
    for plot in ("loss.png", "reward.png", "ppo.png", "overoptimisation.png"):
        path = out / "plots" / plot
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{plot}" in md
    fig = json.loads((out / "report.json").read_text())
    assert set(fig["models"]) == {"pretrain", "sft", "best_of_1", "best_of_4", "best_of_16", "ppo", "ppo_best"}
    for m in fig["models"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["format_compliance"] <= 1.0
    win = fig["win_rates"]["ppo_vs_sft"]
    assert win["wins"] + win["losses"] + win["ties"] == fig["models"]["ppo"]["n"]
    assert {"val_accuracy", "val_accuracy_reward_model", "labeler_agreement", "correctness_accuracy",
            "style_accuracy"} <= set(fig["reward"])
    # the demo's reward reads the base model's likelihood, and PPO reads the same reward
    reward = json.loads((out / "reward" / DONE).read_text())["summary"]
    assert set(reward["likelihood_weights"]) == {"reward", "mean_logprob", "min_logprob"}
    extra = load_checkpoint(out / "reward" / "run")["extra"]
    assert Path(extra["likelihood"]["checkpoint"]) == (out / "pretrain" / "run").resolve()
    assert "kl_to_sft" in fig["ppo"] and fig["models"]["best_of_16"]["kl_to_sft"] > fig["models"]["best_of_4"]["kl_to_sft"]
    # the over-optimisation curve: SFT at step 0, then every PPO evaluation; best.pt is one of them
    curve = fig["ppo"]["overoptimisation"]
    assert curve[0]["step"] == 0 and curve[0]["kl"] == 0 and len(curve) >= 2
    assert fig["ppo"]["best"]["step"] in [p["step"] for p in curve]  # step 0 (SFT itself) is a candidate too
    assert (out / "ppo" / "run" / "best.pt").exists()
    # GRPO shares PPO's demo settings: the same dev prompts and gold judge pick its best.pt
    grpo = json.loads((out / "grpo" / DONE).read_text())["summary"]
    assert "gold_score_greedy" in grpo["eval"] and (out / "grpo" / "run" / "best.pt").exists()
    assert set(fig["stage_seconds"]) == set(STAGES) - {"report"}
    assert "PPO" in format_table(fig)
    # the methods table: every method from the same SFT model, judged by the labeler
    assert "## Methods compared" in md and set(fig["methods"]) == {"sft", *METHODS}
    for name in METHODS:
        m = fig["methods"][name]
        assert m["kl_to_sft"] == m["kl_to_sft"] and m["seconds"] > 0 and m["peak_mb"] > 0 and 0 <= m["win_rate"] <= 1
    assert "| GRPO |" in md and "| PPO-ptx, reward off |" in md
    # PPO-ptx: PPO's and GRPO's steps add the pre-training loss; the ablation's reward is 0 (less the length guard)
    from fastgpt.demo.report import read_metrics
    for stage in ("ppo", "grpo", "ptx_only"):
        assert any("ptx_loss" in r for r in read_metrics(out / stage / "run")), stage
    assert all(r["score"] == 0 for r in read_metrics(out / "ptx_only" / "run") if "score" in r)


def test_compare_methods_aggregates_seeds(tmp_path):
    from fastgpt.demo.methods import aggregate, aggregate_table
    runs = {0: {"dpo": {"gold_score": 1.0, "accuracy": 0.5}}, 1: {"dpo": {"gold_score": 2.0, "accuracy": 0.7}}}
    agg = aggregate(runs)
    assert agg["dpo"]["gold_score"] == {"mean": 1.5, "sd": pytest.approx(0.7071, abs=1e-4), "n": 2}
    assert "+1.50 ± 0.71" in "\n".join(aggregate_table(agg))


def test_compare_methods_command_tables_the_seeds(demo_run, capsys):
    """compare-methods resumes each seed's demo run in <out>/seed-N (here the finished quick run)
    and writes the methods table over the seeds."""
    out, _ = demo_run
    assert main(["compare-methods", "--out", str(out.parent), "--seeds", "1", "--scale", str(QUICK),
                 "--device", "cpu", "--methods", ",".join(METHODS)]) == 0
    printed = capsys.readouterr().out
    assert "compare-methods: 1 seed; table in" in printed
    table = (out.parent / "methods.md").read_text()
    for row in ("| SFT (start) |", "| PPO |", "| DPO |", "| GRPO |", "| PPO-ptx, reward off |"):
        assert row in table and row in printed, row
    saved = json.loads((out.parent / "methods.json").read_text())
    assert saved["run"]["seeds"] == [1] and set(saved["aggregate"]) == {"sft", *METHODS}


def test_rerun_resumes_by_skipping_finished_stages(demo_run, capsys):
    out, first = demo_run
    before = {s: (out / s / DONE).stat().st_mtime_ns for s in STAGES}
    start = time.perf_counter()
    run_pipeline(out, "tiny", "cpu", seed=1, scale=QUICK, methods=METHODS)
    assert time.perf_counter() - start < max(5.0, first / 10)
    assert {s: (out / s / DONE).stat().st_mtime_ns for s in STAGES} == before
    assert capsys.readouterr().out.count("skipped") == len(STAGES)


def test_a_lost_stage_is_redone_and_later_ones_kept(demo_run, capsys):
    out, _ = demo_run
    (out / "report" / DONE).unlink()
    (out / "report.md").unlink()
    run_pipeline(out, "tiny", "cpu", seed=1, scale=QUICK, methods=METHODS)
    assert (out / "report.md").exists() and (out / "report" / DONE).exists()
    assert capsys.readouterr().out.count("skipped") == len(STAGES) - 1


def test_other_settings_in_the_same_folder_are_refused(demo_run, capsys):
    out, _ = demo_run
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--device", "cpu", "--seed", "2"]) == 2  # a full run after --quick
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed 1 -> 2" in err[0] and "scale 0.05 -> 1.0" in err[0] and "--fresh" in err[0]


def test_a_quick_report_says_it_is_a_smoke_run(demo_run):
    out, _ = demo_run
    md = (out / "report.md").read_text().splitlines()
    assert md[2].startswith("**SMOKE RUN (scale 0.05") and "says anything about quality" in md[2]
    fig = json.loads((out / "report.json").read_text())
    assert format_table(fig).startswith("SMOKE RUN")
    full = {**fig, "run": {**fig["run"], "scale": 1.0}}
    assert "SMOKE" not in format_table(full)


def test_ppo_plot_points_are_rollouts_and_the_reward_curve_is_smoothed(demo_run):
    from fastgpt.demo.report import per_rollout, read_metrics, smoothed
    out, _ = demo_run
    records = read_metrics(out / "ppo" / "run")
    xs, ys = per_rollout(records, "score")
    steps = [r for r in records if "score" in r]
    assert xs == list(range(1, len(xs) + 1)) and len(xs) < len(steps)  # one point per rollout, not per step
    assert ys[0] == steps[0]["score"]
    assert smoothed([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_scaled_budget_shrinks_every_stage():
    full, quick = BUDGETS["tiny"], BUDGETS["tiny"].scaled(QUICK)
    for name in ("n_pretrain", "n_sft", "n_compare", "pretrain_steps", "sft_steps", "ppo_steps"):
        assert 0 < getattr(quick, name) < getattr(full, name), name
    assert quick.mini_batch <= quick.rollout_batch
    assert BUDGETS["tiny"].scaled(1.0) == full


def test_progress_headline_leaves_the_ablations_zero_reward_out():
    from fastgpt.demo.pipeline import _headline
    summary = {"eval": {"score_greedy": 0.0, "gold_score_greedy": 2.5, "kl_to_ref": 1.2},
               "sft": {"score_greedy": 0.0, "gold_score_greedy": 2.0}}
    assert _headline("ptx_only", summary) == " (dev: labeler score +2.00 -> +2.50, KL 1.20)"
    assert _headline("ppo", summary) == " (dev: RM score +0.00 -> +0.00, labeler score +2.00 -> +2.50, KL 1.20)"
