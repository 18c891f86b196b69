"""The demo's report: ``report.md`` (tables, plots, sample answers) and ``report.json`` (raw figures).

Everything is read back from what the stages wrote (their ``done.json`` summaries, each run's
``metrics.jsonl`` and the evaluation's answer files), so the report can be rebuilt from a run
folder alone. Plots use matplotlib's Agg backend: no display is needed.

The over-optimisation plot (Gao et al.) draws PPO's held-out evaluations on its dev prompts:
the gold score (the simulated labeler's noiseless quality) and the proxy (the reward model's
normalised score) of greedy answers against the sampled answers' KL to SFT, with the evaluation
kept as best.pt marked.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..console import plural

# Table order: the baselines first, then what RLHF made.
MODEL_NAMES = {"pretrain": "base (pre-trained)", "sft": "SFT", "best_of_1": "SFT, one sample (T=1)",
               "best_of_4": "best-of-4 (SFT + RM)", "best_of_16": "best-of-16 (SFT + RM)", "ppo": "PPO (last)",
               "ppo_best": "PPO (best.pt)"}
TABLE_MODELS = ("pretrain", "sft", "best_of_4", "best_of_16", "ppo", "ppo_best")
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


def overoptimisation(ppo_summary: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """PPO's held-out evaluations in step order, the SFT policy first as step 0: step, kl, proxy
    (RM score), gold (labeler score), accuracy, length (tokens) of greedy answers on the dev prompts."""
    keys = {"kl": "kl_to_ref", "proxy": "score_greedy", "gold": "gold_score_greedy",
            "accuracy": "gold_accuracy_greedy", "length": "len_greedy"}
    sft = ppo_summary.get("sft", {})
    points = [{"step": 0, **{k: sft.get(v, math.nan) for k, v in keys.items()}}] if sft else []
    for r in sorted(records, key=lambda r: r["step"]):
        if "eval/score_greedy" in r:
            points.append({"step": r["step"], **{k: r.get(f"eval/{v}", math.nan) for k, v in keys.items()}})
    return points


def canonical_length(out: Path) -> float:
    """Mean length (characters) of the canonical answers to the evaluation prompts."""
    items = [json.loads(line) for line in (out / "world" / "eval.jsonl").read_text().splitlines() if line.strip()]
    return sum(len(it["answer"]) for it in items) / max(1, len(items))


def figures(out: Path, records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """The raw figures of a finished demo from the stages' done.json records."""
    s = {name: rec["summary"] for name, rec in records.items()}
    ev = s["evaluate"]
    models = {name: ev["models"][name] for name in MODEL_NAMES if name in ev["models"]}
    for name, m in models.items():
        m["win_rate_vs_sft"] = ev["win_rates"].get(f"{name}_vs_sft", {}).get("win_rate", math.nan)
    reward_acc = s["reward"].get("eval", {}).get("val_accuracy", math.nan)
    noise = s["rank"].get("noise", 0.0)
    agreement = ev.get("rm_agreement", {})
    canon = canonical_length(out)
    fig = {
        "run": run,
        "stage_seconds": {name: rec["seconds"] for name, rec in records.items()},
        "total_seconds": sum(rec["seconds"] for rec in records.values()),
        "canonical_length": canon,
        "models": {name: {k: v for k, v in m.items() if k != "per_task"} for name, m in models.items()},
        "per_task_accuracy": {name: m.get("per_task", {}) for name, m in models.items()},
        "reward": {
            "val_accuracy": reward_acc,
            # with the likelihood term, val_accuracy is the combined reward's; this is the head's alone
            "val_accuracy_reward_model": s["reward"].get("eval", {}).get("val_accuracy_reward_model", reward_acc),
            "val_accuracy_ceiling": 1.0 - noise,  # the labels themselves are flipped this often
            "labeler_agreement": agreement.get("accuracy", math.nan),
            "labeler_agreement_pairs": agreement.get("pairs", 0),
            "correctness_accuracy": agreement.get("correctness_accuracy", math.nan),
            "correctness_pairs": agreement.get("correctness_pairs", 0),
            "style_accuracy": agreement.get("style_accuracy", math.nan),
            "style_pairs": agreement.get("style_pairs", 0),
            "train_prompts": s["reward"].get("data", {}).get("train"),
        },
        "win_rates": ev["win_rates"],
        "ppo": {
            "kl_to_sft": models["ppo"].get("kl_to_sft", math.nan),
            "steps": s["ppo"].get("steps"), "rollouts": s["ppo"].get("rollouts"),
            "best": s["ppo"].get("best"),
            "overoptimisation": overoptimisation(s["ppo"], read_metrics(Path(s["ppo"]["out_dir"]))),
        },
    }
    sft, ppo = models["sft"], models["ppo"]
    win = ev["win_rates"].get("ppo_vs_sft", {})
    decided = win.get("wins", 0) + win.get("losses", 0)
    # The issues' bars, checked on the held-out figures (reported, never tuned here).
    fig["bars"] = {
        "sft_format_gain": sft["format_compliance"] - models["pretrain"]["format_compliance"],
        "sft_beats_base_on_format": sft["format_compliance"] >= models["pretrain"]["format_compliance"] + 0.5,
        "reward_accuracy_at_least_75": reward_acc >= ACCURACY_BAR,
        "ppo_win_rate_at_least_60": decided > 0 and win["wins"] / decided >= 0.60,
        "sft_accuracy_at_least_30": sft["accuracy"] >= 0.30,
        "ppo_accuracy_gain_at_least_10_points": ppo["accuracy"] - sft["accuracy"] >= 0.10,
        "rm_correctness_pairs_at_least_85": fig["reward"]["correctness_accuracy"] >= 0.85,
        "ppo_length_within_half_to_1.5x_canonical": 0.5 * canon <= ppo["mean_length"] <= 1.5 * canon,
        "ppo_format_at_least_95": ppo["format_compliance"] >= 0.95,
        "under_10_minutes": fig["total_seconds"] < 600,
    }
    return fig


