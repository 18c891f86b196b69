"""Stage 1: generative pre-training on token shards (a dataset folder from ``fastgpt prepare``)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError
from ..data import TokenLoader, dataset_tokenizer, load_meta
from ..model import GPT
from ..hf import resize_vocab
from ..trainer import DataPlan, Trainer, distributed_env, resolve_device, seed_everything
from .common import (add_lora, apply_start_settings, load_language_model, micro_batch_rows, padded_vocab,
                     require_same_tokenizer)
from .configs import PretrainConfig


class PretrainTask:
    """Next-token prediction on random windows of the training shards."""

    def __init__(self, cfg: PretrainConfig, vocab_size: int, device: torch.device) -> None:
        dist = distributed_env()
        T = cfg.model.block_size
        self.cfg, self.vocab_size, self.device = cfg, vocab_size, device
        self.train = TokenLoader(cfg.data, "train", T, cfg.batch_size, vocab_size, cfg.seed, dist.rank, device,
                                 dist.world_size)
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
        model, model_tokenizer, _ = load_language_model(cfg.init_from)
        if model_tokenizer is not None:
            hint = f" (prepare the data with --tokenizer {cfg.init_from.removeprefix('hf:')})" \
                if cfg.init_from.startswith("hf:") else ""
            require_same_tokenizer(model_tokenizer, tokenizer, f"data={cfg.data}", hint)
        if model.config.vocab_size < tokenizer.vocab_size:  # chat special tokens added to a BPE
            model, _ = resize_vocab(model, padded_vocab(tokenizer))
        apply_start_settings(model, cfg.model, cfg.init_from)
        cfg.model = model.config
    else:
        if cfg.lora_rank:
            raise ConfigError("lora_rank needs init_from: adapters on a randomly initialised model learn on top "
                              "of noise (LoRA continues the pre-training of an existing model)")
        cfg.model.vocab_size = padded_vocab(tokenizer)
        model = GPT(cfg.model)
    add_lora(model, cfg, "pretrain")
    cfg.batch_size = micro_batch_rows(cfg, cfg.model, "pretrain", cfg.model.block_size, device)
    task = PretrainTask(cfg, cfg.model.vocab_size, device)
    trainer = Trainer(cfg, model, task, stage="pretrain", tokenizer=tokenizer, data={"data": cfg.data},
                      plan=pretrain_plan(cfg), flops_per_token=model.flops_per_token(cfg.model.block_size))
    return trainer.fit()


def pretrain_plan(cfg: PretrainConfig) -> DataPlan:
    """Tokens per step and epochs over the dataset's training tokens; validation in context windows."""
    tokens = load_meta(cfg.data)["tokens"]
    T = cfg.model.block_size
    per_step = cfg.batch_size * T * cfg.grad_accum * distributed_env().world_size
    return DataPlan(tokens["train"], "token", tokens["train"] / per_step, per_step, packed=False,
                    val_size=tokens["val"] // T, val_unit=f"{T}-token validation window")
