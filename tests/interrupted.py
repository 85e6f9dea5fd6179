"""A training run stopped part of the way, with a checkpoint, as a process that ends there leaves it."""

from __future__ import annotations

from pathlib import Path

from flyer.train.config import TrainConfig
from flyer.train.metrics import MetricsLog
from flyer.train.trainer import Trainer


def stop_after(tc: TrainConfig, steps: int) -> Path:
    """The first ``steps`` steps of the run ``tc`` sets (on its whole schedule: its learning rates, its ramp),
    logged to its metrics.jsonl, then a checkpoint, and the run directory released; the checkpoint's directory."""
    t = Trainer(tc, log=lambda _m: None)
    log = MetricsLog(Path(t.out) / "metrics.jsonl")
    for _ in range(steps):
        log.write(t.train_step())
    log.close()
    path = t.save()
    t.close()
    return path
