"""Stage 2: supervised fine-tuning (SFT) on demonstration conversations.

The model learns to continue a conversation as the assistant: the loss covers only the
assistant's text and the end-of-turn token that closes each assistant turn (so it learns to
stop), never system or user text or the chat template's headers; the chat format is the start
model's tokenizer's (fastgpt's own, or a Hugging Face folder's chat template).  The loss is normalised per token over the micro-batch
(mean over the micro-batch's trained tokens), so a long answer weighs more than a short one, as
in pre-training; with gradient accumulation the trainer averages the micro-batch means.

Conversations are packed whole into rows of ``block_size`` (``pack_rows`` with ``cu_seqlens``:
no attention across conversations, padding only in each row's tail), in an
epoch-based order reshuffled every epoch.  Defaults follow InstructGPT's SFT where they fit tiny
models: cosine decay to 10% of the peak LR, residual dropout (0.2 there, 0.1 here).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..chatdata import (
    BadRecord, EpochOrder, Example, LoadReport, iter_batches, pack_groups, parse_conversation, read_records,
)
from ..config import ConfigError
from ..data import IGNORE_INDEX, DataError, PackedBatch
from ..distributed import unsharded_gpt
from ..tokenizer import Message, Tokenizer, encode_chat, encode_prompt
from ..trainer import Trainer, distributed_env, resolve_device, seed_everything
from .common import (add_lora, load_start_model, micro_batch_rows, packed_plan, set_dropout, shorten_context,
                     split_holdout)
from .configs import SFTConfig


# ---------------------------------------------------------------------------- data
def encode_sft_example(tok: Tokenizer, messages: list[Message], block_size: int) -> tuple[Example, bool]:
    """(input ids, labels) of a conversation and whether it was truncated.

    ``labels[t]`` is the next id where that id is trained on (assistant text or its <|end|>),
    else IGNORE_INDEX. Conversations longer than the context keep their first ``block_size``
    inputs; one whose trained tokens all fall beyond that is rejected.
    """
    ids, mask = encode_chat(tok, messages)
    truncated = len(ids) > block_size + 1
    ids, mask = ids[:block_size + 1], mask[:block_size + 1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise BadRecord(f"no assistant tokens within the first {block_size} tokens of the context")
    return (ids[:-1], labels), truncated


def load_conversations(path: str, tok: Tokenizer, block_size: int, max_bad_fraction: float
                       ) -> tuple[list[Example], list[list[Message]], LoadReport]:
    """Encode every usable conversation of the JSONL file ``path``; skip-and-count the rest
    and print one summary line. Returns (examples, their messages, report)."""
    if not path:
        raise ConfigError("data is required: a conversations JSONL file")
    report = LoadReport(path)

    def parse(obj: dict) -> tuple[Example, list[Message]]:
        msgs = parse_conversation(obj)
        example, truncated = encode_sft_example(tok, msgs, block_size)
        report.truncated += truncated
        return example, msgs

    records = [v for _, v in read_records(path, parse, report)]
    report.finish("sft", max_bad_fraction, "conversations", block_size)
    return [e for e, _ in records], [m for _, m in records], report




# ---------------------------------------------------------------------------- task
class SFTTask:
    """Packed conversations; per-token mean cross-entropy on the assistant's tokens."""

    def __init__(self, cfg: SFTConfig, train: list[Example], val: list[Example], val_prompts: list[list[Message]],
                 tok: Tokenizer, block_size: int, device: torch.device) -> None:
        dist = distributed_env()
        self.cfg, self.train, self.val, self.val_prompts = cfg, train, val, val_prompts
        self.tok, self.block_size, self.device = tok, block_size, device
        self.lengths = [[len(ids)] for ids, _ in train]
        self.order = EpochOrder(len(train), cfg.seed, dist.rank, dist.world_size)

    def next_batch(self) -> PackedBatch:
        items = self.order.take(self.lengths, self.cfg.batch_size, self.block_size)
        batch, _ = pack_groups([[self.train[i]] for i in items], self.cfg.batch_size, self.block_size, self.tok.pad_id)
        return batch.to(self.device)

    def loss(self, model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        _, loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        return loss, {"packing_efficiency": batch.efficiency, "epoch": self.order.progress}

    def tokens(self, batch: PackedBatch) -> int:
        return batch.n_real

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.val:
            out["val_loss"] = packed_loss(model, self.val, self.cfg.batch_size, self.block_size, self.tok.pad_id)
        if self.cfg.eval_format_prompts and self.val_prompts:
            prompts = self.val_prompts[:self.cfg.eval_format_prompts]
            out["format_rate"] = format_rate(unsharded_gpt(model), self.tok, prompts, self.cfg.eval_max_new_tokens)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state)


@torch.no_grad()
def packed_loss(model: nn.Module, examples: list[Example], rows: int, row_len: int, pad_id: int) -> float:
    """Mean per-token loss over all trained tokens of ``examples`` (packed in order)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch, _ in iter_batches([[e] for e in examples], pack_groups, rows, row_len, pad_id):
        batch = batch.to(device)
        _, loss = model(batch.idx, batch.labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen,
                        reduction="sum")
        total += float(loss)
        count += int((batch.labels != IGNORE_INDEX).sum())
    return total / max(1, count)


def format_rate(model: nn.Module, tok: Tokenizer, conversations: list[list[Message]], max_new_tokens: int) -> float:
    """Share of greedy answers to the conversations' first prompts that end their turn."""
    from ..engine import SamplingParams, generate
    prompts = []
    for msgs in conversations:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ids = encode_prompt(tok, msgs[:first])
        prompts.append(ids[-(model.config.block_size // 2):])  # leave room to answer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids)
    gens = generate(model, prompts, params, vocab_limit=tok.vocab_size)
    return sum(g.finished for g in gens) / len(gens)


# ---------------------------------------------------------------------------- stage
def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.init_from`` on ``cfg.data`` and return the trainer's summary (plus a
    ``data`` entry: conversations used, held out, skipped and truncated)."""
    seed_everything(cfg.seed)
    model, tok = load_start_model(cfg.init_from, cfg.tokenizer)
    set_dropout(model, cfg.dropout)
    if cfg.block_size:
        shorten_context(model, cfg.block_size, f"block_size={cfg.block_size}")
    add_lora(model, cfg, "sft")
    T = model.config.block_size
    device = resolve_device(cfg.device, distributed_env())
    cfg.batch_size = micro_batch_rows(cfg, model.config, "sft", T, device)
    examples, messages, report = load_conversations(cfg.data, tok, T, cfg.max_bad_fraction)
    train_ids, val_ids = split_holdout(len(examples), cfg.val_fraction, cfg.seed)
    if not train_ids:
        raise DataError(f"{report.path}: too few conversations to train on ({len(examples)})")
    train = [examples[i] for i in train_ids]
    plan = packed_plan(cfg, [[len(ids)] for ids, _ in train], T, "conversation", len(val_ids))
    task = SFTTask(cfg, train, [examples[i] for i in val_ids], [messages[i] for i in val_ids], tok, T, device)
    trainer = Trainer(cfg, model, task, stage="sft", tokenizer=tok, data={"data": cfg.data}, plan=plan,
                      flops_per_token=model.flops_per_token(T))
    summary = trainer.fit()
    summary["data"] = {"train": len(train), "val": len(val_ids), "skipped": len(report.bad),
                       "truncated": report.truncated}
    return summary
