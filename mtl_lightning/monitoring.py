"""Fail before training when a callback or scheduler monitors a metric that will never be logged.

Lightning only notices a misspelt ``monitor`` after the first validation epoch; checking the names up front
saves that epoch and names the valid choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from mtl_lightning.errors import ConfigError


def _monitors(trainer: Trainer) -> Iterable[tuple[str, str]]:
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = getattr(cb, "monitor", None)
        if isinstance(cb, (ModelCheckpoint, EarlyStopping)) and monitor:
            yield type(cb).__name__, monitor


def check_monitors(trainer: Trainer, logged: list[str], scheduler_monitor: str | None = None) -> None:
    """Raise ``ConfigError`` naming every monitored metric that is not in ``logged``."""
    wanted = list(_monitors(trainer))
    if scheduler_monitor:
        wanted.append(("lr_scheduler_monitor", scheduler_monitor))
    known = set(logged)
    for owner, name in wanted:
        if name in known:
            continue
        close = difflib.get_close_matches(name, logged, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"{owner} monitors {name!r}, which this model never logs.{hint} Logged names: {sorted(known)}"
        )
