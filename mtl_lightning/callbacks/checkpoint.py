"""``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state of the run.

Lightning 2.6's ModelCheckpoint with a ``monitor`` and ``save_last=True`` rewrites ``last.ckpt`` only when it also
saves a top-k checkpoint, i.e. when the monitored value improved. A run whose validation loss stopped improving then
ends with an old ``last.ckpt``, and ``--ckpt_path last`` silently restarts from it, redoing epochs. Here ``last`` is
also written after every validation (or train epoch end, where Lightning saves there) and every
``every_n_train_steps`` / ``train_time_interval`` save point, whatever the monitored metric did.

The CLI turns every plain Lightning ``ModelCheckpoint`` of a run into this class (it adds no arguments), so configs
that name Lightning's class get the fix too.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from mtl_lightning import compat


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` written at every save point (see module)."""

    _saved_last_in_hook = False

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        self._saved_last_in_hook = True
        super()._save_last_checkpoint(trainer, monitor_candidates)

    def _ensure_last(self, trainer: Trainer, due: bool) -> None:
        """Write ``last`` now if this hook is a save point and Lightning's own hook did not write it."""
        if not (self.save_last and due) or self._saved_last_in_hook:
            return
        # Lightning's own skip rule without its "already saved at this step": a validation after a step's save
        # changes the state (validation done, epoch over), so last must follow it.
        if getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        compat.save_last_checkpoint(self, trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._saved_last_in_hook = False
        step_before = compat.last_time_checked(self)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        n = compat.every_n_train_steps(self)
        by_steps = n >= 1 and trainer.global_step % n == 0
        # train_time_interval: Lightning moved its "last time checked" clock when the interval elapsed.
        by_time = compat.last_time_checked(self) != step_before
        self._ensure_last(trainer, by_steps or by_time)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._saved_last_in_hook = False
        super().on_train_epoch_end(trainer, pl_module)
        self._ensure_last(trainer, compat.saves_on_train_epoch_end(self, trainer))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._saved_last_in_hook = False
        super().on_validation_end(trainer, pl_module)
        self._ensure_last(trainer, not compat.saves_on_train_epoch_end(self, trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning 2.6's on_train_end writes last.ckpt without its own skip rule, so a fast_dev_run (which saves no
        # checkpoint anywhere else) left checkpoints/last.ckpt in the working directory.
        if getattr(trainer, "fast_dev_run", False):
            return
        super().on_train_end(trainer, pl_module)
