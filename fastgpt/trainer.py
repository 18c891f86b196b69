"""The one training loop, shared by pre-training, SFT, reward modelling and PPO.

A stage hands the :class:`Trainer` a model and a :class:`Task`; the task knows the stage's data
and loss, the trainer knows everything else: AdamW (fused on CUDA), warmup + cosine schedule,
gradient accumulation, clipping, bf16 autocast on CUDA / fp32 on CPU, optional ``torch.compile``,
periodic evaluation, a progress bar with loss, tokens/s and MFU, ``metrics.jsonl``, atomic
checkpoints and exact resume (model, optimizer, step, every RNG and the task's data position),
and DDP when launched with ``torchrun`` (NCCL on CUDA, gloo on CPU).

Non-finite losses never reach the weights: the step is skipped and counted, and after
``max_bad_steps`` the run stops with a clear message, leaving the last good checkpoint in place.
"""
from __future__ import annotations

from .errors import FastGPTError

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import (CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_state_strict,
                         remove_stale_temporaries, save_checkpoint)
from .config import TrainConfig
from .model import GPT
from .tokenizer import Tokenizer

# Dense bf16 tensor-core peaks (datasheet, FLOP/s) used for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "RTX 4090": 165e12}


class TrainingError(FastGPTError, RuntimeError):
    """A run that cannot continue (one-line message)."""


