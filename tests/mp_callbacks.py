"""Callbacks that multi-process CLI tests pass with ``--trainer.callbacks+`` (``tests/`` on ``PYTHONPATH``).

Not collected by pytest (no ``test_`` prefix). A subprocess cannot hand objects back to the test, so each rank
writes what the test compares: its ``trainer.callback_metrics`` and, from rank 0, the full (gathered) weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _full(value: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors sharded over the ranks; full_tensor() all-gathers them (every rank calls it).
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class DumpRun(Callback):
    """At the end of ``fit``: ``<out>/rank<r>.json`` (logged values and step counts of rank r) and
    ``<out>/weights.pt`` (the full state dict, from rank 0)."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        info = {"metrics": metrics, "global_step": trainer.global_step, "epoch": trainer.current_epoch}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info, sort_keys=True))
        state = {k: _full(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save(state, self.out / "weights.pt")


class ExitAtEpoch(Callback):
    """Kill every rank (``os._exit``, no clean-up, like a pre-empted job) when epoch ``epoch`` starts, i.e. after the
    checkpoints of the epochs before it were written."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os._exit(17)
