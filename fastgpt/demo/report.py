"""The demo's report: ``report.md`` (tables, plots, sample answers) and ``report.json`` (raw figures).

Everything is read back from what the stages wrote (their ``done.json`` summaries, each run's
``metrics.jsonl`` and the evaluation's answer files), so the report can be rebuilt from a run
folder alone. Plots use matplotlib's Agg backend: no display is needed.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..console import plural

MODEL_NAMES = {"pretrain": "base (pre-trained)", "sft": "SFT", "ppo": "PPO"}
ACCURACY_BAR = 0.75  # the reward model's held-out pairwise accuracy the demo aims for


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order, skipping records without it."""
    pts = sorted((r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float)))
    return [s for s, _ in pts], [v for _, v in pts]


def figures(out: Path, records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The raw figures of a finished demo from the stages' done.json records."""
    s = {name: rec["summary"] for name, rec in records.items()}
    ev = s["evaluate"]
    ppo_eval, ppo_sft = s["ppo"].get("eval", {}), s["ppo"].get("sft", {})
    models = ev["models"]
    win = ev["win_rates"].get("ppo_vs_sft", {})
    reward_acc = s["reward"].get("eval", {}).get("val_accuracy", math.nan)
    noise = s["rank"].get("noise", 0.0)
    fig = {
        "run": run,
        "stage_seconds": {name: rec["seconds"] for name, rec in records.items()},
        "total_seconds": sum(rec["seconds"] for rec in records.values()),
        "models": {name: {k: v for k, v in m.items() if k != "per_task"} for name, m in models.items()},
        "per_task_accuracy": {name: m.get("per_task", {}) for name, m in models.items()},
        "reward": {
            "val_accuracy": reward_acc,
            "val_accuracy_ceiling": 1.0 - noise,  # the labels themselves are flipped this often
            "labeler_agreement": ev.get("rm_agreement", {}).get("accuracy", math.nan),
            "labeler_agreement_pairs": ev.get("rm_agreement", {}).get("pairs", 0),
            "train_prompts": s["reward"].get("data", {}).get("train"),
        },
        "win_rates": ev["win_rates"],
        "ppo": {
            "kl_to_sft": ppo_eval.get("kl_to_ref", math.nan),
            "rm_score_sft": ppo_sft.get("score_greedy", math.nan),
            "rm_score_ppo": ppo_eval.get("score_greedy", math.nan),
            "steps": s["ppo"].get("steps"), "rollouts": s["ppo"].get("rollouts"),
        },
    }
    # The bars, checked on the held-out figures (reported, never tuned here).
    decided = win.get("wins", 0) + win.get("losses", 0)
    fig["bars"] = {
        "sft_format_gain": models["sft"]["format_compliance"] - models["pretrain"]["format_compliance"],
        "sft_beats_base_on_format": models["sft"]["format_compliance"] >= models["pretrain"]["format_compliance"] + 0.5,
        "reward_accuracy_at_least_75": reward_acc >= ACCURACY_BAR,
        "ppo_win_rate_at_least_60": decided > 0 and win["wins"] / decided >= 0.60,
        "under_10_minutes": fig["total_seconds"] < 600,
    }
    return fig


def per_rollout(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rollout numbers, values) of a PPO metric that is constant within a rollout: one point per
    rollout, not one per optimizer step (which would draw each rollout as a flat stair)."""
    points: dict[int, float] = {}
    for r in records:
        if "rollout" in r and isinstance(r.get(key), (int, float)):
            points.setdefault(int(round(r["rollout"])), r[key])
    return sorted(points), [points[k] for k in sorted(points)]


def smoothed(ys: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


@dataclass
class Panel:
    title: str
    curves: list[tuple[str, list[int], list[float], dict[str, Any]]]  # label, xs, ys, matplotlib style
    xlabel: str = "step"
    bars: list[tuple[float, str]] = field(default_factory=list)  # horizontal reference lines: (y, label)


def _plot(path: Path, panels: list[Panel]) -> Path | None:
    """One row of line-plot panels; None if nothing to draw."""
    panels = [p for p in panels if any(c[1] for c in p.curves)]
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys, style in panel.curves:
            if xs:
                ax.plot(xs, ys, label=label, **{"marker": "o" if len(xs) < 15 else None, "markersize": 3, **style})
        for y, label in panel.bars:
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def make_plots(out: Path) -> dict[str, Path]:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    m = {stage: read_metrics(out / stage / "run") for stage in ("pretrain", "sft", "reward", "ppo")}
    plain: dict[str, Any] = {}
    acc_steps, acc = series(m["reward"], "accuracy")
    made = {
        "loss": _plot(plots / "loss.png", [
            Panel("pre-training loss", [("train", *series(m["pretrain"], "loss"), plain),
                                        ("val", *series(m["pretrain"], "eval/val_loss"), plain)]),
            Panel("SFT loss", [("train", *series(m["sft"], "loss"), plain),
                               ("val", *series(m["sft"], "eval/val_loss"), plain)]),
        ]),
        "reward": _plot(plots / "reward.png", [
            Panel("reward model pairwise accuracy", [
                ("train (per batch)", acc_steps, acc, {"alpha": 0.3, "marker": None}),
                ("train (smoothed)", acc_steps, smoothed(acc, max(1, len(acc) // 10)), {"marker": None}),
                ("held-out", *series(m["reward"], "eval/val_accuracy"), {"marker": "o"})],
                bars=[(ACCURACY_BAR, f"bar ({ACCURACY_BAR:.0%})")]),
        ]),
        "ppo": _plot(plots / "ppo.png", [
            Panel("PPO reward (normalised RM score)", [("rollout mean", *per_rollout(m["ppo"], "score"), plain)],
                  xlabel="rollout"),
            Panel("PPO KL to SFT (nats / response)", [("rollout mean", *per_rollout(m["ppo"], "kl"), plain)],
                  xlabel="rollout"),
        ]),
    }
    return {k: v for k, v in made.items() if v is not None}


def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return (text or "(empty)").replace("|", "\\|")


def sample_table(out: Path, n: int = 8) -> list[str]:
    """Markdown rows: one held-out prompt per task family, each stage's answer side by side."""
    answers = {}
    for name in MODEL_NAMES:
        path = out / "evaluate" / f"answers_{name}.jsonl"
        if path.exists():
            answers[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not answers:
        return []
    first = next(iter(answers.values()))
    picked, seen = [], set()
    for i, row in enumerate(first):
        if row.get("task") not in seen:
            seen.add(row.get("task"))
            picked.append(i)
        if len(picked) == n:
            break
    names = list(answers)
    lines = ["| prompt | " + " | ".join(MODEL_NAMES[x] for x in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i in picked:
        cells = []
        for x in names:
            r = answers[x][i]
            mark = "✓" if r["correct"] else "✗"
            cells.append(f"{mark} {_cell(r['response'])}{'' if r['finished'] else ' (no end)'}")
        lines.append(f"| {_cell(first[i]['prompt'])} | " + " | ".join(cells) + " |")
    return lines


def smoke_note(run: dict[str, Any]) -> str:
    """A warning for a shrunk run (``--quick`` / ``--scale`` below 1), whose figures mean nothing."""
    scale = run.get("scale", 1.0)
    if scale >= 1.0:
        return ""
    return (f"SMOKE RUN (scale {scale:g}, e.g. --quick): every stage ran a few steps on a sliver of the data, so "
            f"none of these figures or bars says anything about quality; `fastgpt demo` (with --fresh in this "
            f"folder) gives the real ones.")


def format_table(fig: dict[str, Any]) -> str:
    """The per-model table (plain text, for the terminal)."""
    rows = [("model", "accuracy", "labeler score", "format", "mean length")]
    for name, m in fig["models"].items():
        rows.append((MODEL_NAMES.get(name, name), f"{m['accuracy']:.1%}", f"{m['labeler_score']:+.2f}",
                     f"{m['format_compliance']:.1%}", f"{m['mean_length']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ([smoke_note(fig["run"])] if smoke_note(fig["run"]) else []) + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    w = fig["win_rates"].get("ppo_vs_sft", {})
    rw, ppo = fig["reward"], fig["ppo"]
    lines += [
        f"reward model: held-out pairwise accuracy {rw['val_accuracy']:.1%} (noisy labels, ceiling "
        f"~{rw['val_accuracy_ceiling']:.0%}); agreement with the labeler's true preference {rw['labeler_agreement']:.1%}",
        f"PPO vs SFT (labeler): {w.get('wins', 0)} wins, {w.get('losses', 0)} losses, {w.get('ties', 0)} ties "
        f"-> win rate {w.get('win_rate', math.nan):.1%} of decided; KL to SFT {ppo['kl_to_sft']:.2f} nats/response",
        f"total time {fig['total_seconds']:.0f}s on {fig['run']['device']}",
    ]
    return "\n".join(lines)


def _markdown_models(fig: dict[str, Any]) -> list[str]:
    lines = ["| model | task accuracy | labeler score | format compliance | mean length (chars) |",
             "|---|---|---|---|---|"]
    for name, m in fig["models"].items():
        lines.append(f"| {MODEL_NAMES.get(name, name)} | {m['accuracy']:.1%} | {m['labeler_score']:+.2f} | "
                     f"{m['format_compliance']:.1%} | {m['mean_length']:.0f} |")
    return lines


def write_report(out: str | Path, records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and plots/*.png under ``out``; returns their paths."""
    out = Path(out)
    fig = figures(out, records, run)
    plots = make_plots(out)
    (out / "report.json").write_text(json.dumps(fig, indent=2, default=str))
    rw, ppo, n = fig["reward"], fig["ppo"], records["evaluate"]["summary"]["n_prompts"]
    note = smoke_note(run)
    md = [f"# fastgpt demo report (preset {run['preset']}, seed {run['seed']})", "",
          *([f"**{note}**", ""] if note else []),
          f"Held-out evaluation on {n} prompts no stage trained on; greedy answers through the chat template, "
          "judged by the simulated labeler.", "", *_markdown_models(fig), ""]
    md.append("| comparison (labeler, noiseless) | wins | losses | ties | win rate of decided |")
    md.append("|---|---|---|---|---|")
    for key, w in fig["win_rates"].items():
        a, b = key.split("_vs_")
        md.append(f"| {MODEL_NAMES[a]} over {MODEL_NAMES[b]} | {w['wins']} | {w['losses']} | {w['ties']} | "
                  f"{w['win_rate']:.1%} |")
    md += ["",
           f"- Reward model: held-out pairwise accuracy **{rw['val_accuracy']:.1%}** on the rankings it did not "
           f"train on (the labeler flips ~{1 - rw['val_accuracy_ceiling']:.0%} of pairs, so a perfect model scores "
           f"about {rw['val_accuracy_ceiling']:.0%}); agreement with the labeler's noiseless preference on SFT samples "
           f"for the evaluation prompts: {rw['labeler_agreement']:.1%} of {rw['labeler_agreement_pairs']} pairs.",
           f"- PPO: {plural(ppo['steps'], 'step')} over {plural(ppo['rollouts'], 'rollout')}; held-out reward-model score (greedy) "
           f"{ppo['rm_score_sft']:+.2f} (SFT) -> {ppo['rm_score_ppo']:+.2f} (PPO); KL to SFT "
           f"{ppo['kl_to_sft']:.2f} nats per sampled response.", "",
           "## Bars", ""]
    md += [f"- {k}: {v if isinstance(v, bool) else f'{v:+.1%}'}" for k, v in fig["bars"].items()]
    if "methods" in records:  # fastgpt demo --methods: PPO, DPO, GRPO from the same SFT model and labels
        from .methods import methods_table
        fig["methods"] = records["methods"]["summary"]["methods"]
        (out / "report.json").write_text(json.dumps(fig, indent=2, default=str))
        md += ["", "## Methods compared (same SFT model, same labels)", "",
               f"Held-out prompts ({records['methods']['summary']['n_prompts']}), greedy answers judged by the "
               f"simulated labeler; KL on {records['methods']['summary']['kl_prompts']} sampled answers; wall time "
               "and peak memory of the method's stage.", "", *methods_table(fig["methods"])]
    md += ["", "## Time", "", f"Device: {run['device']}.", "", "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v:.1f} |" for k, v in fig["stage_seconds"].items()]
    md += [f"| **total** | **{fig['total_seconds']:.1f}** |", "", "## Curves", ""]
    md += [f"![{k}](plots/{p.name})" for k, p in plots.items()]
    md += ["", "## Sample answers (held-out; ✓ correct, ✗ wrong)", "", *sample_table(out), ""]
    md += ["## Accuracy per task", "", "| task | " + " | ".join(MODEL_NAMES[m] for m in fig["per_task_accuracy"]) + " |",
           "|---" * (len(fig["per_task_accuracy"]) + 1) + "|"]
    tasks = sorted({t for per in fig["per_task_accuracy"].values() for t in per})
    for t in tasks:
        md.append(f"| {t} | " + " | ".join(f"{per.get(t, math.nan):.0%}" for per in fig["per_task_accuracy"].values()) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"report_md": out / "report.md", "report_json": out / "report.json", **plots}
