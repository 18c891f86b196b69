"""The method comparison: PPO, DPO and GRPO from the same SFT model and the same labels, judged by
the simulated labeler (the gold judge none of them trained against), and the ablation
``ptx_only`` (PPO's run with its reward set to 0: what the pre-training mix alone does).

``fastgpt demo --methods ppo,dpo,grpo`` adds two stages after PPO — DPO on the labeler's
rankings (the reward model's own training data) and GRPO against the reward model on PPO's
prompts, with PPO's number of sampled responses and optimizer steps — and a ``methods`` stage
that answers the held-out prompts with every method's model and measures, per method: the gold
score (the labeler's mean quality of greedy answers), task accuracy, the labeler's win rate
against SFT (answer by answer, ties apart), KL to SFT (nats per sampled response), answer
length, and the stage's wall time and peak memory. ``fastgpt compare-methods`` runs that demo
for several seeds and writes the mean and spread of each figure (``methods.md``, ``methods.json``).

Peak memory is the CUDA allocator's peak on a GPU; on a CPU it is the process's peak resident
set size during the stage (Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``), so it
includes Python and torch themselves (a few hundred MB).
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterator

METHODS = ("ppo", "dpo", "grpo", "ptx_only")
# ptx_only is an ablation, not a method: PPO's run with the reward model's score replaced by 0, so
# that only the pre-training mix, the KL penalty and the length guard move the policy. PPO's gain
# over it is what the reward model adds.
LABELS = {"sft": "SFT (start)", "ppo": "PPO", "dpo": "DPO", "grpo": "GRPO", "ptx_only": "PPO-ptx, reward off"}
FIGURES = (  # (key, column title, format)
    ("gold_score", "gold score (labeler)", "{:+.2f}"),
    ("accuracy", "task accuracy", "{:.1%}"),
    ("win_rate", "win rate vs SFT", "{:.1%}"),
    ("kl_to_sft", "KL to SFT (nats)", "{:.2f}"),
    ("length", "length (chars)", "{:.0f}"),
    ("seconds", "wall time (s)", "{:.0f}"),
    ("peak_mb", "peak memory (MB)", "{:.0f}"),
)


def parse_methods(spec: str) -> tuple[str, ...]:
    from ..errors import FastGPTError
    names = tuple(m.strip() for m in spec.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise FastGPTError(f"--methods {spec!r}: expected a comma-separated subset of {','.join(METHODS)}")
    return names


# --------------------------------------------------------------------------- memory
@contextlib.contextmanager
def stage_memory(device: str) -> Iterator[dict[str, float]]:
    """``with stage_memory(dev) as mem: ...`` then ``mem["peak_mb"]`` (see the module docstring;
    0 where neither measure exists)."""
    import torch

    from ..trainer import resolve_device
    dev = resolve_device(device)
    out = {"peak_mb": 0.0}
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    elif clear.exists():
        with contextlib.suppress(OSError):
            clear.write_text("5")  # resets VmHWM to the current resident size
    try:
        yield out
    finally:
        if dev.type == "cuda":
            out["peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        elif status.exists():
            line = next((ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")), "")
            out["peak_mb"] = float(line.split()[1]) / 1024 if line else 0.0


# --------------------------------------------------------------------------- stages
def stage_dpo(ctx: Any) -> dict[str, Any]:
    from ..config import build_config
    from ..stages.dpo import DPOConfig, dpo
    from .pipeline import _train_overrides
    b = ctx.budget
    cfg = build_config(DPOConfig, overrides=_train_overrides(
        ctx, "dpo", init_from=ctx.summary("sft")["out_dir"], data=ctx.summary("rank")["rankings"],
        epochs=b.dpo_epochs, batch_size=b.reward_batch, lr=b.dpo_lr, beta=b.dpo_beta, warmup_steps=5,
        val_fraction=0.15, min_steps=0, eval_interval=0, log_interval=2, ckpt_interval=1000))
    return dpo(cfg)


def stage_grpo(ctx: Any) -> dict[str, Any]:
    from ..config import build_config
    from ..stages.grpo import GRPOConfig, grpo
    from .pipeline import gold_judge, on_policy_overrides
    b = ctx.budget
    return grpo(build_config(GRPOConfig, overrides=on_policy_overrides(ctx, "grpo", group_size=b.k, beta=b.grpo_beta)),
                gold=gold_judge(ctx))


def stage_ptx_only(ctx: Any) -> dict[str, Any]:
    from .pipeline import stage_ppo

    def no_reward(prompts: list[list[int]], responses: list[list[int]]) -> Any:
        import torch
        return torch.zeros(len(responses))

    return stage_ppo(ctx, "ptx_only", reward_fn=no_reward)


def stage_methods(ctx: Any, methods: tuple[str, ...]) -> dict[str, Any]:
    """Answer the held-out prompts with SFT and every method; the labeler's figures per method."""
    from ..checkpoint import load_model
    from ..engine import SamplingParams, generate
    from ..stages.policy_eval import sequence_kl
    from ..tokenizer import encode_prompt, prompt_messages
    from ..trainer import resolve_device
    from .evaluate import answer
    from .labeler import SimulatedLabeler
    b, dev = ctx.budget, resolve_device(ctx.device)
    items = [json.loads(line) for line in (ctx.dir("world") / "eval.jsonl").read_text().splitlines() if line]
    prompts = [it["prompt"] for it in items]
    labeler = SimulatedLabeler(seed=ctx.seed)
    sft, tok, _ = load_model(ctx.summary("sft")["out_dir"], kind="gpt", device=dev)
    kl_prompts = prompts[:min(64, len(prompts))]
    kl_ids = [encode_prompt(tok, prompt_messages(p)) for p in kl_prompts]
    sft_answers = answer(sft, tok, prompts, b.max_new_tokens, b.eval_batch, seed=ctx.seed)
    out: dict[str, Any] = {"n_prompts": len(items), "kl_prompts": len(kl_prompts), "methods": {}}
    for name in ("sft", *methods):
        model = sft if name == "sft" else load_model(ctx.summary(name)["out_dir"], kind="gpt", device=dev)[0]
        answers = sft_answers if name == "sft" else answer(model, tok, prompts, b.max_new_tokens, b.eval_batch,
                                                           seed=ctx.seed)
        texts, finished = [t for t, _ in answers], [f for _, f in answers]
        judged = labeler.evaluate(items, texts, finished)
        win = labeler.win_rate(prompts, texts, finished, [t for t, _ in sft_answers], [f for _, f in sft_answers])
        params = SamplingParams(max_new_tokens=b.max_new_tokens, temperature=1.0, stop_ids=tok.stop_ids,
                                seed=ctx.seed + 7)
        responses = [g.tokens for g in generate(model, kl_ids, params, vocab_limit=tok.vocab_size,
                                                batch_size=b.eval_batch)]
        record = json.loads((ctx.dir(name) / "done.json").read_text()) if name != "sft" else {}
        out["methods"][name] = {
            "gold_score": judged["labeler_score"], "accuracy": judged["accuracy"],
            "format_compliance": judged["format_compliance"], "length": judged["mean_length"],
            "win_rate": win["win_rate"] if name != "sft" else math.nan, "wins": win["wins"], "losses": win["losses"],
            "ties": win["ties"],
            "kl_to_sft": 0.0 if name == "sft" else sequence_kl(model, sft, kl_ids, responses, 1.0),
            "seconds": record.get("seconds", math.nan), "peak_mb": record.get("peak_mb", math.nan),
        }
        with open(ctx.dir("methods") / f"answers_{name}.jsonl", "w", encoding="utf-8") as f:
            for it, (t, fin) in zip(items, answers):
                f.write(json.dumps({"prompt": it["prompt"], "response": t, "finished": fin}, ensure_ascii=False) + "\n")
    return out


