"""Checkpoint and seed ensembles: several trained multi-task models evaluated, predicted and exported as one.

    mtl test --config configs/quickstart.yaml --model mtl_lightning.ensemble.MultiTaskEnsemble \\
        --model.checkpoints '[seed0/best.ckpt,seed1/best.ckpt,seed2/best.ckpt]'

(``mtl validate`` and ``mtl predict`` alike, with the config the members were trained with: its data and trainer
are used, its model section is replaced. No ``--ckpt_path``: the members are the model's own weights.) The
members must have the same tasks (names, kinds, numbers of outputs) and read the same inputs; their encoders and
heads may differ. Averaging is in prediction space, per task as its kind says
(:meth:`~mtl_lightning.kinds.TaskKind.average_outputs`): the mean of the probabilities for classification, of the
values for regression, of the expected counts for count tasks. The ensemble's raw output is the one whose
predictions are that mean (the logit of the mean probability, the log of the mean softmax, ...), so its losses,
metrics and ``mtl predict`` output are exactly those of the averaged predictions, logged under a single model's
names (``test/<task>/<metric>``). Losses, metrics and the ``test/loss`` weights are the first member's.

``mtl export --ckpt_path a.ckpt b.ckpt c.ckpt --output ensemble.onnx`` writes one graph that runs every member and
averages them; :func:`load_ensemble` gives the same model to other tools (``mtl serve``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from torch import Tensor

from mtl_lightning import compat
from mtl_lightning.batches import unpack_batch
from mtl_lightning.errors import ConfigError
from mtl_lightning.losses import canonical_targets, task_losses
from mtl_lightning.metrics import task_predictions
from mtl_lightning.module import MultiTaskModule
from mtl_lightning.stage_metrics import StageMetrics
from mtl_lightning.tasks import TaskSpec, parse_tasks
from mtl_lightning.trained import load_trained

__all__ = ["EnsembleError", "MultiTaskEnsemble", "average_outputs", "load_ensemble", "load_member"]


class EnsembleError(ConfigError):
    """The checkpoints cannot form one ensemble (or the ensemble is used in a way it does not support)."""


# ------------------------------------------------------------------------------------------------- members
def load_member(path: str | Path) -> MultiTaskModule:
    """One trained model, on CPU and in eval mode, with its saved encoder config and input schema attached."""
    return load_trained(path, EnsembleError, "ensemble member")


def _signature(spec: TaskSpec) -> str:
    return f"{spec.kind}, {spec.num_outputs or 1} outputs"


def _described(spec: TaskSpec) -> str:
    return f"{spec.name} ({_signature(spec)})"


def task_difference(first: Sequence[TaskSpec], other: Sequence[TaskSpec], subject: str = "it") -> str | None:
    """How ``other``'s tasks differ from ``first``'s in what averaging needs (names, kinds, outputs), or None.

    ``subject`` names ``other`` in the answer (``it lacks [...]``).
    """
    ours, theirs = {s.name: s for s in first}, {s.name: s for s in other}
    parts = []
    missing, extra = [n for n in ours if n not in theirs], [n for n in theirs if n not in ours]
    if missing:
        parts.append(f"{subject} lacks {missing}")
    if extra:
        parts.append(f"{subject} has {extra} in addition")
    changed = [
        f"{n} ({_signature(theirs[n])} instead of {_signature(ours[n])})"
        for n in ours
        if n in theirs and _signature(theirs[n]) != _signature(ours[n])
    ]
    if changed:
        parts.append(f"{subject} declares {'; '.join(changed)}")
    return "; ".join(parts) or None


def _input_signature(model: MultiTaskModule) -> dict[str, Any]:
    """What the inputs of ``model`` look like: the encoder's input shape and vocabulary, the data's encoding."""
    config = getattr(model, "saved_encoder_config", None)
    args = (config.get("init_args") or {}) if isinstance(config, Mapping) else {}
    shape = args.get("input_shape", getattr(model.encoder, "input_shape", None))
    return {
        "input shape": tuple(int(d) for d in shape) if shape is not None else None,
        "vocab_size": args.get("vocab_size", getattr(model.encoder, "vocab_size", None)),
        "input encoding (the data's schema)": getattr(model, "saved_data_schema", None),
    }


def check_members(paths: Sequence[str], members: Sequence[MultiTaskModule]) -> None:
    """Refuse members whose tasks or inputs differ from the first member's, in one error naming the checkpoint."""
    first_tasks = list(members[0].tasks.values())
    first_inputs = _input_signature(members[0])
    for path, member in zip(paths[1:], members[1:], strict=True):
        difference = task_difference(first_tasks, list(member.tasks.values()))
        if difference is not None:
            raise EnsembleError(
                f"ensemble member {path} cannot be averaged with {paths[0]}: {difference}. The members of an "
                "ensemble must have the same tasks (names, kinds, numbers of outputs); drop it or retrain it"
            )
        inputs = _input_signature(member)
        for what, value in inputs.items():
            if value is not None and first_inputs[what] is not None and value != first_inputs[what]:
                shown = "differs" if isinstance(value, Mapping) else f"is {value}, not {first_inputs[what]}"
                raise EnsembleError(
                    f"ensemble member {path} reads other inputs than {paths[0]}: its {what} {shown}. The members of "
                    "an ensemble must be trained on the same data"
                )


