"""Weight averaging, SWA and EMA: validation, test and every checkpoint see the averaged model.

Both callbacks are Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (torch's ``AveragedModel``):
after an update the averaged weights are swapped in for each validation, written as the checkpoint's
``state_dict`` (the raw weights go to ``current_model_state``, which a resume with the same callback continues
from), and copied into the model when training ends. So ``best.ckpt`` is chosen on the averaged model's
``val/loss`` and ``MultiTaskModule.load_from_checkpoint`` gives the average. What they add for this project:

- **BatchNorm statistics are recomputed** for the averaged weights, from the data module's training batches
  (``{"inputs": x, ...}`` dicts, which ``torch.optim.swa_utils.update_bn`` cannot read), before a validation, a
  checkpoint or the end of training that follows an update. Only the BatchNorm layers run in training mode (no
  dropout, no random draw), the training loader and the random state are left alone, and under DDP the ranks'
  statistics are averaged. A model without BatchNorm pays nothing.
- **Only the parameters are averaged.** The buffers follow the raw model: averaging integer counters and masks
  (a balancer's step count, ``num_batches_tracked``) would give meaningless values. Stateful balancers that hold
  *parameters* (uncertainty weighting's log-variances, GradNorm's task weights) are averaged like the rest; only
  training reads them, so the exported model is unaffected, and training continues from the raw values.
- **Before the first update the raw model is validated and checkpointed**, not the untrained copy the average
  starts from, and a run that never updates (stopped before ``start_epoch``) keeps its trained weights.
- The average lives on the model's device (Lightning builds it before the model is moved there).

Sharded strategies (FSDP, ModelParallel, DeepSpeed) are refused: the average is a full copy of the model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch.optim.swa_utils import get_ema_multi_avg_fn

from mtl_lightning import compat
from mtl_lightning.errors import ConfigError

# What Lightning's WeightAveraging.setup warns for every model that overrides configure_model (MultiTaskModule
# does, to shard and compile): off sharded strategies, which are refused here, calling it early is harmless.
_CONFIGURE_MODEL_WARNING = ".*WeightAveraging callback with a model that overrides the configure_model.*"


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    prepare: Callable[[Any], Any] = lambda inputs: inputs,
    context: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> int:
    """Recompute the running statistics of ``model``'s BatchNorm layers over ``batches``; returns how many were read.

    Like ``torch.optim.swa_utils.update_bn`` (statistics reset, then the equal-weight average over the batches), but
    a batch may be a ``{"inputs": ...}`` dict, and only the BatchNorm layers are in training mode: dropout stays off,
    so the statistics are those of the activations seen at inference, and no random number is drawn.
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches
        norm.train()
    seen = 0
    try:
        for batch in batches:
            inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
            with context():
                model(prepare(inputs))
            seen += 1
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError("recomputing the BatchNorm statistics of the averaged model: the training data gave no batch")
    return seen


@contextmanager
def _factories_left_out(module: nn.Module) -> Iterator[None]:
    """Set the module's own callable attributes (its optimizer and LR scheduler factories) to None meanwhile.

    The averaged copy never builds an optimizer, and the factories the CLI makes hold the CLI itself (through
    jsonargparse's instantiators): a deep copy of the module would copy the CLI, its data module and, on a resume,
    the run's file lock, which cannot be copied at all.
    """
    names = [k for k, v in vars(module).items() if callable(v) and not isinstance(v, (nn.Module, torch.Tensor))]
    saved = {k: vars(module)[k] for k in names}
    for name in names:
        vars(module)[name] = None
    try:
        yield
    finally:
        vars(module).update(saved)


def _structure(module: nn.Module) -> tuple[int, int]:
    return sum(1 for _ in module.parameters()), sum(1 for _ in module.buffers())