# --------------------------------------------------------------------------- tables
def methods_table(per_method: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one per method (one seed)."""
    lines = ["| method | " + " | ".join(title for _, title, _ in FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for name, m in per_method.items():
        cells = ["–" if not math.isfinite(m.get(k, math.nan)) else fmt.format(m[k]) for k, _, fmt in FIGURES]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def aggregate(runs: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {figure: {"mean", "sd", "n"}}} over seeds (sd: sample standard deviation)."""
    methods = list(dict.fromkeys(m for per in runs.values() for m in per))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in methods:
        out[name] = {}
        for key, _, _ in FIGURES:
            values = [per[name][key] for per in runs.values()
                      if name in per and math.isfinite(per[name].get(key, math.nan))]
            out[name][key] = {"mean": statistics.fmean(values) if values else math.nan,
                              "sd": statistics.stdev(values) if len(values) > 1 else math.nan, "n": len(values)}
    return out


def aggregate_table(agg: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| method | " + " | ".join(title for _, title, _ in FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for name, figs in agg.items():
        cells = []
        for key, _, fmt in FIGURES:
            f = figs[key]
            if not math.isfinite(f["mean"]):
                cells.append("–")
            elif math.isfinite(f["sd"]):
                cells.append(f"{fmt.format(f['mean'])} ± {fmt.format(f['sd']).lstrip('+')}")
            else:
                cells.append(fmt.format(f["mean"]))
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return lines


def compare_methods(out: str | Path, seeds: list[int], methods: tuple[str, ...], preset: str = "tiny",
                    device: str = "auto", scale: float = 1.0) -> dict[str, Any]:
    """The demo with ``methods`` for every seed (each in ``out/seed-N``, resumable), then the
    mean and spread of each method's figures in ``out/methods.md`` and ``out/methods.json``."""
    import torch

    from ..files import atomic_write
    from .pipeline import device_name, run_pipeline
    root = Path(out)
    runs: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        run_pipeline(root / f"seed-{seed}", preset, device, seed, scale, methods=methods)
        runs[seed] = json.loads((root / f"seed-{seed}" / "methods" / "done.json").read_text())["summary"]["methods"]
    agg = aggregate(runs)
    info = {"preset": preset, "scale": scale, "seeds": seeds, "methods": list(methods), "device": device_name(device),
            "torch": torch.__version__}
    with atomic_write(root / "methods.json") as f:
        f.write(json.dumps({"run": info, "per_seed": runs, "aggregate": agg}, indent=1))
    md = [f"# Methods compared (preset {preset}, seeds {', '.join(map(str, seeds))})", "",
          f"Device: {info['device']}; torch {info['torch']}. Held-out prompts, greedy answers judged by the "
          "simulated labeler; mean ± sample standard deviation over the seeds.", "", *aggregate_table(agg), ""]
    for seed, per in runs.items():
        md += [f"## seed {seed}", "", *methods_table(per), ""]
    with atomic_write(root / "methods.md") as f:
        f.write("\n".join(md))
    return {"run": info, "aggregate": agg, "per_seed": runs}
