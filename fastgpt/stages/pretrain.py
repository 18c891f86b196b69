"""Stage 1: generative pre-training on token shards (or the built-in corpus)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError, ModelConfig, TrainConfig
from ..data import TokenLoader, dataset_tokenizer, prepare
from ..model import GPT
from ..tokenizer import ByteTokenizer
from ..trainer import Trainer, distributed_env, resolve_device, seed_everything
from .common import load_language_model, padded_vocab


@dataclass
class PretrainConfig(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: str = ""              # dataset folder from `fastgpt prepare`; "" = built-in corpus
    init_from: str = ""         # "" = random init; a fastgpt checkpoint; "hf:<folder>" = GPT-2 import
    eval_batches: int = 20      # validation batches per evaluation (same windows every time)
    builtin_documents: int = 30000  # size of the built-in corpus when data = ""


class PretrainTask:
    """Next-token prediction on random windows of the training shards."""

    def __init__(self, cfg: PretrainConfig, vocab_size: int, device: torch.device) -> None:
        dist = distributed_env()
        T = cfg.model.block_size
        self.cfg, self.vocab_size, self.device = cfg, vocab_size, device
        self.train = TokenLoader(cfg.data, "train", T, cfg.batch_size, vocab_size, cfg.seed, dist.rank, device)
        self.val_args = (cfg.data, "val", T, cfg.batch_size, vocab_size)
        TokenLoader(*self.val_args, seed=0, device=device)  # fail now, not at the first eval

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train.next_batch()

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        _, loss = model(x, y)
        return loss, {}

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        val = TokenLoader(*self.val_args, seed=0, device=self.device)  # same windows each time
        losses = [float(model(*val.next_batch())[1]) for _ in range(self.cfg.eval_batches)]
        return {"val_loss": sum(losses) / len(losses)}

    def state_dict(self) -> dict[str, Any]:
        return self.train.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train.load_state_dict(state)


def builtin_dataset(out_dir: str | Path, documents: int, seed: int = 0) -> Path:
    """Generate fastgpt's own corpus (the demo world's plain statements) and tokenize it."""
    from ..demo.world import pretrain_texts
    data_dir = Path(out_dir) / "data"
    if (data_dir / "meta.json").exists():
        return data_dir
    raw = Path(out_dir) / "corpus"
    raw.mkdir(parents=True, exist_ok=True)
    import json
    with open(raw / "pretrain.jsonl", "w") as f:
        for text in pretrain_texts(documents, seed=seed):
            f.write(json.dumps({"text": text}) + "\n")
    prepare([raw / "pretrain.jsonl"], data_dir, ByteTokenizer(), val_fraction=0.02, seed=seed)
    return data_dir


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train a GPT per ``cfg`` and return the trainer's summary."""
    seed_everything(cfg.seed)
    if not cfg.data:
        cfg.data = str(builtin_dataset(cfg.out_dir, cfg.builtin_documents, cfg.seed))
    tokenizer = dataset_tokenizer(cfg.data)
    device = resolve_device(cfg.device, distributed_env())
    if cfg.init_from:
        model, _, cfg.model = load_language_model(cfg.init_from)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"init_from={cfg.init_from}: model vocabulary {cfg.model.vocab_size} is smaller "
                             f"than the dataset's tokenizer ({tokenizer.vocab_size})")
    else:
        cfg.model.vocab_size = padded_vocab(tokenizer)
        model = GPT(cfg.model)
    task = PretrainTask(cfg, cfg.model.vocab_size, device)
    trainer = Trainer(cfg, model, task, stage="pretrain", tokenizer=tokenizer,
                      flops_per_token=model.flops_per_token(cfg.model.block_size))
    return trainer.fit()


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    from ..cli import add_config_arguments
    add_config_arguments(parser, PretrainConfig)


def run(args) -> int:
    from ..cli import config_from_args
    summary = pretrain(config_from_args(PretrainConfig, args))
    print(f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f}s; "
          f"val_loss {summary['eval'].get('val_loss', float('nan')):.4f}; checkpoint in {summary['out_dir']}")
    return 0
