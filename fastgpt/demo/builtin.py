"""The built-in world as the data of a stage that was given none: the one place that decides it.

Stages read only the files their config names. The command line lets a user leave the data
out (``fastgpt pretrain``, ``fastgpt sft --init_from P``, ``fastgpt ppo ...`` without
``--prompts``) and train on the demo's world instead; :func:`fill_builtin_data` makes that
true by writing the world's files under the run folder and pointing the empty fields at them.
The file names carry the world's seed and size, so a run folder never mixes two worlds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..files import atomic_write


def _write_once(path: Path, rows: Iterable[dict[str, Any]]) -> str:
    """Write JSONL rows to ``path`` unless it exists (it is a pure function of its name)."""
    if not path.exists():
        with atomic_write(path) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def builtin_dataset(out_dir: str | Path, documents: int, seed: int = 0) -> Path:
    """fastgpt's own pre-training corpus (the world's plain statements), tokenized byte-level into
    ``<out_dir>/builtin/corpus-<documents>-seed<seed>`` unless it is there already."""
    from ..data import prepare
    from ..tokenizer import ByteTokenizer
    from .world import pretrain_texts
    folder = Path(out_dir) / "builtin" / f"corpus-{documents}-seed{seed}"
    if (folder / "meta.json").exists():
        return folder
    corpus = folder / "corpus.jsonl"
    corpus.unlink(missing_ok=True)  # a half-prepared folder from an interrupted run
    _write_once(corpus, ({"text": t} for t in pretrain_texts(documents, seed=seed)))
    prepare([corpus], folder, ByteTokenizer(), val_fraction=0.02, seed=seed)
    return folder


def fill_builtin_data(cfg: Any) -> Any:
    """Point the empty data fields of a stage config at the built-in world; returns ``cfg``.

    pretrain: ``data`` -> the built-in corpus (``builtin_documents`` documents, seed ``seed``);
    sft: ``data`` -> the world's demonstrations (seed ``seed``); ppo and grpo without ``prompts``:
    the world's PPO prompts, and its held-out evaluation prompts unless ``eval_prompts`` is given
    (a user's own prompts get a held-out slice of themselves instead, in the stage). The reward
    and DPO stages have no built-in data: rankings come from a person or the demo's labeler.
    """
    from ..stages.configs import GRPOConfig, PPOConfig, PretrainConfig, SFTConfig
    folder = Path(cfg.out_dir) / "builtin"
    if isinstance(cfg, PretrainConfig) and not cfg.data:
        cfg.data = str(builtin_dataset(cfg.out_dir, cfg.builtin_documents, cfg.seed))
    elif isinstance(cfg, SFTConfig) and not cfg.data:
        from .world import make_world
        cfg.data = _write_once(folder / f"sft-seed{cfg.seed}.jsonl", make_world(cfg.seed, n_pretrain=0).sft)
    elif isinstance(cfg, (PPOConfig, GRPOConfig)) and not cfg.prompts:
        from .world import make_world
        world = make_world(cfg.world_seed, n_pretrain=0)
        cfg.prompts = _write_once(folder / f"ppo_prompts-seed{cfg.world_seed}.jsonl",
                                  ({"prompt": p} for p in world.ppo_prompts))
        if not cfg.eval_prompts:
            cfg.eval_prompts = _write_once(folder / f"eval_prompts-seed{cfg.world_seed}.jsonl",
                                           ({"prompt": it["prompt"]} for it in world.eval_items))
    return cfg
