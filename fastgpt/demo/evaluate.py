"""Held-out evaluation of the demo's models by the simulated labeler.

Only the world's evaluation prompts are used: no stage trained on them and no choice was made on
them (PPO picks best.pt on its own dev prompts). Every model answers through the chat template,
greedily, stopping at <|end|>; ``finished`` means it emitted <|end|> before the token limit. The
labeler then scores the answers (accuracy, mean quality, format compliance, length) and compares
each model with SFT answer by answer (win rate over non-tied prompts, ties reported apart).

Best-of-N is the baseline PPO has to beat without any training: N samples of the SFT model per
prompt at temperature 1, the one the reward model scores highest kept (rejection sampling). Its
KL to SFT is at most log N - (N - 1) / N nats (Stiennon et al.), the figure reported for it.

The reward model is checked twice: its held-out pairwise accuracy against the (noisy) rankings
comes from the reward stage's summary; here, on the first K of those SFT samples per evaluation
prompt, which it has never seen, its agreement with the labeler's noiseless preference, over all
pairs and apart on pairs that differ in correctness and pairs equally correct that differ in
style only.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_model
from ..engine import SamplingParams, generate
from ..tokenizer import Tokenizer, encode_prompt, prompt_messages
from ..trainer import resolve_device
from .labeler import SimulatedLabeler

Answer = tuple[str, bool]  # (text without <|end|>, finished)


def answer(model: torch.nn.Module, tok: Tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
           temperature: float = 0.0, seed: int = 0, samples: int = 1) -> list[Answer]:
    """(text, finished) for each prompt (x ``samples``, a prompt's samples adjacent), chat template."""
    ids = [encode_prompt(tok, prompt_messages(p)) for p in prompts for _ in range(samples)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=(tok.end_id,),
                            seed=seed)
    # Modest batches: the CPU decode step slows down sharply with very wide batches.
    gens = generate(model, ids, params, vocab_limit=tok.vocab_size, batch_size=batch_size)
    return [(tok.decode(g.tokens[:-1] if g.finished else g.tokens), g.finished) for g in gens]


def best_of_n_kl(n: int) -> float:
    """The KL of best-of-n sampling to the sampled policy, nats: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def rm_agreement(prompts: list[str], samples: list[Answer], rewards: list[float], k: int,
                 labeler: SimulatedLabeler) -> dict[str, Any]:
    """Pairwise accuracy of the reward model (``rewards``) against the labeler's noiseless quality
    on ``k`` samples per prompt; pairs the labeler scores equal are left out. Reported over all
    pairs, over pairs where one answer is correct and the other wrong ("correctness"), and over
    pairs equally correct that differ in style only ("style")."""
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
    out: dict[str, Any] = {"prompts": len(prompts), "samples_per_prompt": k}
    for kind, (right, total) in tally.items():
        prefix = "" if kind == "all" else f"{kind}_"
        out[f"{prefix}accuracy"] = right / total if total else float("nan")
        out[f"{prefix}pairs"] = total
    return out


def _write_answers(path: Path, items: list[dict], answers: list[Answer], labeler: SimulatedLabeler) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it, (t, fin) in zip(items, answers):
            row = {"prompt": it["prompt"], "task": it.get("task"), "response": t, "finished": fin,
                   "correct": labeler.is_correct(it["prompt"], t), "quality": labeler.quality(it["prompt"], t, fin)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate_all(checkpoints: dict[str, str], rm_checkpoint: str, items: list[dict], labeler: SimulatedLabeler,
                 out_dir: str | Path, device: str = "auto", max_new_tokens: int = 64, batch_size: int = 64,
                 best_of: tuple[int, ...] = (1, 4, 16), k: int = 4, seed: int = 0) -> dict[str, Any]:
    """Answer ``items`` with every checkpoint ({name: path}; "sft" is required, "ppo*" models get
    their KL to it) and with best-of-N of the SFT model; judge, compare with SFT; write
    ``answers_<name>.jsonl`` for each.

    Returns {"models": {name: labeler metrics + "kl_to_sft"}, "win_rates": {"<name>_vs_sft": ...},
    "rm_agreement": {...}, "n_prompts"}.
    """
    from ..stages.policy_eval import sequence_kl
    from ..stages.reward import best_of_n, load_reward_model, score
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    prompts = [it["prompt"] for it in items]
    sft, tok, _ = load_model(checkpoints["sft"], kind="gpt", device=dev)
    answers: dict[str, list[Answer]] = {}
    models: dict[str, Any] = {}
    for name, path in checkpoints.items():
        model = sft if name == "sft" else load_model(path, kind="gpt", device=dev)[0]
        answers[name] = answer(model, tok, prompts, max_new_tokens, batch_size, seed=seed)
        models[name] = labeler.evaluate(items, [t for t, _ in answers[name]], [f for _, f in answers[name]])
        if name == "sft":
            models[name]["kl_to_sft"] = 0.0
        elif name.startswith("ppo"):  # on its own samples, as PPO measured it during training
            ids = [encode_prompt(tok, prompt_messages(p)) for p in prompts]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=(tok.end_id,), seed=seed)
            gens = generate(model, ids, params, vocab_limit=tok.vocab_size, batch_size=batch_size)
            models[name]["kl_to_sft"] = sequence_kl(model, sft, ids, [g.tokens for g in gens], 1.0)
        _write_answers(out / f"answers_{name}.jsonl", items, answers[name], labeler)
    # best-of-N: the SFT model's samples, the reward model's favourite of the first n of each prompt
    group = max(max(best_of), k)
    samples = answer(sft, tok, prompts, max_new_tokens, batch_size, temperature=1.0, seed=seed + 1, samples=group)
    rm, rm_tok, extra = load_reward_model(rm_checkpoint, dev)
    rewards = score(rm, rm_tok, [p for p in prompts for _ in range(group)], [t for t, _ in samples],
                    [f for _, f in samples], extra, batch_size=batch_size // 4 or 1)
    for n in best_of:
        name = f"best_of_{n}"
        answers[name] = [samples[i] for i in best_of_n(rewards, group, n)]
        models[name] = labeler.evaluate(items, [t for t, _ in answers[name]], [f for _, f in answers[name]])
        models[name]["kl_to_sft"] = best_of_n_kl(n)
        _write_answers(out / f"answers_{name}.jsonl", items, answers[name], labeler)
    first_k = [s for i in range(len(prompts)) for s in samples[i * group:i * group + k]]
    first_k_rewards = [r for i in range(len(prompts)) for r in rewards[i * group:i * group + k]]
    result: dict[str, Any] = {"models": models, "n_prompts": len(items),
                              "rm_agreement": rm_agreement(prompts, first_k, first_k_rewards, k, labeler)}
    result["win_rates"] = {
        f"{name}_vs_sft": labeler.win_rate(prompts, [t for t, _ in answers[name]], [f for _, f in answers[name]],
                                           [t for t, _ in answers["sft"]], [f for _, f in answers["sft"]])
        for name in answers if name != "sft"}
    return result
