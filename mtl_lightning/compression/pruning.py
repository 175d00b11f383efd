"""Pruning during training: Lightning's ModelPruning on chosen layers, with a sparsity schedule over epochs.

``--trainer.callbacks+ configs/callbacks/prune.yaml`` (L1 unstructured, 50 % of every Linear/Conv weight of the
encoder and heads) or ``prune_structured.yaml`` (whole rows of the encoder's Linear weights). To prune a trained
model, fine-tune it with the callback: ``--model.init_args.init_from best.ckpt``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mtl_lightning.compat import pruning_is_global, pruning_parameter_names, pruning_targets, set_pruning_targets
from mtl_lightning.compression.report import SparsityRow, sparsity_report, sparsity_table
from mtl_lightning.compression.selection import DEFAULT_PATTERNS, select_layers
from mtl_lightning.errors import ConfigError

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}


class ScheduledPruning(ModelPruning):
    """Prune the weights of the layers matching ``modules`` up to ``amount`` by epoch ``end_epoch``.

    Why a subclass of ModelPruning: its ``parameters_to_prune`` takes ``(module, "weight")`` pairs, objects that a
    YAML file cannot name before the model exists, and left empty it prunes every parameter of the LightningModule
    (norm layers and balancer parameters too). This class picks the layers by name pattern and type when the trainer
    sets up. And ``torch.nn.utils.prune`` prunes a fraction of the weights *still unpruned* on each call, so a
    schedule of total sparsities needs per-epoch amounts worked out from the masks; this class does that too.

    Pruning happens at the start of each training epoch from ``start_epoch`` to ``end_epoch``, so that epoch's
    training adapts the remaining weights and its validation (and the checkpoint chosen on it) sees the pruned
    model. The sparsity reached after epoch ``e``'s pruning is ``amount * f(k / n)`` with ``k = e - start_epoch + 1``
    of ``n = end_epoch - start_epoch + 1`` steps, ``f(p) = p`` (linear) or ``1 - (1 - p)^3`` (cubic: large steps
    first, small ones near the end; Zhu & Gupta 2017). Checkpoints hold the masked weights as plain ``weight``
    tensors (``make_pruning_permanent``), so they load into a model without this callback. Checkpoints saved before
    ``end_epoch`` are less sparse, and the one ModelCheckpoint picks on ``val/loss`` may predate the pruning; so the
    final weights are also written as ``checkpoints/pruned.ckpt`` (``final_checkpoint``).

    Args:
        pruning_fn: ``l1_unstructured`` (single weights of smallest magnitude), ``ln_structured`` (whole slices along
            ``pruning_dim`` of smallest ``pruning_norm``), ``random_unstructured`` or ``random_structured``.
        amount: The final fraction pruned in each layer (of weights, or of slices for structured methods); with
            ``use_global_unstructured``, of all selected weights together.
        start_epoch: First epoch whose start prunes.
        end_epoch: Epoch at whose start ``amount`` is reached; negative counts from the end of training (``-1`` is
            the last epoch, ``-4`` leaves three epochs of fine-tuning at full sparsity).
        schedule: ``linear`` or ``cubic``.
        modules: Shell-style patterns of module names to prune (``encoder.*``, ``heads.purchase.*``).
        layer_types: Types of layers pruned among the matching modules (names of ``torch.nn`` classes).
        parameter_names: Parameters pruned in each layer (``weight``, ``bias``).
        use_global_unstructured: One magnitude threshold across all selected layers instead of one per layer.
        pruning_dim: For structured methods: 0 prunes output rows (neurons, conv output channels).
        pruning_norm: For ``ln_structured``: the norm (1, 2, ...) ranking the slices.
        make_pruning_permanent: Remove the masks at the end of training and store plain weights in checkpoints.
        log_sparsity: Log ``prune/sparsity/<module>`` and ``prune/sparsity/total`` each epoch and print a table at
            the end of training.
        final_checkpoint: File name, in the checkpoint folder, of the weights at the end of training (at full
            sparsity); None: not written.
    """

    def __init__(
        self,
        pruning_fn: Literal["l1_unstructured", "ln_structured", "random_unstructured", "random_structured"] = (
            "l1_unstructured"
        ),
        amount: float = 0.5,
        start_epoch: int = 0,
        end_epoch: int = -1,
        schedule: Literal["linear", "cubic"] = "cubic",
        modules: Sequence[str] = DEFAULT_PATTERNS,
        layer_types: Sequence[str] = ("Linear", "Conv1d", "Conv2d", "Conv3d"),
        parameter_names: Sequence[str] = ("weight",),
        use_global_unstructured: bool = False,
        pruning_dim: int | None = None,
        pruning_norm: int | None = None,
        make_pruning_permanent: bool = True,
        log_sparsity: bool = True,
        final_checkpoint: str | None = "pruned.ckpt",
    ):
        if not 0.0 <= amount < 1.0:
            raise ConfigError(f"ScheduledPruning: amount is the final pruned fraction, in [0, 1); got {amount}")
        if start_epoch < 0:
            raise ConfigError(f"ScheduledPruning: start_epoch must be >= 0, got {start_epoch}")
        if schedule not in ("linear", "cubic"):
            raise ConfigError(f"ScheduledPruning: schedule must be 'linear' or 'cubic', got {schedule!r}")
        unknown = [t for t in layer_types if t not in LAYER_TYPES]
        if unknown or not layer_types:
            raise ConfigError(f"ScheduledPruning: layer_types {list(layer_types)} must be among {list(LAYER_TYPES)}")
        try:
            super().__init__(
                pruning_fn=pruning_fn,
                parameter_names=list(parameter_names),
                use_global_unstructured=use_global_unstructured,
                amount=amount,
                make_pruning_permanent=make_pruning_permanent,
                # The lottery-ticket reset would rewind the kept weights to their initial values at every step.
                use_lottery_ticket_hypothesis=False,
                pruning_dim=pruning_dim,
                pruning_norm=pruning_norm,
            )
        except MisconfigurationException as err:  # one ConfigError line instead of Lightning's exception
            raise ConfigError(f"ScheduledPruning: {err}") from None
        self.final_amount = float(amount)
        self.start_epoch = int(start_epoch)
        self.end_epoch = int(end_epoch)
        self.schedule = schedule
        self.module_patterns = list(modules)
        self.layer_types = tuple(LAYER_TYPES[t] for t in layer_types)
        self.structured_dim = pruning_dim if pruning_fn.endswith("_structured") else None
        self.log_sparsity = log_sparsity
        self.final_checkpoint = final_checkpoint
        self.layer_names: list[str] = []  # the pruned layers, found at set-up

    # -------------------------------------------------------------------------------------------- schedule
    def resolved_end_epoch(self, max_epochs: int | None) -> int:
        """``end_epoch`` as an epoch index (negative values count back from ``max_epochs``), not before the start."""
        end = self.end_epoch
        if end < 0:
            if max_epochs is None or max_epochs < 0:
                raise ConfigError(
                    f"ScheduledPruning: end_epoch={end} counts from the end of training, which needs "
                    "trainer.max_epochs; set max_epochs or give end_epoch as an epoch number"
                )
            end = max_epochs + end
        return max(end, self.start_epoch)

    def target_sparsity(self, epoch: int, max_epochs: int | None) -> float:
        """The sparsity the schedule asks for after epoch ``epoch``'s pruning."""
        if epoch < self.start_epoch:
            return 0.0
        end = self.resolved_end_epoch(max_epochs)
        progress = min(1.0, (epoch - self.start_epoch + 1) / (end - self.start_epoch + 1))
        shape = progress if self.schedule == "linear" else 1.0 - (1.0 - progress) ** 3
        return self.final_amount * shape

    # ----------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        layers = select_layers(pl_module, self.module_patterns, self.layer_types, "ScheduledPruning modules")
        self.layer_names = list(layers)
        names = pruning_parameter_names(self)
        set_pruning_targets(self, [(m, p) for m in layers.values() for p in names if getattr(m, p, None) is not None])
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= self.start_epoch:
            rank_zero_warn(
                f"ScheduledPruning starts at epoch {self.start_epoch} but training stops after "
                f"{trainer.max_epochs} epoch(s): nothing will be pruned"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.prune_to(self.target_sparsity(trainer.current_epoch, trainer.max_epochs))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Pruning happens at epoch start (see the class docstring); ModelPruning would prune here.
        if self.log_sparsity:
            rows = self.report(pl_module)
            logs = {f"prune/sparsity/{r.module}": r.sparsity for r in rows}
            pl_module.log_dict(logs, on_step=False, on_epoch=True, batch_size=1)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pass  # ModelPruning may prune here (prune_on_train_epoch_end=False); this class prunes at epoch start only

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            return
        saved = self._save_final(trainer)
        if self.log_sparsity:
            where = f"\nfinal pruned weights: {saved}" if saved else ""
            rank_zero_info("Pruned layers (ScheduledPruning):\n" + sparsity_table(self.report(pl_module)) + where)

    def _save_final(self, trainer: Trainer) -> str | None:
        """Write the final weights as ``<checkpoint dir>/<final_checkpoint>``; the path, or None when not saved.

        ModelCheckpoint keeps the epochs with the best ``val/loss``, and Lightning 2.6 refreshes ``last.ckpt`` only
        when it saves such a checkpoint, so neither need hold the model at its final sparsity: pruning usually
        raises the validation loss for a while.
        """
        # Lightning's Checkpoint base class declares no dirpath; ModelCheckpoint has one.
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not self.final_checkpoint or not dirpath:
            return None
        path = os.path.join(dirpath, self.final_checkpoint)
        trainer.save_checkpoint(path)  # a collective: every rank calls it, rank 0 writes
        return path

    # ------------------------------------------------------------------------------------------- pruning
    def report(self, pl_module: LightningModule) -> list[SparsityRow]:
        """:func:`sparsity_report` rows of the pruned layers only, and their total."""
        return sparsity_report(pl_module, names=set(self.layer_names))

    def _units(self, module: nn.Module, name: str) -> tuple[int, int]:
        """(pruned, total) units of one parameter: single weights, or slices along the structured dimension."""
        mask = getattr(module, f"{name}_mask", None)
        # torch.nn.utils.prune always adds `<name>_orig` together with `<name>_mask`.
        param = getattr(module, f"{name}_orig") if mask is not None else getattr(module, name)
        if self.structured_dim is None:
            total = param.numel()
            return (int((mask == 0).sum()) if mask is not None else 0), total
        total = param.shape[self.structured_dim]
        if mask is None:
            return 0, total
        slices = mask.transpose(0, self.structured_dim).reshape(total, -1)
        return int((slices == 0).all(dim=1).sum()), total

    def prune_to(self, target: float) -> None:
        """Prune each selected parameter (or all together, when global) until ``target`` of it is pruned.

        Amounts are passed to ``torch.nn.utils.prune`` as integer counts of the still-unpruned units, which is
        exact (a fraction would be applied to the remaining units and rounded there).
        """
        targets = pruning_targets(self)
        if target <= 0.0 or not targets:
            return
        if pruning_is_global(self):
            counts = [self._units(m, n) for m, n in targets]
            pruned, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
            extra = round(target * total) - pruned
            if extra > 0:
                self.apply_pruning(extra)
            return
        for module, name in targets:
            pruned, total = self._units(module, name)
            extra = round(target * total) - pruned
            if extra > 0:
                self.pruning_fn(module, name=name, amount=extra)  # type: ignore[call-arg]
