"""Metric writers: ``metrics.jsonl`` always, TensorBoard when enabled; process 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter  # here, not at the top: it imports torch where installed (~2 s)

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{split}/{k}" if split != "train" else k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
