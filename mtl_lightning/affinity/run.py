"""The measuring run of ``mtl affinity``: its trainer gets exactly one :class:`~mtl_lightning.callbacks.TaskAffinity`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint

from mtl_lightning.callbacks.task_affinity import TaskAffinity
from mtl_lightning.errors import ConfigError

DEFAULT_EVERY_N_STEPS = 10


def attach_affinity(trainer: Trainer, every_n_steps: int | None = None, lr: float | None = None) -> TaskAffinity:
    """The trainer's TaskAffinity callback, added when the config has none; given settings replace the config's.

    A new one goes before the checkpoint callbacks, where Lightning keeps callbacks that checkpoints should see the
    state of (``trainer.callbacks`` is the list the hooks run over, so a callback added before ``fit`` takes part).
    """
    callbacks: list[Any] = getattr(trainer, "callbacks")  # noqa: B009 (a property mypy cannot see)
    found = [i for i, c in enumerate(callbacks) if isinstance(c, TaskAffinity)]
    if len(found) > 1:
        raise ConfigError(f"the config has {len(found)} TaskAffinity callbacks; keep one")
    if found:
        old = callbacks[found[0]]
        assert isinstance(old, TaskAffinity)
        if every_n_steps is None and lr is None:
            return old
        new = TaskAffinity(
            every_n_steps=old.every_n_steps if every_n_steps is None else every_n_steps,
            lr=old.lr if lr is None else lr,
            cell=old.cell,
        )
        callbacks[found[0]] = new
        return new
    new = TaskAffinity(every_n_steps=DEFAULT_EVERY_N_STEPS if every_n_steps is None else every_n_steps, lr=lr)
    at = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
    callbacks.insert(at, new)
    return new
