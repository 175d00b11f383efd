"""When a training step's ``train/...`` values are logged: the one policy, an explicit option of the module.

Lightning writes on-step values to the loggers only on the steps where it updates the logs (every
``trainer.log_every_n_steps`` optimizer steps, and when stopping) or under ``fast_dev_run``. On the other steps
``self.log`` only refreshes ``trainer.callback_metrics``, yet it costs about 0.3 ms of host time per name on 2 CPU
cores (Lightning wraps, moves and caches every value): the largest part of the per-step overhead of small models
(docs/benchmarks.md). So by default the step values are logged on those steps only, plus the last batch of each
epoch (epoch-end callbacks and ``trainer.callback_metrics`` after ``fit`` see the epoch's last step). The loggers
receive exactly what they would receive if every step were logged.

A callback that reads a ``train/`` value between those steps (a checkpoint or early stopping that monitors one, a
filename that formats one, an LR scheduler monitor) needs every step: ``log_train_steps: every`` says so;
``auto`` (the default) turns it on when such a setting is found on the trainer's callbacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from mtl_lightning import compat

TrainStepLogging = Literal["auto", "logger", "every"]
"""``logger``: the steps the loggers write (and each epoch's last); ``every``: every step; ``auto``: ``every`` when
a callback or the scheduler monitor reads a ``train/`` name, else ``logger``."""


def reads_train_values(callbacks: Iterable[Any], scheduler_monitor: str | None) -> bool:
    """Whether a callback's ``monitor``/``filename`` or the scheduler's monitor names a ``train/`` value."""
    reads = [getattr(cb, attr, None) for cb in callbacks for attr in ("monitor", "filename")]
    return any(isinstance(r, str) and "train/" in r for r in [*reads, scheduler_monitor])


def every_step(mode: TrainStepLogging, trainer: Trainer, scheduler_monitor: str | None) -> bool:
    """Resolve ``mode`` for a run (called once in ``setup``)."""
    if mode == "auto":
        return reads_train_values(trainer.callbacks, scheduler_monitor)  # type: ignore[attr-defined]
    return mode == "every"


def log_this_step(trainer: Trainer | None, every: bool) -> bool:
    """Whether this training step's values can reach a logger or a callback. The same on every rank, so the
    cross-rank reduce of the logged values stays collective."""
    if trainer is None or every:
        return True
    # fast_dev_run: set on the Trainer by Lightning's debugging-flags connector, which its type does not declare.
    if compat.should_update_logs(trainer) or trainer.fast_dev_run:  # type: ignore[attr-defined]
        return True
    return bool(getattr(trainer, "is_last_batch", True))


def train_step_values(
    strategy: Strategy,
    loss: Tensor,
    means: Tensor,
    weights: Tensor,
    encoder_logs: Mapping[str, Tensor],
    balancer_logs: Mapping[str, Tensor],
    tasks: Sequence[str],
    active: Sequence[str],
) -> dict[str, Tensor]:
    """A training step's logged values, averaged over ranks in one collective: ``train/loss``, per active task
    ``train/{task}/loss`` and ``train/balance/weight/{task}``, ``train/encoder/{key}``, ``train/balance/{key}``.

    One stacked tensor and one (possible) cross-rank reduction instead of one per logged name. A disabled task logs
    nothing rather than zeros; balancer telemetry names tasks as path segments (``grad_norm/<task>``,
    ``cosine/<a>/<b>``), so the entries of disabled tasks are dropped too.
    """
    extras = [v.detach().float().reshape(1) for v in encoder_logs.values()]
    stacked = torch.cat([loss.detach()[None], means.detach(), weights.detach(), *extras])
    values = strategy.reduce(stacked, reduce_op="mean")  # by keyword: the second positional is the process group
    logs = {"train/loss": values[0]}
    n = len(tasks)
    for i, name in enumerate(tasks):
        if name in active:
            logs[f"train/{name}/loss"] = values[1 + i]
            logs[f"train/balance/weight/{name}"] = values[1 + n + i]
    for j, key in enumerate(encoder_logs):
        logs[f"train/encoder/{key}"] = values[1 + 2 * n + j]
    off = set(tasks) - set(active)
    logs.update({f"train/balance/{k}": v for k, v in balancer_logs.items() if not off & set(k.split("/"))})
    return logs