# ------------------------------------------------------------------------------ plots
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


def _best_step(best: dict[str, Any] | None) -> str:
    if not best:
        return "none"
    # step 0 is the SFT policy itself: no PPO evaluation beat it on the gold score
    return "step 0 (the SFT policy: no PPO step beat it)" if best["step"] == 0 else f"step {best['step']}"


def plot_overoptimisation(path: Path, points: list[dict[str, float]], best_step: int | None) -> Path | None:
    """Gold and proxy score against KL to SFT (left), accuracy against KL (right); the best.pt
    evaluation starred. None with fewer than two evaluations."""
    points = [p for p in points if math.isfinite(p["kl"])]
    if len(points) < 2:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kl = [p["kl"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(kl, [p["gold"] for p in points], marker="o", markersize=3, linewidth=1, label="gold: labeler score")
    left.plot(kl, [p["proxy"] for p in points], marker="s", markersize=3, linewidth=1,
              label="proxy: reward model (normalised)")
    right.plot(kl, [100 * p["accuracy"] for p in points], marker="o", markersize=3, color="tab:green",
               label="task accuracy")
    for p in points:
        if p["step"] == best_step:
            left.plot([p["kl"]], [p["gold"]], marker="*", markersize=14, color="tab:red", linestyle="none",
                      label=f"best.pt (step {best_step})")
            right.plot([p["kl"]], [100 * p["accuracy"]], marker="*", markersize=14, color="tab:red", linestyle="none")
    for p in points:  # the path is in step order; KL need not grow monotonically
        left.annotate("SFT" if p["step"] == 0 else str(p["step"]), (p["kl"], p["gold"]), textcoords="offset points",
                      xytext=(3, 4), fontsize=7, color="tab:blue")
    left.set_title("PPO on held-out dev prompts: gold vs proxy")
    right.set_title("task accuracy (dev, greedy)")
    for ax, ylabel in ((left, "score"), (right, "accuracy (%)")):
        ax.set_xlabel("KL to SFT (nats / response)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def make_plots(out: Path, fig: dict[str, Any]) -> dict[str, Path]:
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    m = {stage: read_metrics(out / stage / "run") for stage in ("pretrain", "sft", "reward", "ppo")}
    best = (fig["ppo"].get("best") or {}).get("step")
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
        "overoptimisation": plot_overoptimisation(plots / "overoptimisation.png", fig["ppo"]["overoptimisation"], best),
    }
    return {k: v for k, v in made.items() if v is not None}


# ------------------------------------------------------------------------------ tables
def _cell(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return (text or "(empty)").replace("|", "\\|")


def sample_table(out: Path, n: int = 8) -> list[str]:
    """Markdown rows: one held-out prompt per task family, each model's answer side by side."""
    answers = {}
    for name in ("pretrain", "sft", "best_of_16", "ppo", "ppo_best"):
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


def _rows(fig: dict[str, Any]) -> list[tuple[str, ...]]:
    """The main table: one row per model of TABLE_MODELS that was evaluated."""
    rows = [("model", "labeler score", "task accuracy", "format", "length (chars)", "KL to SFT", "win rate vs SFT")]
    for name in TABLE_MODELS:
        m = fig["models"].get(name)
        if m is None:
            continue
        kl = m.get("kl_to_sft")
        win = m.get("win_rate_vs_sft", math.nan)
        rows.append((MODEL_NAMES[name], f"{m['labeler_score']:+.2f}", f"{m['accuracy']:.1%}",
                     f"{m['format_compliance']:.1%}", f"{m['mean_length']:.0f}",
                     "–" if kl is None else f"{kl:.2f}", "–" if name == "sft" or not math.isfinite(win) else f"{win:.1%}"))
    return rows


def smoke_note(run: dict[str, Any]) -> str:
    """A warning for a shrunk run (``--quick`` / ``--scale`` below 1), whose figures mean nothing."""
    scale = run.get("scale", 1.0)
    if scale >= 1.0:
        return ""
    return (f"SMOKE RUN (scale {scale:g}, e.g. --quick): every stage ran a few steps on a sliver of the data, so "
            f"none of these figures or bars says anything about quality; `fastgpt demo` (with --fresh in this "
            f"folder) gives the real ones.")


def format_table(fig: dict[str, Any]) -> str:
    """The main table and the reward model's figures (plain text, for the terminal)."""
    rows = _rows(fig)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ([smoke_note(fig["run"])] if smoke_note(fig["run"]) else []) + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    rw, best = fig["reward"], fig["ppo"].get("best")
    lines += [
        f"reward model: held-out pairwise accuracy {rw['val_accuracy']:.1%} (noisy labels, ceiling "
        f"~{rw['val_accuracy_ceiling']:.0%}; its scalar head alone {rw.get('val_accuracy_reward_model', math.nan):.1%}); agreement with the labeler's true preference {rw['labeler_agreement']:.1%} "
        f"(pairs differing in correctness {rw['correctness_accuracy']:.1%}, in style only {rw['style_accuracy']:.1%})",
        f"PPO best.pt: {_best_step(best)} of {fig['ppo']['steps']} "
        f"(chosen by the labeler's score on {fig['run']['budget']['n_dev']} dev prompts)",
        f"total time {fig['total_seconds']:.0f}s on {fig['run']['device']}",
    ]
    return "\n".join(lines)


def _markdown(rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|",
            *("| " + " | ".join(r) + " |" for r in rows[1:])]


def write_report(out: str | Path, records: dict[str, dict[str, Any]], run: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and plots/*.png under ``out``; returns their paths."""
    out = Path(out)
    fig = figures(out, records, run)
    plots = make_plots(out, fig)
    (out / "report.json").write_text(json.dumps(fig, indent=2, default=str))
    rw, ppo, n = fig["reward"], fig["ppo"], records["evaluate"]["summary"]["n_prompts"]
    best = ppo.get("best")
    note = smoke_note(run)
    md = [f"# fastgpt demo report (preset {run['preset']}, seed {run['seed']})", "",
          *([f"**{note}**", ""] if note else []),
          f"Held-out evaluation on {n} prompts no stage trained on and no choice was made on. Greedy answers "
          "through the chat template, judged by the simulated labeler; best-of-N keeps the reward model's favourite "
          "of N SFT samples at temperature 1 (its KL is the log N - (N-1)/N bound). Canonical answers are "
          f"{fig['canonical_length']:.0f} characters long on average.", "", *_markdown(_rows(fig)), "",
          f"- Reward model: held-out pairwise accuracy **{rw['val_accuracy']:.1%}** on the rankings it did not "
          f"train on (noisy labels: the labeler flips ~{1 - rw['val_accuracy_ceiling']:.0%} of pairs, so a perfect "
          f"model scores about {rw['val_accuracy_ceiling']:.0%}). Against the labeler's noiseless preference on fresh "
          f"SFT samples for the evaluation prompts: {rw['labeler_agreement']:.1%} of {rw['labeler_agreement_pairs']} "
          f"pairs; **{rw['correctness_accuracy']:.1%}** of the {rw['correctness_pairs']} pairs where one answer is "
          f"correct and the other wrong; {rw['style_accuracy']:.1%} of the {rw['style_pairs']} pairs equally correct "
          "that differ only in style.",
          f"- PPO: {plural(ppo['steps'], 'step')} over {plural(ppo['rollouts'], 'rollout')}; KL of the last policy to SFT "
          f"{ppo['kl_to_sft']:.2f} nats per sampled response. best.pt: "
          + (f"{_best_step(best)}, chosen by the labeler's score on PPO's dev prompts." if best else "none."), "",
          "## Over-optimisation", "",
          "PPO's held-out evaluations on its dev prompts (greedy answers; KL measured on sampled ones). The proxy is "
          "what PPO maximises, the gold score what the labeler thinks; where they part, optimising the reward model "
          "stops helping.", ""]
    if "overoptimisation" in plots:
        md += [f"![over-optimisation](plots/{plots['overoptimisation'].name})", ""]
    md += ["| step | KL to SFT | proxy (RM) | gold (labeler) | accuracy | length (tokens) |", "|---|---|---|---|---|---|"]
    md += [f"| {p['step']}{' (best.pt)' if best and p['step'] == best['step'] else ''} | {p['kl']:.2f} | "
           f"{p['proxy']:+.2f} | {p['gold']:+.2f} | {p['accuracy']:.1%} | {p['length']:.0f} |"
           for p in ppo["overoptimisation"]]
    md += ["", "## Bars", ""]
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
    md += [f"![{k}](plots/{p.name})" for k, p in plots.items() if k != "overoptimisation"]
    md += ["", "## Sample answers (held-out; ✓ correct, ✗ wrong)", "", *sample_table(out), ""]
    md += ["## Accuracy per task", "", "| task | " + " | ".join(MODEL_NAMES[m] for m in fig["per_task_accuracy"]) + " |",
           "|---" * (len(fig["per_task_accuracy"]) + 1) + "|"]
    tasks = sorted({t for per in fig["per_task_accuracy"].values() for t in per})
    for t in tasks:
        md.append(f"| {t} | " + " | ".join(f"{per.get(t, math.nan):.0%}" for per in fig["per_task_accuracy"].values()) + " |")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return {"report_md": out / "report.md", "report_json": out / "report.json", **plots}