class Task(Protocol):
    """What a stage gives the trainer. ``batch`` objects are opaque to the trainer."""

    def next_batch(self) -> Any:
        """The next training micro-batch, already on the model's device."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and metrics to log. Call ``model(...)`` (its forward) so DDP
        sees the pass."""

    def tokens(self, batch: Any) -> int:
        """Tokens of real data in the batch, for tokens/s and MFU."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics (called under no_grad, model in eval mode)."""

    # Optional: ``progress_keys``, names of metrics to show in the progress bar besides the loss.

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_env() -> DistInfo:
    """Rank information from torchrun's environment (1 process when not launched by it)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, dist_info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_info is not None and dist_info.world_size > 1:
        name = f"cuda:{dist_info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={name!r} requested but CUDA is not available (use device=cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * ratio


def amp_dtype(device: torch.device, dtype: str) -> torch.dtype | None:
    """The autocast dtype for a ``TrainConfig.dtype`` setting on ``device`` (None: plain fp32)."""
    if dtype not in ("auto", "bf16", "fp32"):
        raise TrainingError(f"dtype={dtype!r}: expected auto, bf16 or fp32")
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The one rule for mixed precision, shared by training, evaluation and PPO's rollouts."""
    amp = amp_dtype(device, dtype)
    return contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or scalar heads' bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=device.type == "cuda")


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``task`` on ``model``; see the module docstring."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, *, stage: str,
                 tokenizer: Tokenizer, model_kind: str = "gpt", extra: dict[str, Any] | None = None,
                 flops_per_token: float | None = None) -> None:
        self.cfg, self.task, self.stage, self.tokenizer = cfg, task, stage, tokenizer
        self.model_kind, self.extra = model_kind, dict(extra or {})
        self.dist = distributed_env()
        if self.dist.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        self.device = resolve_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = amp_dtype(self.device, cfg.dtype)
        self.model = model.to(self.device)
        for module in self.model.modules():
            if isinstance(module, GPT):
                module.grad_checkpointing = cfg.grad_checkpointing
        self.flops_per_token = flops_per_token
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.history: list[dict[str, Any]] = []
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.resumed_from: int | None = None
        if self.dist.is_main:
            for stale in remove_stale_temporaries(self.out_dir):
                print(f"removed {stale}, left by an interrupted checkpoint save", flush=True)
        if cfg.resume and (self.out_dir / CHECKPOINT_NAME).exists():
            self._resume()
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.train_model, device_ids=ids)

    # ----------------------------------------------------------------- precision
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.cfg.dtype)

    # --------------------------------------------------------------- checkpoints
    def _gather(self, obj: Any) -> list[Any]:
        if self.dist.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self) -> None:
        """Every rank contributes its RNG and data position; rank 0 writes the file atomically."""
        rngs = self._gather(rng_state())
        tasks = self._gather(self.task.state_dict())
        if self.dist.is_main:
            model_config = getattr(self.model, "config")
            save_checkpoint(self.out_dir, model=self.model, model_kind=self.model_kind,
                            model_config=model_config, tokenizer=self.tokenizer, stage=self.stage,
                            optimizer=self.optimizer.state_dict(),
                            trainer={"step": self.step, "tokens_seen": self.tokens_seen,
                                     "bad_steps": self.bad_steps, "world_size": self.dist.world_size},
                            rng=rngs, task=tasks, config=asdict(self.cfg), extra=self.extra,
                            history=self.history)
        if self.dist.world_size > 1:
            dist.barrier()

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT_NAME
        ckpt = load_checkpoint(path)
        if ckpt["stage"] != self.stage:
            raise CheckpointError(f"{path}: is a {ckpt['stage']} checkpoint, cannot resume it as {self.stage} "
                                  f"(use another out_dir or resume=false)")
        load_state_strict(self.model, ckpt["model"], str(path))
        if "optimizer" not in ckpt:
            raise CheckpointError(f"{path}: has no optimizer state to resume from")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        t = ckpt["trainer"]
        if t["world_size"] != self.dist.world_size:
            raise CheckpointError(f"{path}: written by {t['world_size']} processes, resuming with "
                                  f"{self.dist.world_size}")
        self.step, self.tokens_seen, self.bad_steps = t["step"], t["tokens_seen"], t["bad_steps"]
        set_rng_state(ckpt["rng"][self.dist.rank])
        self.task.load_state_dict(ckpt["task"][self.dist.rank])
        self.extra.update(ckpt.get("extra", {}))
        self.history = list(ckpt.get("history", []))
        self.resumed_from = self.step

    # ------------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.history.append(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.task.evaluate(self.model)
        self.model.train()
        return metrics

    # ---------------------------------------------------------------------- loop
    def _backward_step(self) -> tuple[torch.Tensor, dict[str, float], int]:
        """Gradient accumulation over cfg.grad_accum micro-batches; returns mean loss."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        sums: dict[str, float] = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = self.task.next_batch()
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.train_model.no_sync()
            with sync:
                with self.autocast():
                    loss, metrics = self.task.loss(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
            tokens += self.task.tokens(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        return total / cfg.grad_accum, sums, tokens

    def fit(self) -> dict[str, Any]:
        """Train to cfg.max_steps (from the resumed step, if any) and return a summary."""
        cfg = self.cfg
        self.model.train()
        peak = peak_flops(self.device)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.stage, unit="step",
                   disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True, leave=True)
        window: dict[str, float] = {}
        counts: dict[str, int] = {}  # a metric may be missing on some steps: average what was reported
        window_steps, window_tokens, window_time = 0, 0, 0.0
        bar_keys = ("loss", "tokens_per_s", "mfu", *getattr(self.task, "progress_keys", ()))
        last_eval: dict[str, float] = {}
        start = time.perf_counter()
        while self.step < cfg.max_steps:
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss, metrics, tokens = self._backward_step()
            loss_value = float(loss)
            if self.dist.world_size > 1:  # every rank must agree to skip
                flag = torch.tensor([0.0 if math.isfinite(loss_value) else 1.0], device=self.device)
                dist.all_reduce(flag)
                finite = flag.item() == 0
            else:
                finite = math.isfinite(loss_value)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                self.bad_steps += 1
                self._log({"step": self.step, "event": "skipped non-finite loss", "bad_steps": self.bad_steps})
                if self.bad_steps > cfg.max_bad_steps:
                    bar.close()
                    raise TrainingError(
                        f"{self.stage}: {self.bad_steps} non-finite losses (max_bad_steps={cfg.max_bad_steps}); "
                        f"stopped at step {self.step}, last good checkpoint kept in {self.out_dir}")
                continue
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += tokens * self.dist.world_size
            window_steps += 1
            window_tokens += tokens * self.dist.world_size
            window_time += dt
            step_metrics = {"loss": loss_value, **metrics}
            if grad_norm is not None:
                step_metrics["grad_norm"] = grad_norm
            for k, v in step_metrics.items():
                if math.isfinite(v):
                    window[k] = window.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1

            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                record = {"step": self.step, "lr": lr, **{k: v / counts[k] for k, v in window.items()}}
                record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                if peak and self.flops_per_token:
                    record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (peak * self.dist.world_size)
                self._log(record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in bar_keys if k in record}
                                | {k: f"{v:.3g}" for k, v in last_eval.items() if k.startswith("val")})
                window, counts, window_steps, window_tokens, window_time = {}, {}, 0, 0, 0.0
            if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.max_steps:
                last_eval = self.evaluate()
                self._log({"step": self.step, **{f"eval/{k}": v for k, v in last_eval.items()}})
            if self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                self.save()
            bar.update(1)
        bar.close()
        last_eval = self.evaluate()
        self._log({"step": self.step, **{f"eval/{k}": v for k, v in last_eval.items()}})
        self.save()
        return {"stage": self.stage, "steps": self.step, "tokens": self.tokens_seen,
                "seconds": time.perf_counter() - start, "bad_steps": self.bad_steps,
                "resumed_from": self.resumed_from, "eval": last_eval, "out_dir": str(self.out_dir)}