def average_outputs(specs: Mapping[str, TaskSpec], outputs: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The ensemble's raw outputs from its members' (each ``{task: raw output}``), averaged as each kind says."""
    if len(outputs) == 1:  # the mean of one model is that model, bit for bit
        return dict(outputs[0])
    return {
        name: spec.task_kind.average_outputs(spec, torch.stack([out[name] for out in outputs]))
        for name, spec in specs.items()
    }


# ------------------------------------------------------------------------------------------------ ensemble
class MultiTaskEnsemble(LightningModule):
    """Several trained multi-task models answering as one: per task, the average of their predictions.

    Args:
        checkpoints: The members' checkpoint files (``.ckpt`` of ``mtl fit``), at least one.
        tasks: Linked from the data module by the CLI: they must be the members' tasks (names, kinds, outputs).
    """

    weights_option: ClassVar[str] = "checkpoints"
    """The option holding this model's trained weights: the CLI runs it without ``--ckpt_path`` (and refuses one)."""

    static_weights: Tensor  # buffer: the first member's weights of val/loss and test/loss

    def __init__(self, checkpoints: Sequence[str], tasks: Sequence[TaskSpec] | None = None):
        super().__init__()
        paths = [str(p) for p in ([checkpoints] if isinstance(checkpoints, (str, Path)) else checkpoints)]
        if not paths:
            raise EnsembleError(
                "an ensemble needs at least one checkpoint: give --model.init_args.checkpoints '[a.ckpt,b.ckpt]'"
            )
        members = [load_member(p) for p in paths]
        check_members(paths, members)
        self.members = nn.ModuleList(members)
        self.checkpoints = paths
        self.tasks: dict[str, TaskSpec] = dict(members[0].tasks)
        for spec in self.tasks.values():  # a kind that cannot average says so now, not after the first batch
            example = torch.zeros(2, *spec.task_kind.output_shape(spec, 1))
            spec.task_kind.average_outputs(spec, example)
        if tasks is not None:
            self._check_data_tasks(parse_tasks(tasks))
        self.val_metrics = StageMetrics("val", self.tasks)
        self.test_metrics = StageMetrics("test", self.tasks)
        self.register_buffer("static_weights", members[0].static_weights.detach().clone(), persistent=False)
        # What export and serving read of a model: the first member's (check_members made the others agree).
        self.saved_encoder_config = getattr(members[0], "saved_encoder_config", None)
        self.saved_data_schema = getattr(members[0], "saved_data_schema", None)
        self.save_hyperparameters({"checkpoints": paths, "tasks": [s.to_dict() for s in self.tasks.values()]})
        self._values_checked: set[str] = set()

    def _check_data_tasks(self, specs: Sequence[TaskSpec]) -> None:
        difference = task_difference(list(self.tasks.values()), specs, subject="the data")
        if difference is not None:
            raise EnsembleError(
                f"the ensemble's members were trained for tasks [{', '.join(map(_described, self.tasks.values()))}] "
                f"but {difference}; evaluate it on data with the members' tasks"
            )

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def encoder(self) -> nn.Module:
        """The first member's encoder, for tools that read an input shape or vocabulary from it (export)."""
        first: MultiTaskModule = self.members[0]  # type: ignore[assignment]
        return first.encoder

    @property
    def losses(self) -> nn.ModuleDict:
        """The first member's losses (a property, so they are not registered twice in the state dict)."""
        first: MultiTaskModule = self.members[0]  # type: ignore[assignment]
        return first.losses

    # ---------------------------------------------------------------------------------------------- forward
    def member_outputs(self, inputs: Tensor | Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Each member's raw outputs ``{task: tensor}``, in the order of :attr:`checkpoints`."""
        return [member(inputs) for member in self.members]

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Raw outputs per task whose predictions are the mean of the members' predictions."""
        return average_outputs(self.tasks, self.member_outputs(inputs))

    # ------------------------------------------------------------------------------------------------ steps
    def _eval_step(self, batch: Any, stage: StageMetrics) -> None:
        inputs, targets = unpack_batch(
            batch, stage.stage, self.tasks, check_values=stage.stage not in self._values_checked
        )
        self._values_checked.add(stage.stage)
        targets = canonical_targets(self.tasks, targets)
        outputs = self(inputs)
        sums, counts = task_losses(self.losses, self.tasks, outputs, targets, canonical=True)
        stage.add(sums, counts, outputs, targets, canonical=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per-task predictions, as a single model's ``predict_step`` gives them (the members' mean)."""
        inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
        return task_predictions(self.tasks, self(inputs))

    def _log_epoch(self, stage: StageMetrics) -> None:
        trainer = compat.attached_trainer(self)
        world = 1 if trainer is None else trainer.world_size
        logs = stage.epoch_values(self.static_weights, None, world, self.device)
        # As MultiTaskModule._log_epoch: the values are global already; sync_dist only keeps Lightning quiet.
        self.log_dict(
            {k: v.float() for k, v in logs.items()}, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
        )

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics)

    def logged_metric_names(self, stage: str | None = None) -> list[str]:
        """Every name this ensemble logs (per stage): a single model's names for val and test."""
        return [n for s in (self.val_metrics, self.test_metrics) if stage in (None, s.stage) for n in s.names()]

    # ---------------------------------------------------------------------------------------- lightning hooks
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise EnsembleError(
                "an ensemble is made of trained models and is not trained itself: use it with mtl validate, test or "
                "predict (train each member with mtl fit first)"
            )
        self._values_checked.clear()
        for metrics in (self.val_metrics, self.test_metrics):  # leftovers of an interrupted run
            metrics.pending.clear()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        # Defined so that Lightning gets as far as setup("fit"), which refuses with the reason.
        raise EnsembleError("an ensemble is not trained: use mtl validate, test or predict")

    def configure_optimizers(self) -> Any:
        raise EnsembleError("an ensemble is not trained: it has no optimizer (use mtl validate, test or predict)")


def load_ensemble(paths: Sequence[str | Path]) -> MultiTaskEnsemble:
    """An ensemble of the checkpoints ``paths`` on CPU, in eval mode: a drop-in for a loaded single model.

    It has a single model's ``tasks``, ``forward`` (raw outputs), ``predict_step``, ``encoder`` (the first
    member's, for its input shape), ``saved_encoder_config`` and ``saved_data_schema``.
    """
    return MultiTaskEnsemble([str(p) for p in paths]).eval()
