"""The one training loop, shared by pre-training, SFT, reward modelling and PPO.

A stage hands the :class:`Trainer` a model and a :class:`Task`; the task knows the stage's data
and loss, the trainer knows everything else: AdamW (fused on CUDA), warmup + cosine schedule,
gradient accumulation, clipping, bf16 autocast on CUDA / fp32 on CPU, optional ``torch.compile``,
periodic evaluation, a progress bar with loss, tokens/s and MFU, ``metrics.jsonl``, atomic
checkpoints and exact resume (model, optimizer, step, every RNG and the task's data position).
Launched by ``torchrun`` it trains data-parallel (DDP), or sharded with ``fsdp`` (FSDP2, sharded
checkpoints that resume on any number of processes): see :mod:`fastgpt.distributed`. Every
process trains; metrics are averaged over processes and only rank 0 writes files.

Non-finite losses never reach the weights: the step is skipped and counted, and after
``max_bad_steps`` the run stops with a clear message, leaving the last good checkpoint in place.
"""
from __future__ import annotations

from .errors import FastGPTError

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import (BEST_NAME, BEST_RECORD, CHECKPOINT_NAME, CheckpointError, check_architecture, load_checkpoint,
                         load_state_strict, remove_stale_temporaries, save_checkpoint)
from .config import TrainConfig
from .console import Progress, plural
from . import distributed as parallel
from .distributed import DistInfo, distributed_env
from .files import atomic_write, content_digest
from .metrics import MetricsLogger, open_loggers
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

    # Optional: ``progress_keys``, names of metrics to show in the progress bar besides the loss;
    # ``selection_score(metrics) -> float | None``, how good the model is by an evaluation's
    # metrics (higher is better, None: not a candidate): the trainer keeps the best one as best.pt.

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataPlan:
    """What a run trains on, as the stage sees it: shown before the first step, with warnings when
    the numbers cannot mean much."""

    size: int                        # training items (conversations, rankings, prompts, tokens)
    unit: str                        # what an item is, singular ("conversation")
    steps_per_epoch: float           # optimizer steps one pass over the training items takes
    tokens_per_step: int             # tokens one optimizer step trains on (at most, when packed)
    packed: bool = True              # tokens_per_step is a capacity of packed rows, not exact
    val_size: int = 0                # held-out items behind the evaluation metrics
    val_unit: str = ""
    step: str = ""                   # what a micro-batch is, when not batch_size rows of the model's context
    notes: list[str] = field(default_factory=list)  # stage-specific lines for the start block


