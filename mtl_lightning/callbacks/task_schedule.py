"""A curriculum over tasks: each task is trained from a start epoch (or step) until an optional stop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch import Callback, LightningModule, Trainer

from mtl_lightning.errors import ConfigError


class TaskSchedule(Callback):
    """Enable and disable tasks at given epochs or steps, e.g. so a task joins training later.

    A task is active while ``start <= t < stop`` (``t`` the current epoch, or global step with ``unit: step``);
    tasks not named in ``start`` start at 0, tasks not named in ``stop`` never stop. A disabled task's head is not
    run, its loss is a zero that the balancer renormalises away, and none of its values are logged (no zeros in the
    curves). Validation uses the tasks active in the current epoch. The schedule is a function of the epoch/step
    only, so every DDP rank activates the same tasks at the same time.

    Args:
        start: ``{task: first epoch/step}``.
        stop: ``{task: first epoch/step at which it is off again}``.
        unit: ``epoch`` or ``step``.
    """

    def __init__(
        self,
        start: Mapping[str, int] | None = None,
        stop: Mapping[str, int] | None = None,
        unit: Literal["epoch", "step"] = "epoch",
    ):
        if unit not in ("epoch", "step"):
            raise ConfigError(f"TaskSchedule: unit must be 'epoch' or 'step', got {unit!r}")
        self.start = dict(start or {})
        self.stop = dict(stop or {})
        for task, begin in self.start.items():
            if task in self.stop and self.stop[task] <= begin:
                raise ConfigError(f"TaskSchedule: task {task!r} stops ({self.stop[task]}) before it starts ({begin})")
        self.unit = unit

    def active(self, names: list[str], t: int) -> list[str]:
        """The tasks of ``names`` active at epoch/step ``t``."""
        return [n for n in names if self.start.get(n, 0) <= t < self.stop.get(n, 1 << 62)]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        names = list(getattr(pl_module, "tasks", {}))
        unknown = sorted((set(self.start) | set(self.stop)) - set(names))
        if unknown:
            raise ConfigError(f"TaskSchedule names unknown task(s) {unknown}; the model's tasks are {names}")

    def _apply(self, trainer: Trainer, pl_module: Any) -> None:
        t = trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        active = self.active(list(pl_module.tasks), t)
        if not active:
            raise ConfigError(f"TaskSchedule: no task is active at {self.unit} {t}; every step needs at least one")
        pl_module.set_active_tasks(active)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.unit == "step":
            self._apply(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer, pl_module)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pl_module.set_active_tasks(None)  # type: ignore[operator]
