"""Callbacks that multi-process CLI tests pass with ``--trainer.callbacks+`` (``tests/`` on ``PYTHONPATH``).

Not collected by pytest (no ``test_`` prefix). A subprocess cannot hand objects back to the test, so each rank
writes what the test compares: its ``trainer.callback_metrics`` and, from rank 0, the full (gathered) weights.
"""

from __future__ import annotations

import json
import os
import signal
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


class KillAfterStep(Callback):
    """``kill -9`` of this process (every rank kills itself) right after training step ``step``: whatever the
    checkpoints before it wrote is all a resume has."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: object, **kwargs: object) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAfterStep(Callback):
    """Stop the run with an exception right after training step ``step`` (an in-process stand-in for a kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: object, **kwargs: object) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"interrupted after step {trainer.global_step}")


class WorsenFromEpoch(Callback):
    """From epoch ``epoch`` on, add noise to every weight before validation, so that the validation loss gets worse
    than its best and a monitored checkpoint stops improving."""

    def __init__(self, epoch: int, scale: float = 1.0):
        self.epoch, self.scale = epoch, scale

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch >= self.epoch and not trainer.sanity_checking:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(torch.randn_like(p) * self.scale)