MANY_EPOCHS = 10     # more passes than this over the training data memorise it
FEW_HELD_OUT = 20    # a held-out metric over fewer items than this is mostly noise


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
    """Runs ``cfg.max_steps`` optimizer steps of ``task`` on ``model``; see the module docstring.

    ``data`` maps the config fields that name training data to their paths: a resume is refused
    when what they hold changed since the checkpoint (see :meth:`_check_resume`). ``plan``
    describes the data for the start-of-run block. ``loggers`` receive every metric record besides
    ``metrics.jsonl`` (and TensorBoard / wandb when the config asks for them).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Task, *, stage: str,
                 tokenizer: Tokenizer, model_kind: str = "gpt", extra: dict[str, Any] | None = None,
                 flops_per_token: float | None = None, data: dict[str, str] | None = None,
                 plan: DataPlan | None = None, loggers: Sequence[MetricsLogger] = ()) -> None:
        self.cfg, self.task, self.stage, self.tokenizer = cfg, task, stage, tokenizer
        self.model_kind, self.extra = model_kind, dict(extra or {})
        self.plan, self.extra_loggers = plan, list(loggers)
        self.loggers: list[MetricsLogger] = []  # opened by fit
        self.dist = distributed_env()
        self.device = resolve_device(cfg.device, self.dist)
        parallel.init_process_group(self.dist, self.device, cfg.fsdp)
        if self.device.type == "cuda" and self.device.index is not None:  # plain "cuda" is the current one
            torch.cuda.set_device(self.device)
        self.amp_dtype = amp_dtype(self.device, cfg.dtype)
        self.model = model.to(self.device)
        for module in self.model.modules():
            if isinstance(module, GPT):
                module.grad_checkpointing = cfg.grad_checkpointing
        if cfg.fsdp:  # in place: self.model is the sharded model from here on
            parallel.shard_model(self.model, self.device)
        self.flops_per_token = flops_per_token
        self.out_dir = Path(cfg.out_dir)
        self.data = {name: {"path": str(path), "sha256": content_digest(path)}
                     for name, path in (data or {}).items() if path}
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.seconds_before = 0.0  # training time of earlier runs of this checkpoint
        self.history: list[dict[str, Any]] = []
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.resumed_from: int | None = None
        if self.dist.is_main:
            for stale in remove_stale_temporaries(self.out_dir):
                print(f"removed {stale}, left by an interrupted checkpoint save", flush=True)
        if cfg.resume and (self.out_dir / CHECKPOINT_NAME).exists():
            self._resume()
        elif self.dist.is_main:  # a fresh run: a best.pt left in the folder belongs to an older one
            for name in (BEST_NAME, BEST_RECORD):
                (self.out_dir / name).unlink(missing_ok=True)
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        if self.dist.world_size > 1 and not cfg.fsdp:
            self.train_model = parallel.data_parallel(self.train_model, self.device)

    # ----------------------------------------------------------------- precision
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.cfg.dtype)

    # --------------------------------------------------------------- checkpoints
    def save(self, seconds: float = 0.0) -> None:
        """Every rank contributes its RNG and data position; rank 0 writes the file atomically.
        A sharded run first writes its sharded model and optimizer state (every rank its shards);
        checkpoint.pt then names that folder and holds the whole model for later stages.
        ``seconds``: training time of this run so far."""
        rngs = parallel.gather_objects(rng_state())
        tasks = parallel.gather_objects(self.task.state_dict())
        state: dict[str, Any] = {"step": self.step, "tokens_seen": self.tokens_seen, "bad_steps": self.bad_steps,
                                 "world_size": self.dist.world_size}
        if self.cfg.fsdp:
            state["sharded"] = parallel.save_sharded(self.out_dir, self.step, self.model, self.optimizer)
            weights, optimizer = parallel.full_model_state(self.model), {}
        else:
            weights, optimizer = None, {"optimizer": self.optimizer.state_dict()}
        if self.dist.is_main:
            model_config = getattr(self.model, "config")
            save_checkpoint(self.out_dir, model=self.model, weights=weights, model_kind=self.model_kind,
                            model_config=model_config, tokenizer=self.tokenizer, stage=self.stage,
                            trainer=state, seconds=self.seconds_before + seconds, rng=rngs, task=tasks,
                            config=asdict(self.cfg), data=self.data, extra=self.extra, history=self.history,
                            **optimizer)
            parallel.remove_other_shards(self.out_dir, state.get("sharded", ""))
        if parallel.active():
            dist.barrier()

    def _check_resume(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse, in one line, to resume a checkpoint trained with other data or settings than
        ``self.cfg`` (only the config's RESUME_SAFE settings may change, and its PER_PROCESS ones
        when the number of processes changes in proportion), or past max_steps."""
        saved, now = ckpt.get("config", {}), asdict(self.cfg)
        safe = set(getattr(type(self.cfg), "RESUME_SAFE", frozenset()))
        # per-process sizes may change with the number of processes if the whole step stays the same
        saved_world = ckpt["trainer"].get("world_size", 1)
        safe |= {key for key in getattr(type(self.cfg), "PER_PROCESS", ()) if key in saved and
                 saved[key] * saved_world == now[key] * self.dist.world_size}
        saved_data = ckpt.get("data")  # None: a checkpoint from before data digests; compare paths then
        by_digest = set(self.data) | set(saved_data or {}) if saved_data is not None else set()
        changes = []
        for key, old in saved.items():
            if key in safe or key in by_digest or key not in now or now[key] == old:
                continue
            if isinstance(old, dict):  # a nested config (model): name each differing field
                changes += [f"{key}.{k} {v!r} -> {now[key].get(k)!r}" for k, v in old.items() if now[key].get(k) != v]
            else:
                changes.append(f"{key} {old!r} -> {now[key]!r}")
        for key in sorted(by_digest):  # the same contents under another path are the same data
            old, new = (saved_data or {}).get(key), self.data.get(key)
            if old is None or new is None or new["sha256"] != old["sha256"]:
                same_path = old and new and new["path"] == old["path"]
                changes.append(f"{key} {old['path'] if old else ''!r} "
                               + ("other contents" if same_path else f"-> {new['path'] if new else ''!r}"))
        if changes:
            shown = ", ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")
            raise CheckpointError(
                f"{path} was trained with other data or settings ({shown}); start over with --fresh "
                f"(resume=false), use another --out_dir, or resume with the checkpoint's settings")
        step = ckpt["trainer"]["step"]
        if step > self.cfg.max_steps:
            raise CheckpointError(f"{path} is at step {step}, past max_steps={self.cfg.max_steps}; raise max_steps "
                                  f"to continue it, or start over with --fresh (resume=false)")

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT_NAME
        ckpt = load_checkpoint(path)
        if ckpt["stage"] != self.stage:
            raise CheckpointError(f"{path}: is a {ckpt['stage']} checkpoint, cannot resume it as {self.stage} "
                                  f"(use another out_dir or resume=false)")
        t = ckpt["trainer"]
        check_architecture(self.model, ckpt["model"], str(path))
        self._check_resume(ckpt, path)
        # any number of processes, sharded or not, resumes either kind of checkpoint
        if t.get("sharded"):
            parallel.load_sharded(self.out_dir / t["sharded"], self.model, self.optimizer)
        else:
            if "optimizer" not in ckpt:
                raise CheckpointError(f"{path}: has no optimizer state to resume from")
            if self.cfg.fsdp:  # a plain checkpoint holds everything whole: the processes shard it
                parallel.load_whole(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"])
            else:
                load_state_strict(self.model, ckpt["model"], str(path))
                self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.tokens_seen, self.bad_steps = t["step"], t["tokens_seen"], t["bad_steps"]
        self.seconds_before = float(ckpt.get("seconds", 0.0))
        # every rank draws from the same data streams (their positions agree), so a run resumed
        # on another number of processes continues the data exactly; RNGs wrap around
        set_rng_state(ckpt["rng"][self.dist.rank % len(ckpt["rng"])])
        self.task.load_state_dict(ckpt["task"][self.dist.rank % len(ckpt["task"])])
        self.extra.update(ckpt.get("extra", {}))
        self.history = list(ckpt.get("history", []))
        self.resumed_from = self.step
        if self.dist.is_main:
            if self.step < self.cfg.max_steps:
                print(f"{self.stage}: resuming {self.out_dir} from step {self.step} of {self.cfg.max_steps}", flush=True)
            else:
                print(f"{self.stage}: {self.out_dir} is finished (step {self.step} of {self.cfg.max_steps}): nothing "
                      f"to train; raise max_steps to continue it", flush=True)

    # ------------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.history.append(record)
        for logger in self.loggers:
            logger.log(record)

    def describe(self) -> tuple[list[str], list[str]]:
        """(lines, warnings) of the start-of-run block: model, step size, device, data, epochs."""
        cfg, plan = self.cfg, self.plan
        params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        mconf = getattr(self.model, "config", None)
        where = f"{self.device.type} {'fp32' if self.amp_dtype is None else 'bf16 autocast'}"
        if self.device.type == "cpu":
            where += f", {plural(torch.get_num_threads(), 'thread')}"
        elif self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        lines = [f"{params / 1e6:.2f}M parameters" + (f", vocabulary {mconf.vocab_size:,}, context {mconf.block_size:,}"
                                                     if mconf is not None else "") + f"; {where}"]
        warnings: list[str] = []
        if plan is None:
            return lines, warnings
        world = self.dist.world_size
        step = plan.step or (f"micro-batch {plural(cfg.batch_size, 'row')} x "
                             f"{mconf.block_size if mconf is not None else '?':,} tokens")
        lines.append(f"{step}, grad_accum {cfg.grad_accum}" + (f", {world} processes" if world > 1 else "")
                     + (" sharded (fsdp)" if cfg.fsdp else "")
                     + f": {'up to ' if plan.packed else ''}{plan.tokens_per_step:,} tokens per step")
        epochs = cfg.max_steps / max(plan.steps_per_epoch, 1e-9)
        held = f"; {plural(plan.val_size, plan.val_unit)} held out" if plan.val_unit else ""
        lines.append(f"data: {plural(plan.size, plan.unit)}{held}; max_steps {cfg.max_steps:,} = {epochs:.3g} "
                     f"epoch{'' if epochs == 1 else 's'} ({plan.steps_per_epoch:.3g} steps each)")
        lines += plan.notes
        if epochs > MANY_EPOCHS:
            warnings.append(f"{epochs:.0f} epochs over {plural(plan.size, plan.unit)}: the model will memorise them "
                            f"rather than generalise; use more data or fewer steps")
        if plan.val_unit and 0 < plan.val_size < FEW_HELD_OUT:
            warnings.append(f"only {plural(plan.val_size, plan.val_unit)} held out: held-out metrics over so few are "
                            f"mostly noise")
        return lines, warnings

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.task.evaluate(self.model)
        self.model.train()
        self.keep_best(metrics)
        return metrics

    def keep_best(self, metrics: dict[str, float]) -> None:
        """Write best.pt (weights only) and best.json when this evaluation (of the model as it is
        now, at ``self.step``) beats every earlier one; every process calls it. Rank 0 decides,
        by its own evaluation and the best.json it wrote, and every process follows: a sharded
        model is gathered by all of them."""
        select = getattr(self.task, "selection_score", None)
        if select is None:  # a stage that ranks no evaluations
            return
        record = None
        if self.dist.is_main:
            score = select(metrics)
            best = self.best_record()
            if score is not None and math.isfinite(score) and (best is None or score > best["score"]):
                record = {"step": self.step, "score": score}
        record = parallel.from_main(record)
        if record is None:
            return
        weights = parallel.full_model_state(self.model) if self.cfg.fsdp else None
        if self.dist.is_main:
            save_checkpoint(self.out_dir / BEST_NAME, model=self.model, weights=weights, model_kind=self.model_kind,
                            model_config=getattr(self.model, "config"), tokenizer=self.tokenizer, stage=self.stage,
                            config=asdict(self.cfg), extra={**self.extra, "best": record})
            with atomic_write(self.out_dir / BEST_RECORD) as f:
                f.write(json.dumps(record))

    def best_record(self) -> dict[str, Any] | None:
        """{"step", "score"} of best.pt in out_dir, or None before any (read from best.json, so a
        resumed run keeps comparing against the best already on disk)."""
        path = self.out_dir / BEST_RECORD
        return json.loads(path.read_text()) if path.exists() else None

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
            with parallel.no_sync(self.train_model, last):
                with self.autocast():
                    loss, metrics = self.task.loss(self.train_model, batch)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
            tokens += self.task.tokens(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.grad_accum
        return total / cfg.grad_accum, sums, tokens

    def _optimizer_step(self) -> tuple[float, dict[str, float], int] | None:
        """One optimizer step at the scheduled learning rate: (loss, metrics, tokens of every
        process), or None when the loss was not finite and the step was skipped (every rank agrees
        to skip)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, metrics, tokens = self._backward_step()
        loss_value = float(loss)
        if self.dist.world_size > 1:  # one all-reduce: does any rank skip, and every rank's tokens
            totals = torch.tensor([0.0 if math.isfinite(loss_value) else 1.0, tokens], dtype=torch.float64,
                                  device=self.device)
            dist.all_reduce(totals)
            finite, tokens = totals[0].item() == 0, int(totals[1].item())
        else:
            finite = math.isfinite(loss_value)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self._log({"step": self.step, "event": "skipped non-finite loss", "bad_steps": self.bad_steps})
            if self.bad_steps > cfg.max_bad_steps:
                raise TrainingError(
                    f"{self.stage}: {self.bad_steps} non-finite losses (max_bad_steps={cfg.max_bad_steps}); "
                    f"stopped at step {self.step}, last good checkpoint kept in {self.out_dir}")
            return None
        metrics = {"loss": loss_value, "lr": lr, **metrics}
        if cfg.grad_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            metrics["grad_norm"] = float(parallel.full_value(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step += 1
        self.tokens_seen += tokens
        return loss_value, metrics, tokens

    def _start(self) -> None:
        """Open the metric sinks (rank 0) and print what this run is about to train."""
        if not self.dist.is_main:
            return
        self.loggers = open_loggers(self.out_dir, self.history, stage=self.stage, config=asdict(self.cfg),
                                    tensorboard=self.cfg.tensorboard, wandb=self.cfg.wandb) + self.extra_loggers
        lines, warnings = self.describe()
        for line in lines:
            print(f"{self.stage}: {line}", flush=True)
        for line in warnings:
            print(f"{self.stage}: warning: {line}", file=sys.stderr, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to cfg.max_steps (from the resumed step, if any) and return a summary: ``steps``
        and ``seconds_total`` count everything the checkpoint holds, ``steps_this_run`` and
        ``seconds`` this call only."""
        cfg = self.cfg
        self.model.train()
        self._start()
        first_step, first_tokens = self.step, self.tokens_seen
        peak = peak_flops(self.device)
        bar = Progress(cfg.max_steps, self.stage, "step", initial=self.step,
                       enabled=cfg.progress and self.dist.is_main, every=max(cfg.log_interval, cfg.max_steps // 20))
        window: dict[str, float] = {}
        counts: dict[str, int] = {}  # a metric may be missing on some steps: average what was reported
        window_tokens, window_time = 0, 0.0
        bar_keys = ("loss", "tokens_per_s", "mfu", *getattr(self.task, "progress_keys", ()))
        shown: dict[str, str] = {}
        last_eval: dict[str, float] = {}
        start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                done = self._optimizer_step()
                if done is None:
                    continue
                _, step_metrics, tokens = done
                window_tokens += tokens
                window_time += time.perf_counter() - t0
                for k, v in step_metrics.items():
                    if math.isfinite(v):
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    if self.dist.world_size > 1:
                        window, counts = parallel.reduce_windows(window, counts)
                    record = {"step": self.step, "lr": step_metrics["lr"],
                              **{k: v / counts[k] for k, v in window.items() if k != "lr"}}
                    record["tokens_per_s"] = window_tokens / max(window_time, 1e-9)
                    if peak and self.flops_per_token:
                        record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (peak * self.dist.world_size)
                    self._log(record)
                    shown = {k: f"{record[k]:.4g}" for k in bar_keys if k in record}
                    bar.set_postfix(shown | {k: f"{v:.4g}" for k, v in last_eval.items() if k.startswith("val")})
                    window, counts, window_tokens, window_time = {}, {}, 0, 0.0
                if cfg.eval_interval and self.step % cfg.eval_interval == 0 and self.step < cfg.max_steps:
                    last_eval = self.evaluate()
                    self._log({"step": self.step, **{f"eval/{k}": v for k, v in last_eval.items()}})
                if self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                    self.save(time.perf_counter() - start)
                bar.update(1)
            last_eval = self.evaluate()
            # the progress display's last word is the evaluation the checkpoint holds
            bar.set_postfix(shown | {k: f"{v:.4g}" for k, v in last_eval.items() if k.startswith("val")})
            if self.step > first_step:  # a finished run that trained nothing keeps its checkpoint as it is
                self._log({"step": self.step, **{f"eval/{k}": v for k, v in last_eval.items()}})
                self.save(time.perf_counter() - start)
        finally:
            bar.close()
            for logger in self.loggers:
                logger.close()
        seconds = time.perf_counter() - start
        self.seconds_before += seconds  # a save after fit (the reward model's normalisation) keeps the total
        return {"stage": self.stage, "steps": self.step, "steps_this_run": self.step - first_step,
                "tokens": self.tokens_seen, "tokens_this_run": self.tokens_seen - first_tokens,
                "seconds": seconds, "seconds_total": self.seconds_before, "bad_steps": self.bad_steps,
                "resumed_from": self.resumed_from, "eval": last_eval, "out_dir": str(self.out_dir)}
