"""Stage 1: generative pre-training on token shards (a dataset folder from ``fastgpt prepare``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from ..data import TokenLoader, dataset_tokenizer
from ..model import GPT
from ..trainer import Trainer, distributed_env, resolve_device, seed_everything
from .common import add_lora, load_language_model, padded_vocab
from .configs import PretrainConfig


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


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Pre-train a GPT per ``cfg`` and return the trainer's summary."""
    if not cfg.data:
        raise ConfigError("data is required: a dataset folder from `fastgpt prepare`")
    seed_everything(cfg.seed)
    tokenizer = dataset_tokenizer(cfg.data)
    device = resolve_device(cfg.device, distributed_env())
    if cfg.init_from:
        model, _, cfg.model = load_language_model(cfg.init_from)
        if cfg.model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"init_from={cfg.init_from}: model vocabulary {cfg.model.vocab_size} is smaller "
                             f"than the dataset's tokenizer ({tokenizer.vocab_size})")
    else:
        if cfg.lora_rank:
            raise ConfigError("lora_rank needs init_from: adapters on a randomly initialised model learn on top "
                              "of noise (LoRA continues the pre-training of an existing model)")
        cfg.model.vocab_size = padded_vocab(tokenizer)
        model = GPT(cfg.model)
    add_lora(model, cfg, "pretrain")
    task = PretrainTask(cfg, cfg.model.vocab_size, device)
    trainer = Trainer(cfg, model, task, stage="pretrain", tokenizer=tokenizer,
                      flops_per_token=model.flops_per_token(cfg.model.block_size))
    return trainer.fit()
