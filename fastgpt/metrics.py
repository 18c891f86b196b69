"""Where the trainer's metric records go: ``metrics.jsonl`` always, TensorBoard and wandb on request.

A record is a flat dict with a ``step`` and numbers (``loss``, ``eval/val_loss``, ...) or an
``event``. Every sink takes the same records through :class:`MetricsLogger`; a Python caller can
pass its own to :class:`fastgpt.trainer.Trainer` (``loggers=[...]``). TensorBoard and wandb are
imported only when a run asks for them, so neither is needed otherwise.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Protocol

from .errors import FastGPTError
from .files import atomic_write

METRICS_NAME = "metrics.jsonl"


class MetricsLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """``<out_dir>/metrics.jsonl``, one JSON record per line. It starts as ``history`` (the
    checkpoint's records when resuming, none for a fresh run), so steps replayed after a resume
    are never recorded twice."""

    def __init__(self, out_dir: str | Path, history: Iterable[dict[str, Any]] = ()) -> None:
        self.path = Path(out_dir) / METRICS_NAME
        with atomic_write(self.path) as f:
            for record in history:
                f.write(json.dumps(record) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLogger:
    """Scalars under ``<out_dir>/tensorboard`` (``tensorboard --logdir <out_dir>``)."""

    def __init__(self, out_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FastGPTError("tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (project ``$WANDB_PROJECT``, default "fastgpt") named after the stage
    and run folder; a resumed run continues the same wandb run."""

    def __init__(self, out_dir: str | Path, stage: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise FastGPTError("wandb=true needs the wandb package (pip install wandb)") from None
        id_file = Path(out_dir) / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastgpt"), name=f"{stage} {out_dir}",
                              id=run_id, resume="allow", dir=str(out_dir), config=config)
        with atomic_write(id_file) as f:
            f.write(run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_loggers(out_dir: str | Path, history: list[dict[str, Any]], *, stage: str, config: dict[str, Any],
                 tensorboard: bool = False, wandb: bool = False) -> list[MetricsLogger]:
    """The sinks a run asked for, metrics.jsonl first."""
    loggers: list[MetricsLogger] = [JsonlLogger(out_dir, history)]
    if tensorboard:
        loggers.append(TensorBoardLogger(out_dir))
    if wandb:
        loggers.append(WandbLogger(out_dir, stage, config))
    return loggers
