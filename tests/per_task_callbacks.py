"""Callbacks for the multi-process per-task data test (``tests/`` on ``PYTHONPATH``, passed with
``--trainer.callbacks+``). Not collected by pytest (no ``test_`` prefix).

A subprocess cannot hand objects back to the test, so each rank writes ``<out>/rank<r>.json``: per training step the
tasks of its batch and a fingerprint of each row (its first input value, unique for generated Gaussian inputs), the
tasks of its validation batches, and the metric names and values it ended with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class RecordBatches(Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.train: list[dict[str, Any]] = []
        self.val: list[list[str]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.train.append(
            {
                "epoch": trainer.current_epoch,
                "tasks": sorted(batch["targets"]),
                "rows": batch["inputs"][:, 0].tolist(),
            }
        )

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self.val.append(sorted(batch["targets"]))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        info = {
            "train": self.train,
            "val": self.val,
            "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()},
            "global_step": trainer.global_step,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