class _AveragingForMultiTask(WeightAveraging):
    """Lightning's WeightAveraging with this project's fixes (see the module docstring); subclasses say when."""

    def __init__(self, device: str | None, bn_batches: int | None, **kwargs: Any):
        if bn_batches is not None and int(bn_batches) < 1:
            raise ConfigError(f"{type(self).__name__}: bn_batches must be >= 1 or null (a full pass), got {bn_batches}")
        super().__init__(device=device, use_buffers=False, **kwargs)
        self.device_given = device is not None
        self.bn_batches = None if bn_batches is None else int(bn_batches)
        self._bn_stale = False  # an update since the BatchNorm statistics were last recomputed
        self._swapped = False
        self._fit_trainer: Trainer | None = None
        self._shape: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------ when to update
    def due(self, trainer: Trainer, step_idx: int) -> bool:
        """Whether the average takes in the weights after optimizer step ``step_idx`` (0-based)."""
        raise NotImplementedError

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # Lightning updates exactly when this returns True (after its own once-per-step guard). Updates are per step
        # only: an epoch-end update would come after that epoch's validation.
        if step_idx is None or self._fit_trainer is None or not self.due(self._fit_trainer, step_idx):
            return False
        self._bn_stale = True
        return True

    @property
    def has_average(self) -> bool:
        """Whether the average has taken in any weights (before that it is the untrained copy it started as).

        Read from the average's own count, which a checkpoint restores; one host sync, at validation or saving.
        """
        average = compat.averaged_model(self)
        return average is not None and int(average.n_averaged) > 0

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
            raise ConfigError(
                f"{type(self).__name__} keeps a full copy of the model and cannot follow a sharded one "
                f"({type(trainer.strategy).__name__}); use DDP or one device, or remove the callback"
            )
        self._fit_trainer = trainer
        with warnings.catch_warnings(), _factories_left_out(pl_module):
            warnings.filterwarnings("ignore", message=_CONFIGURE_MODEL_WARNING)
            super().setup(trainer, pl_module, stage)  # the average: a deep copy of the module
        self._shape = _structure(pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        average = compat.averaged_model(self)
        if average is not None and not self.device_given:
            average.to(pl_module.device)  # built in setup, before the strategy moved the model to its device

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._shape is not None and _structure(pl_module) != self._shape:
            # The average is matched to the model tensor by tensor, in order: a re-parametrisation (pruning adds a
            # mask buffer per layer) would pair unrelated tensors.
            raise ConfigError(
                f"{type(self).__name__}: the model's parameters or buffers changed during training (pruning?); "
                "weight averaging cannot follow them: use one of the two callbacks, or prune the averaged "
                "checkpoint afterwards (--model.init_args.init_from)"
            )
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # ------------------------------------------------------------------------------- BatchNorm statistics
    def refresh_batchnorm(self, trainer: Trainer) -> None:
        """Recompute the averaged model's BatchNorm statistics if an update came since they were last computed."""
        average = compat.averaged_model(self)
        if average is None or not self._bn_stale:
            return
        self._bn_stale = False
        model = average.module
        norms = batch_norms(model)
        if not norms:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise ConfigError(
                f"{type(self).__name__} recomputes BatchNorm statistics from the data module's train_dataloader(): "
                "fit with a LightningDataModule (as `mtl fit` does), or use a model without BatchNorm"
            )
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        precision = trainer.precision_plugin
        # A loader of its own (the training loader's position is part of an exact resume), and the random state
        # kept: the run draws what it would without this callback.
        loader = datamodule.train_dataloader()
        batches = loader if self.bn_batches is None else itertools.islice(loader, self.bn_batches)
        with isolate_rng():
            recompute_batchnorm(
                model,
                batches,
                prepare=lambda inputs: precision.convert_input(move_data_to_device(inputs, device)),
                context=precision.forward_context,
            )
        if trainer.world_size > 1:  # each rank saw its shard: average the statistics, as one pass over all would
            for norm in norms:
                for name in ("running_mean", "running_var"):
                    stat = getattr(norm, name)
                    stat.copy_(trainer.strategy.reduce(stat.clone(), reduce_op="mean"))

    # ------------------------------------------------------------------------------ validation and the end
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.has_average:
            return  # nothing averaged yet: validate the model as it is
        self.refresh_batchnorm(trainer)
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = True

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._swapped:
            self._swapped = False
            super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if compat.averaged_model(self) is None:
            return
        if not self.has_average:
            rank_zero_warn(
                f"{type(self).__name__} never updated its average (training ended before it started): the model "
                "keeps its trained weights"
            )
            return
        self.refresh_batchnorm(trainer)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._bn_stale = False  # a checkpoint is written with fresh statistics (on_save_checkpoint)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        average = compat.averaged_model(self)
        if average is None:
            return  # outside fit: the model's weights are what there is to save
        if not self.has_average:
            # The raw weights are the model, and resuming restores an average that has not started.
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            checkpoint["averaging_state"] = {"n_averaged": average.n_averaged.detach().clone()}
            return
        self.refresh_batchnorm(trainer)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit (validate, test, predict) the checkpoint's state_dict already is the average: nothing to do,
        # and nothing to warn about.
        if compat.averaged_model(self) is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class SWAWeightAveraging(_AveragingForMultiTask):
    """Stochastic weight averaging (Izmailov et al., 2018): the equal average of the weights at the end of each
    epoch from ``start_epoch`` on, updated before that epoch's validation.

    Args:
        start_epoch: The first epoch (0-based) whose final weights enter the average; negative: counted from
            ``trainer.max_epochs`` (``-4``: the last four epochs). Until then the raw model is validated and saved.
        bn_batches: Training batches the BatchNorm statistics are recomputed over (``None``: one full pass).
        device: Where the average is kept (``None``: the model's device; ``"cpu"`` saves accelerator memory).
    """

    def __init__(self, start_epoch: int = -4, bn_batches: int | None = None, device: str | None = None):
        super().__init__(device=device, bn_batches=bn_batches)
        self.start_epoch = int(start_epoch)
        self._first_epoch = max(self.start_epoch, 0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.start_epoch >= 0:
            return
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            raise ConfigError(
                f"SWAWeightAveraging: start_epoch {self.start_epoch} counts from trainer.max_epochs, which is not set; "
                "give start_epoch as an epoch number (>= 0) or set trainer.max_epochs"
            )
        self._first_epoch = max(max_epochs + self.start_epoch, 0)

    def due(self, trainer: Trainer, step_idx: int) -> bool:
        # The last optimizer step of an epoch (Lightning steps on an epoch's last batch even when accumulating).
        return trainer.is_last_batch and trainer.current_epoch >= self._first_epoch


class EMAWeightAveraging(_AveragingForMultiTask):
    """An exponential moving average of the weights: ``avg = decay * avg + (1 - decay) * w`` after each update,
    the first update copying ``w`` (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``).

    Args:
        decay: Weight of the old average; ``1 / (1 - decay)`` updates is roughly the window it averages over.
        update_every_n_steps: Update after optimizer steps whose 0-based index is a multiple of this.
        update_starting_at_step: First optimizer step (0-based) that updates (``None``: from the first).
        update_starting_at_epoch: First epoch whose steps update (``None``: from the first). Unlike Lightning's
            ``EMAWeightAveraging``, steps before it do not update, and no extra update comes at the epoch's end.
        bn_batches: Training batches the BatchNorm statistics are recomputed over (``None``: one full pass).
        device: Where the average is kept (``None``: the model's device; ``"cpu"`` saves accelerator memory).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        bn_batches: int | None = None,
        device: str | None = None,
    ):
        if not 0.0 < float(decay) < 1.0:
            raise ConfigError(f"EMAWeightAveraging: decay must be in (0, 1), e.g. 0.999, got {decay}")
        if int(update_every_n_steps) < 1:
            raise ConfigError(f"EMAWeightAveraging: update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(device=device, bn_batches=bn_batches, multi_avg_fn=get_ema_multi_avg_fn(float(decay)))
        self.decay = float(decay)
        self.update_every_n_steps = int(update_every_n_steps)
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch

    def due(self, trainer: Trainer, step_idx: int) -> bool:
        if self.update_starting_at_step is not None and step_idx < self.update_starting_at_step:
            return False
        if self.update_starting_at_epoch is not None and trainer.current_epoch < self.update_starting_at_epoch:
            return False
        return step_idx % self.update_every_n_steps == 0


__all__ = ["EMAWeightAveraging", "SWAWeightAveraging", "batch_norms", "recompute_batchnorm"]
