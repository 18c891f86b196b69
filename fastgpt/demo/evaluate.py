"""Held-out evaluation of the demo's models by the simulated labeler.

Only the world's evaluation prompts are used: no stage trained on them (the world keeps its
prompt sets disjoint). Every model answers through the chat template, greedily, stopping at
<|end|>; ``finished`` means it emitted <|end|> before the token limit. The labeler then scores
the answers (accuracy, mean quality, format compliance, length) and compares PPO with SFT
answer by answer (win rate over non-tied prompts, ties reported apart).

The reward model is checked twice: its own held-out pairwise accuracy against the (noisy)
rankings, from the reward stage's summary, and here its agreement with the labeler's noiseless
preference on K fresh SFT samples per *evaluation* prompt, which it has never seen.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model
from ..engine import SamplingParams, generate
from ..tokenizer import Tokenizer, encode_prompt, prompt_messages
from ..trainer import resolve_device
from .labeler import SimulatedLabeler


def answer(model: torch.nn.Module, tok: Tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
           temperature: float = 0.0, seed: int = 0, samples: int = 1) -> list[tuple[str, bool]]:
    """(text, finished) for each prompt (x ``samples``, a prompt's samples adjacent), chat template."""
    ids = [encode_prompt(tok, prompt_messages(p)) for p in prompts for _ in range(samples)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=(tok.end_id,),
                            seed=seed)
    # Modest batches: the CPU decode step slows down sharply with very wide batches.
    gens = generate(model, ids, params, vocab_limit=tok.vocab_size, batch_size=batch_size)
    return [(tok.decode(g.tokens[:-1] if g.finished else g.tokens), g.finished) for g in gens]


def rm_agreement(rm_checkpoint: str, sft_model: torch.nn.Module, tok: Tokenizer, items: list[dict],
                 labeler: SimulatedLabeler, device: torch.device, k: int, max_new_tokens: int, batch_size: int,
                 seed: int) -> dict[str, Any]:
    """Pairwise accuracy of the reward model against the labeler's noiseless quality on K SFT
    samples per held-out prompt; pairs the labeler scores equal are left out. Reported over all
    pairs, over pairs where one answer is correct and the other wrong ("correctness"), and over
    pairs equally correct that differ in style only ("style")."""
    from ..stages.reward import load_reward_model, score
    prompts = [it["prompt"] for it in items]
    samples = answer(sft_model, tok, prompts, max_new_tokens, batch_size, temperature=1.0, seed=seed + 1,
                     samples=k)
    rm, rm_tok, extra = load_reward_model(rm_checkpoint, device)
    rewards = score(rm, rm_tok, [p for p in prompts for _ in range(k)], [t for t, _ in samples],
                    [f for _, f in samples], extra, batch_size=batch_size // 4 or 1)
    tally = {kind: [0, 0] for kind in ("all", "correctness", "style")}  # [right, total]
    for i, p in enumerate(prompts):
        group = [(labeler.quality(p, t, f), labeler.is_correct(p, t), r)
                 for (t, f), r in zip(samples[i * k:(i + 1) * k], rewards[i * k:(i + 1) * k])]
        for (qa, ca, ra), (qb, cb, rb) in itertools.combinations(group, 2):
            if abs(qa - qb) > 1e-9:
                right = (qa > qb) == (ra > rb)
                for kind in ("all", "correctness" if ca != cb else "style"):
                    tally[kind][0] += right
                    tally[kind][1] += 1
    out: dict[str, Any] = {"prompts": len(prompts)}
    for kind, (right, total) in tally.items():
        prefix = "" if kind == "all" else f"{kind}_"
        out[f"{prefix}accuracy"] = right / total if total else float("nan")
        out[f"{prefix}pairs"] = total
    return out


def evaluate_all(checkpoints: dict[str, str], rm_checkpoint: str, items: list[dict], labeler: SimulatedLabeler,
                 out_dir: str | Path, device: str = "auto", max_new_tokens: int = 64, batch_size: int = 64,
                 k: int = 4, seed: int = 0, rm_prompts: int = 128) -> dict[str, Any]:
    """Answer ``items`` with every checkpoint ({name: path}), judge, compare; write answers JSONL.

    Returns {"models": {name: labeler metrics}, "win_rates": {...}, "rm_agreement": {...}}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    prompts = [it["prompt"] for it in items]
    answers: dict[str, list[tuple[str, bool]]] = {}
    models: dict[str, Any] = {}
    result: dict[str, Any] = {"models": models, "n_prompts": len(items)}
    for name, path in checkpoints.items():
        model, tok, _ = load_model(path, kind="gpt", device=dev)
        answers[name] = answer(model, tok, prompts, max_new_tokens, batch_size, seed=seed)
        texts, finished = [t for t, _ in answers[name]], [f for _, f in answers[name]]
        models[name] = labeler.evaluate(items, texts, finished)
        with open(out / f"answers_{name}.jsonl", "w", encoding="utf-8") as f:
            for it, (t, fin) in zip(items, answers[name]):
                row = {"prompt": it["prompt"], "task": it.get("task"), "response": t, "finished": fin,
                       "correct": labeler.is_correct(it["prompt"], t), "quality": labeler.quality(it["prompt"], t, fin)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if name == "sft":  # a subset keeps the K samples per prompt cheap on a CPU
            result["rm_agreement"] = rm_agreement(rm_checkpoint, model, tok, items[:rm_prompts], labeler, dev, k,
                                                  max_new_tokens, batch_size, seed)
    result["win_rates"] = {}
    for a, b in (("ppo", "sft"), ("sft", "pretrain"), ("ppo", "pretrain")):
        if a in answers and b in answers:
            result["win_rates"][f"{a}_vs_{b}"] = labeler.win_rate(
                prompts, [t for t, _ in answers[a]], [f for _, f in answers[a]],
                [t for t, _ in answers[b]], [f for _, f in answers[b]])
    return result
