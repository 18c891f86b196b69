"""``fastgpt demo``: every InstructGPT stage end to end on self-generated data, with a report.

world -> prepare -> pretrain -> sft -> compare -> rank -> reward -> ppo -> evaluate -> report

Each stage calls the same public Python API a user would (stage functions with config objects
from ``build_config``), writes into its own folder under ``--out`` and, once it succeeded, a
``done.json`` holding its summary and wall time. A re-run with the same ``--out`` skips every
stage that has its ``done.json``, and a stage interrupted half-way resumes from its own
checkpoint (the trainer's exact resume), so a killed demo loses at most a few steps.

PPO's reward is the reward model alone (its loss adds the pre-training loss on the demo's corpus,
InstructGPT's PPO-ptx): the simulated labeler ranks the SFT model's samples (as a person would
with ``fastgpt rank``), and is PPO's gold judge only on its held-out dev prompts (the
over-optimisation curve and the choice of best.pt), never on a rollout; with ``--methods``, GRPO's
too, on the same dev prompts and settings (:func:`on_policy_overrides`). It judges the held-out
evaluation answers at the end.

Budgets are per preset (:data:`BUDGETS`); ``tiny`` is sized to finish in under 10 minutes on
2 CPU cores. ``--scale`` (or ``--quick``) shrinks every step count and data size, for tests.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import build_config
from ..console import plural
from ..errors import FastGPTError
from ..files import atomic_write

STAGES = ("world", "prepare", "pretrain", "sft", "compare", "rank", "reward", "ppo", "dpo", "grpo", "ptx_only",
          "evaluate", "methods", "report")
OPTIONAL = {"dpo", "grpo", "ptx_only", "methods"}  # run with --methods (see demo/methods.py)
DONE = "done.json"


@dataclass
class Budget:
    """How much work each stage does. Step counts and data sizes shrink with ``--scale``."""

    # data
    n_pretrain: int = 20000          # pre-training documents (1-4 world statements each)
    qa_fraction: float = 0.9         # share of corpus sentences written as "question? answer."
    n_sft: int = 2000                # demonstrations
    n_compare: int = 900             # prompts the SFT model answers K times for ranking
    n_ppo: int = 200                 # PPO training prompts (each is drawn ~50 times over the run)
    n_eval: int = 260                # held-out evaluation prompts
    n_dev: int = 64                  # PPO's own held-out prompts: its curves and the choice of best.pt
    # pretrain (model shape comes from the preset). Twice the steps at half the batch of 16 x 650,
    # the same tokens and CPU time: the tiny model learns to copy a question's subject (a number,
    # a word) into its answer only after ~1,000 optimizer steps, and a base model that cannot
    # copy makes SFT answers restate the wrong subject, which the reward's likelihood term then
    # cannot judge (README, "Copying needs optimizer steps")
    pretrain_steps: int = 1300
    pretrain_batch: int = 8
    pretrain_lr: float = 3e-3
    # sft
    sft_steps: int = 200
    sft_batch: int = 16
    sft_lr: float = 1e-3
    # compare + rank
    k: int = 4
    compare_temperature: float = 1.0
    max_new_tokens: int = 80         # bytes: a canonical answer is ~20 of them, a chatty one 50-70
    labeler_noise: float = 0.15      # two labelers then agree on ~76% of pairs (InstructGPT: 73-77%)
    # reward
    reward_epochs: float = 2.0       # 1.5, 4, 8 and 20 all agree with the labeler alike (README, "What the redesign tried")
    reward_batch: int = 16
    reward_lr: float = 3e-4
    # The base model's likelihood of each answer joins the reward (fastgpt.stages.likelihood): it
    # knows the world's facts as a generator, which the scalar head does not relearn from ~800
    # rankings (README: 65-75% agreement on correctness pairs without it)
    reward_likelihood: bool = True
    # ppo
    ppo_steps: int = 160
    rollout_batch: int = 64
    mini_batch: int = 16
    ppo_epochs: int = 4
    ppo_lr: float = 1e-4
    beta: float = 0.05
    length_penalty: float = 0.5      # guard: reward -= this x |length - SFT length| / SFT length (tokens)
    ptx_coef: float = 1.0            # PPO-ptx: the pre-training loss on 4 corpus rows added to every step
    ptx_batch: int = 4
    ppo_evals: int = 10              # held-out evaluations (proxy, gold, KL) over the run
    warn_kl: float = 8.0             # PPO warns past this KL to SFT (nats / response) ...
    warn_length_ratio: float = 2.0   # ... or when its mean length changes by more than this factor
    # dpo and grpo (--methods): from the same SFT model, on the same rankings / prompts / reward model
    dpo_epochs: float = 2.0          # as the reward model's (the same rankings)
    dpo_lr: float = 3e-5
    dpo_beta: float = 0.1
    grpo_beta: float = 0.04          # GRPO paper; the rest of GRPO's budget is PPO's (same samples and steps)
    # evaluation
    eval_batch: int = 64
    best_of: tuple[int, ...] = (1, 4, 16)  # best-of-N baselines (N SFT samples, the RM's favourite kept)

    def scaled(self, scale: float) -> "Budget":
        """A copy with every step count and data size times ``scale`` (at least a few of each)."""
        if scale == 1.0:
            return dataclasses.replace(self)
        s = lambda n, low: max(low, int(round(n * scale)))  # noqa: E731
        return dataclasses.replace(
            self, n_pretrain=s(self.n_pretrain, 200), n_sft=s(self.n_sft, 60), n_compare=s(self.n_compare, 24),
            n_ppo=s(self.n_ppo, 16), n_eval=s(self.n_eval, 16), n_dev=s(self.n_dev, 8), pretrain_steps=s(self.pretrain_steps, 4),
            sft_steps=s(self.sft_steps, 4), ppo_steps=s(self.ppo_steps, 4),
            rollout_batch=s(self.rollout_batch, 16), mini_batch=min(self.mini_batch, s(self.rollout_batch, 16)),
            max_new_tokens=s(self.max_new_tokens, 32))


BUDGETS: dict[str, Budget] = {
    "tiny": Budget(),
    # A bigger model (preset "small": 6 x 192) and longer runs, for a GPU or a patient CPU.
    "small": Budget(n_pretrain=40000, pretrain_steps=2000, pretrain_batch=16, pretrain_lr=1.5e-3, sft_steps=300,
                    sft_lr=5e-4, reward_lr=2e-4, ppo_steps=320, ppo_lr=2e-5),
}


@dataclass
class Context:
    """Everything the stages share: where to write, what budget, which device and seed."""

    out: Path
    preset: str
    budget: Budget
    device: str
    seed: int
    scale: float = 1.0
    methods: tuple[str, ...] = ("ppo",)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def summary(self, stage: str) -> dict[str, Any]:
        """The saved summary of a finished stage."""
        return json.loads((self.dir(stage) / DONE).read_text())["summary"]


# ------------------------------------------------------------------------------ stages
def stage_world(ctx: Context) -> dict[str, Any]:
    from .world import make_world, pretrain_texts, write_world
    b = ctx.budget
    world = make_world(ctx.seed, n_pretrain=0, n_sft=b.n_sft, n_compare=b.n_compare, n_ppo=b.n_ppo,
                       n_eval=b.n_eval, n_dev=b.n_dev)
    # The corpus is drawn here rather than by make_world to set its share of question-answer
    # sentences: a small model learns to read the question (copy its subject into the answer)
    # only from those, and the few minutes of CPU pre-training need more of them than the default.
    # Held-out evaluation and dev prompts are still kept out of the corpus.
    world.pretrain = pretrain_texts(b.n_pretrain, seed=ctx.seed + 1, qa_fraction=b.qa_fraction,
                                    exclude_prompts=[it["prompt"] for it in world.eval_items] + world.dev_prompts)
    paths = write_world(world, ctx.dir("world"))
    return {"files": {k: str(v) for k, v in paths.items()}, "pretrain_docs": len(world.pretrain),
            "sft": len(world.sft), "compare_prompts": len(world.compare_prompts),
            "ppo_prompts": len(world.ppo_prompts), "eval_items": len(world.eval_items),
            "dev_prompts": len(world.dev_prompts)}


def stage_prepare(ctx: Context) -> dict[str, Any]:
    from ..data import prepare
    from ..tokenizer import ByteTokenizer
    out = ctx.dir("prepare") / "data"
    meta = prepare([ctx.dir("world") / "pretrain.jsonl"], out, ByteTokenizer(), val_fraction=0.02,
                   seed=ctx.seed, progress=False)
    return {"data": str(out), "tokens": meta["tokens"], "documents": meta["documents"]}


def _every(steps: int, times: int) -> int:
    """An interval giving about ``times`` events over ``steps`` (0 = only at the end, for short runs)."""
    return steps // times if steps >= 2 * times else 0


def _train_overrides(ctx: Context, stage: str, **kw: Any) -> dict[str, Any]:
    """Settings every training stage of the demo shares."""
    return {"out_dir": str(ctx.dir(stage) / "run"), "device": ctx.device, "seed": ctx.seed, "resume": True, **kw}


def stage_pretrain(ctx: Context) -> dict[str, Any]:
    from ..stages.pretrain import PretrainConfig, pretrain
    b = ctx.budget
    cfg = build_config(PretrainConfig, ctx.preset, overrides=_train_overrides(
        ctx, "pretrain", data=ctx.summary("prepare")["data"], max_steps=b.pretrain_steps,
        batch_size=b.pretrain_batch, lr=b.pretrain_lr, warmup_steps=min(30, b.pretrain_steps // 5),
        eval_interval=_every(b.pretrain_steps, 10), log_interval=max(1, b.pretrain_steps // 50),
        ckpt_interval=max(1, b.pretrain_steps // 4), eval_batches=10))
    return pretrain(cfg)


def stage_sft(ctx: Context) -> dict[str, Any]:
    from ..stages.sft import SFTConfig, sft
    b = ctx.budget
    # No preset: SFT's settings are the demo's own, the architecture comes from the checkpoint.
    cfg = build_config(SFTConfig, overrides=_train_overrides(
        ctx, "sft", init_from=ctx.summary("pretrain")["out_dir"], data=str(ctx.dir("world") / "sft.jsonl"),
        max_steps=b.sft_steps, batch_size=b.sft_batch, lr=b.sft_lr, warmup_steps=min(20, b.sft_steps // 5),
        eval_interval=_every(b.sft_steps, 5), log_interval=max(1, b.sft_steps // 50),
        ckpt_interval=max(1, b.sft_steps // 2), eval_format_prompts=16, eval_max_new_tokens=b.max_new_tokens))
    return sft(cfg)


def stage_compare(ctx: Context) -> dict[str, Any]:
    from ..rank import compare
    b = ctx.budget
    out = compare(ctx.summary("sft")["out_dir"], str(ctx.dir("world") / "compare_prompts.jsonl"),
                  str(ctx.dir("compare") / "comparisons.jsonl"), k=b.k, temperature=b.compare_temperature,
                  max_new_tokens=b.max_new_tokens, seed=ctx.seed, device=ctx.device, batch_size=b.eval_batch)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    finished = [f for r in rows for f in r["finished"]]
    return {"comparisons": str(out), "prompts": len(rows), "k": b.k,
            "finished_fraction": sum(finished) / max(1, len(finished))}


def stage_rank(ctx: Context) -> dict[str, Any]:
    from .labeler import SimulatedLabeler, rank_file
    out = ctx.dir("rank") / "rankings.jsonl"
    every = ctx.dir("rank") / "all_rankings.jsonl"
    for path in (out, every):
        path.unlink(missing_ok=True)  # rank_file appends: a half-written file from a killed run must go
    labeler = SimulatedLabeler(seed=ctx.seed, noise=ctx.budget.labeler_noise)
    n = rank_file(ctx.summary("compare")["comparisons"], every, labeler)
    # A person ranking with `fastgpt rank` skips a comparison whose answers are all equally good
    # (the tool refuses an all-tied order): it holds no preference. The labeler's file gets the same.
    kept = [line for line in every.read_text(encoding="utf-8").splitlines()
            if line.strip() and len(json.loads(line)["ranking"]) > 1]
    with atomic_write(out) as f:
        f.write("".join(line + "\n" for line in kept))
    return {"rankings": str(out), "ranked": len(kept), "skipped_all_tied": n - len(kept),
            "noise": ctx.budget.labeler_noise}


def stage_reward(ctx: Context) -> dict[str, Any]:
    from ..stages.reward import RewardConfig, train_reward
    b = ctx.budget
    cfg = build_config(RewardConfig, overrides=_train_overrides(
        ctx, "reward", init_from=ctx.summary("sft")["out_dir"], data=ctx.summary("rank")["rankings"],
        epochs=b.reward_epochs, batch_size=b.reward_batch, lr=b.reward_lr, warmup_steps=5, eval_interval=20,
        val_fraction=0.15,  # ~90 held-out prompts: a steadier accuracy than the default 10% gives
        min_steps=0,  # the budget's epochs decide, also in a shrunk (--quick) run
        log_interval=2, ckpt_interval=1000,
        likelihood_from=ctx.summary("pretrain")["out_dir"] if b.reward_likelihood else ""))
    return train_reward(cfg)


def on_policy_overrides(ctx: Context, stage: str, **extra: Any) -> dict[str, Any]:
    """The settings PPO and GRPO share in the demo: the same SFT start, reward model, prompts,
    steps, rollout size, learning rate, guards and pre-training mix (PPO-ptx: the SFT model's
    demonstrations teach the world's slips, the pre-training corpus does not), and the same dev
    prompts for their held-out curves and best.pt, so that the methods table compares like with
    like."""
    b = ctx.budget
    world = ctx.dir("world")
    return _train_overrides(
        ctx, stage, sft_checkpoint=ctx.summary("sft")["out_dir"], reward_checkpoint=ctx.summary("reward")["out_dir"],
        prompts=str(world / "ppo_prompts.jsonl"), eval_prompts=str(world / "dev_prompts.jsonl"),
        eval_max_prompts=b.n_dev, eval_interval=max(1, b.ppo_steps // b.ppo_evals), max_steps=b.ppo_steps,
        rollout_batch_size=b.rollout_batch, mini_batch_size=b.mini_batch, ppo_epochs=b.ppo_epochs, lr=b.ppo_lr,
        max_new_tokens=b.max_new_tokens, ckpt_interval=max(1, b.ppo_steps // 4),
        warn_kl=b.warn_kl, warn_length_ratio=b.warn_length_ratio, length_penalty=b.length_penalty,
        ptx_data=ctx.summary("prepare")["data"], ptx_coef=b.ptx_coef, ptx_batch_size=b.ptx_batch, **extra)


def gold_judge(ctx: Context) -> Callable[..., dict[str, list[float]]]:
    """The labeler as the on-policy stages' gold judge: it scores their dev answers at each
    evaluation (the over-optimisation curve, and which checkpoint becomes best.pt). They still
    train on the reward model alone: the judge never reaches a rollout."""
    from .labeler import SimulatedLabeler
    return SimulatedLabeler(seed=ctx.seed).judge


def stage_ppo(ctx: Context, stage: str = "ppo", reward_fn: Callable | None = None) -> dict[str, Any]:
    """PPO on the demo's settings; ``reward_fn`` replaces the reward model's score (the
    ``ptx_only`` ablation runs it as stage ``ptx_only`` with a zero reward)."""
    from ..stages.ppo import PPOConfig, ppo
    return ppo(build_config(PPOConfig, overrides=on_policy_overrides(ctx, stage, beta=ctx.budget.beta)),
               reward_fn=reward_fn, gold=gold_judge(ctx))


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    from ..checkpoint import BEST_NAME
    from .evaluate import evaluate_all
    from .labeler import SimulatedLabeler
    items = [json.loads(line) for line in (ctx.dir("world") / "eval.jsonl").read_text().splitlines() if line]
    checkpoints = {name: ctx.summary(name)["out_dir"] for name in ("pretrain", "sft", "ppo")}
    best = Path(ctx.summary("ppo")["out_dir"]) / BEST_NAME
    if best.exists():
        checkpoints["ppo_best"] = str(best)
    return evaluate_all(checkpoints, ctx.summary("reward")["out_dir"], items, SimulatedLabeler(seed=ctx.seed),
                        ctx.dir("evaluate"), device=ctx.device, max_new_tokens=ctx.budget.max_new_tokens,
                        batch_size=ctx.budget.eval_batch, best_of=ctx.budget.best_of, k=ctx.budget.k, seed=ctx.seed)


def stage_report(ctx: Context) -> dict[str, Any]:
    from .report import write_report
    summaries = {s: json.loads((ctx.dir(s) / DONE).read_text()) for s in STAGES
                 if s != "report" and (ctx.dir(s) / DONE).exists()}
    paths = write_report(ctx.out, summaries, run_info(ctx))
    return {k: str(v) for k, v in paths.items()}


def _method_stage(name: str) -> Callable[[Context], dict[str, Any]]:
    def run(ctx: Context) -> dict[str, Any]:
        from . import methods
        if name == "methods":
            return methods.stage_methods(ctx, ctx.methods)
        return getattr(methods, f"stage_{name}")(ctx)
    return run


STAGE_FNS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "world": stage_world, "prepare": stage_prepare, "pretrain": stage_pretrain, "sft": stage_sft,
    "compare": stage_compare, "rank": stage_rank, "reward": stage_reward, "ppo": stage_ppo,
    "evaluate": stage_evaluate, "report": stage_report,
    **{name: _method_stage(name) for name in OPTIONAL},
}


# ------------------------------------------------------------------------------ runner
def device_name(device: str) -> str:
    import torch

    from ..trainer import resolve_device
    d = resolve_device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"CPU ({platform.processor() or platform.machine()}, {plural(torch.get_num_threads(), 'thread')})"


def run_info(ctx: Context) -> dict[str, Any]:
    import torch
    return {"preset": ctx.preset, "seed": ctx.seed, "scale": ctx.scale, "device": device_name(ctx.device), "out": str(ctx.out),
            "budget": dataclasses.asdict(ctx.budget), "torch": torch.__version__}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_stage(ctx: Context, name: str, index: int, total: int, redo: bool = False) -> tuple[dict[str, Any], bool]:
    """Run one stage unless its done.json exists (or ``redo``); returns (its record, whether it ran now)."""
    from .methods import stage_memory
    folder = ctx.dir(name)
    marker = folder / DONE
    head = f"[{index + 1}/{total}] {name}"
    if marker.exists() and not redo:
        record = json.loads(marker.read_text())
        print(f"{head}: done earlier ({record['seconds']:.0f}s), skipped", flush=True)
        return record, False
    print(f"{head} ...", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with stage_memory(ctx.device) as memory:
        summary = STAGE_FNS[name](ctx)
    record = {"stage": name, "seconds": time.perf_counter() - start, "device": device_name(ctx.device),
              "peak_mb": memory["peak_mb"], "summary": _jsonable(summary)}
    with atomic_write(marker) as f:  # written last and atomically: a stage is done only when all of it is
        f.write(json.dumps(record, indent=2))
    sys.stderr.flush()
    print(f"{head}: done in {record['seconds']:.0f}s{_headline(name, record['summary'])}", flush=True)
    return record, True


def _headline(name: str, s: dict[str, Any]) -> str:
    """One short figure per stage for the progress line."""
    ev = s.get("eval", {})
    if name in ("pretrain", "sft") and "val_loss" in ev:
        extra = f", format_rate {ev['format_rate']:.2f}" if "format_rate" in ev else ""
        return f" (val_loss {ev['val_loss']:.3f}{extra})"
    if name == "reward" and "val_accuracy" in ev:
        return f" (held-out pairwise accuracy {ev['val_accuracy']:.3f})"
    if name in ("ppo", "grpo", "ptx_only") and "score_greedy" in ev:
        sft, parts = s.get("sft", {}), []
        if name != "ptx_only":  # the ablation trains on a zero reward: its "RM score" would be that zero
            parts.append(f"RM score {sft.get('score_greedy', math.nan):+.2f} -> {ev['score_greedy']:+.2f}")
        if "gold_score_greedy" in ev:
            parts.append(f"labeler score {sft.get('gold_score_greedy', math.nan):+.2f} -> {ev['gold_score_greedy']:+.2f}")
        parts.append(f"KL {ev.get('kl_to_ref', math.nan):.2f}")
        return f" (dev: {', '.join(parts)})"
    if name == "dpo" and "val_accuracy" in ev:
        return f" (held-out implicit-reward accuracy {ev['val_accuracy']:.3f})"
    if name == "compare":
        return f" ({plural(s['prompts'], 'prompt')} x {s['k']}, {s['finished_fraction']:.0%} finished)"
    if name == "rank":
        return f" ({plural(s['ranked'], 'ranking')}, {s['skipped_all_tied']} all-tied skipped)"
    return ""


def run_pipeline(out: str | Path = "runs/demo", preset: str = "tiny", device: str = "auto", seed: int = 0,
             scale: float = 1.0, progress: bool = True, methods: tuple[str, ...] = ("ppo",)) -> dict[str, Any]:
    """Run (or resume) the whole demo; returns the report's figures (report.json). ``methods``
    beyond PPO (dpo, grpo) add their stages and the methods table (a finished run can add them)."""
    if preset not in BUDGETS:
        raise FastGPTError(f"unknown demo preset {preset!r} (expected one of {sorted(BUDGETS)})")
    ctx = Context(Path(out), preset, BUDGETS[preset].scaled(scale), device, seed, scale, tuple(methods))
    settings = {"preset": preset, "seed": seed, "scale": scale}
    saved = ctx.out / "settings.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        changes = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        if changes:
            raise FastGPTError(f"{ctx.out} holds a demo run with other settings ({changes}); start over with "
                               f"--fresh, or use another --out")
    with atomic_write(saved) as f:
        f.write(json.dumps(settings))
    start = time.perf_counter()
    stages = [s for s in STAGES if s not in OPTIONAL or s in methods or (s == "methods" and set(methods) - {"ppo"})]
    ran = False
    for i, name in enumerate(stages):
        # the report and the methods table are rebuilt whenever a stage before them ran
        ran |= run_stage(ctx, name, i, len(stages), redo=ran and name in ("methods", "report"))[1]
    print(f"demo: finished in {time.perf_counter() - start:.0f}s this run; report in {ctx.out / 'report.md'}")
    return json.loads((ctx.out / "report.json").read_text())
