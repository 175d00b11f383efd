"""The base class of task kinds: everything about a task that depends on what its targets and outputs look like.

A kind answers, for one :class:`~mtl_lightning.tasks.TaskSpec`: how many outputs the head has, the canonical shape
and dtype of a target and which entries are missing, the default loss and metrics, how a raw output becomes a
prediction (probabilities, classes, values), what reaches the metrics, the prediction writer's columns and how a
data generator turns a latent signal into a label. The module, losses, metrics, the prediction writer and export
ask the kind; none of them tests a kind's name. A new kind is one subclass in one file, named in a task spec by its
dotted class path (``kind: my_pkg.kinds.OrdinalKind``) or added to :data:`mtl_lightning.kinds.BUILTIN`.

The defaults here describe a per-sample task with float targets (NaN = missing) and one value per output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Generator, Tensor
from torchmetrics import Metric, MetricCollection

from mtl_lightning.errors import ConfigError

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec

IGNORE_INDEX = -100
"""Missing-label marker in integer targets (torch's ``ignore_index``); float targets use NaN."""

MetricTable = Mapping[str, tuple[type[Metric], dict[str, Any]]]


class TargetError(ConfigError):
    """A target tensor does not match its task's spec."""


class KindError(ConfigError):
    """A task's settings do not suit its kind."""


class TaskKind:
    """What a task's targets and outputs look like, and everything that follows from it.

    Subclasses set the class attributes and override what differs; each method takes the task's spec.
    """

    name: ClassVar[str] = ""
    """The short name in task specs (``kind: binary``); a kind given by dotted path may leave it empty."""
    integer_targets: ClassVar[bool] = False
    """Targets are class indices (int64, missing = -100) rather than floats (missing = NaN)."""
    is_classification: ClassVar[bool] = False
    default_loss: ClassVar[str] = "mse"
    default_metrics: ClassVar[tuple[str, ...]] = ()
    metric_table: ClassVar[MetricTable] = {}
    """Short metric names this kind accepts: ``name -> (torchmetrics class, default kwargs)``."""
    per_output_metrics: ClassVar[tuple[type[Metric], ...]] = ()
    """Metric classes that score a multi-output task per output; the others see its values flattened."""

    # ------------------------------------------------------------------------------------------ the spec
    def checked_num_outputs(self, spec: TaskSpec) -> int:
        """The head's number of outputs for ``spec`` (its default when ``spec.num_outputs`` is None), validated."""
        n = 1 if spec.num_outputs is None else spec.num_outputs
        if n < 1:
            raise KindError(f"task {spec.name!r}: {self.label} needs num_outputs >= 1, got {n}")
        return int(n)

    @property
    def label(self) -> str:
        """How error messages name this kind."""
        return self.name or type(self).__name__

    # ----------------------------------------------------------------------------------- targets, outputs
    def target_shape(self, spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
        """Canonical target shape: ``(N,)`` for one output, ``(N, K)`` for K outputs."""
        k = int(spec.num_outputs or 1)
        return (batch_size,) if k == 1 else (batch_size, k)

    def output(self, spec: TaskSpec, raw: Tensor) -> Tensor:
        """A head's raw output in canonical shape (the target's, plus a class axis where the kind has one)."""
        return raw.squeeze(-1) if spec.num_outputs == 1 else raw

    def output_shape(self, spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
        """Canonical shape of :meth:`output` for ``batch_size`` rows."""
        return self.target_shape(spec, batch_size)

    def canonical_target(self, spec: TaskSpec, target: Tensor) -> Tensor:
        """The target in canonical shape and dtype; ``(N, 1)`` is accepted for single-output tasks."""
        want = self.target_shape(spec, target.shape[0] if target.ndim else 0)
        if target.ndim == 2 and target.shape[1] == 1 and len(want) == 1:
            target = target.reshape(-1)
        if tuple(target.shape) != want:
            raise TargetError(
                f"task {spec.name!r} ({spec.kind}, num_outputs={spec.num_outputs}): target has shape "
                f"{tuple(target.shape)}, expected {want} (batch size first)"
            )
        if self.integer_targets and target.is_floating_point():
            raise TargetError(
                f"task {spec.name!r} ({spec.kind}): targets must be integer class indices (int64, missing = "
                f"{IGNORE_INDEX}), got {target.dtype}; convert with .long()"
            )
        if not self.integer_targets and target.dtype == torch.bool:
            target = target.float()
        return target

    def label_mask(self, spec: TaskSpec, target: Tensor) -> Tensor:
        """Boolean mask of labelled entries, the canonical target's shape."""
        if target.is_floating_point():
            return target == target  # False exactly at NaN: ~isnan(target) in one kernel instead of two
        return target != IGNORE_INDEX

    def missing_targets(self, spec: TaskSpec, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """A canonical target of ``batch_size`` rows with every entry missing."""
        shape = self.target_shape(spec, batch_size)
        if self.integer_targets:
            return torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
        return torch.full(shape, torch.nan, dtype=torch.float, device=device)

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        """Check the labelled values (a 1-D tensor, never empty) of a batch; may sync with the host."""
        if not torch.isfinite(values).all():
            raise TargetError(f"task {spec.name!r} in {where}: {self.label} targets contain inf; use NaN for missing")

    # -------------------------------------------------------------------------------- metrics, predictions
    def metric_kwargs(self, spec: TaskSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The final keyword arguments of a built-in metric from its defaults merged with the user's (this kind
        may add some, e.g. ``num_classes``, or drop some)."""
        return kwargs

    def custom_metric_kwargs(self, spec: TaskSpec, accepted: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults for a metric given by dotted path, from the names of its constructor parameters."""
        return {}

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        """A raw output turned into what ``mtl predict`` and the export give: here, the values themselves."""
        return output

    def average_outputs(self, spec: TaskSpec, outputs: Tensor) -> Tensor:
        """The raw output of an ensemble from its members' raw outputs, stacked on a new first axis ``(M, ...)``.

        Averaging is in prediction space: ``predictions(average_outputs(outputs))`` is the mean of the members'
        ``predictions``, so the ensemble's losses, metrics and predictions are those of the averaged predictions.
        The default, the mean of the raw outputs, is right when :meth:`predictions` gives the outputs themselves; a
        kind with other predictions overrides it (a kind that does not is refused rather than averaged wrongly).
        """
        if type(self).predictions is not TaskKind.predictions:
            raise KindError(
                f"task {spec.name!r}: kind {self.label} turns outputs into predictions of its own but does not say how "
                "an ensemble averages them; override TaskKind.average_outputs in the kind"
            )
        return outputs.mean(dim=0)

    def metric_inputs(self, spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(preds, target) for the metrics. Value metrics cannot ignore entries: only fully labelled rows pass."""
        preds = self.predictions(spec, output.detach())
        mask = self.label_mask(spec, target)
        rows = mask if mask.ndim == 1 else mask.all(dim=1)
        return preds[rows], target[rows]

    def metric_update(self, collection: MetricCollection, spec: TaskSpec, preds: Tensor, target: Tensor) -> None:
        """Update the task's metrics. Multi-output values are flattened, except for metrics that score per output."""
        if preds.ndim == 2:
            for metric in collection.values(copy_state=False):
                if isinstance(metric, self.per_output_metrics):
                    metric.update(preds, target)
                else:
                    metric.update(preds.reshape(-1), target.reshape(-1))
            return
        collection.update(preds, target)

    # ------------------------------------------------------------------------------------- written columns
    def columns(self, spec: TaskSpec, values: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        """The prediction writer's columns of this task from its predictions: ``{task}`` or ``{task}_{i}``."""
        if values.ndim == 1:
            return {spec.name: values}
        return {f"{spec.name}_{i}": values[:, i] for i in range(values.shape[1])}

    def class_column(self, spec: TaskSpec) -> str | None:
        """The written column holding one predicted class index per row, which class names can label; or None."""
        return None

    # ------------------------------------------------------------------------------------------ generators
    def target_width(self, spec: TaskSpec) -> int:
        """How many values one sample's target has: one per output here (a class index for multiclass). So many
        columns a table gives the task, and so many latent signals a generator gives :meth:`label_from_signal`."""
        return int(spec.num_outputs or 1)

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        """A target for ``spec`` from a latent signal: ``(N,)``, or ``(N, K)`` with one column per output.

        A 1-D signal of a K-output task is spread to K columns, each with its own ``noise``. The default: values
        standardised per output.
        """
        values = spread(signal, int(spec.num_outputs or 1), noise, generator)
        values = values if values.shape[1] > 1 else values[:, 0]
        return ((values - values.mean(0)) / values.std(0).clamp_min(1e-12)).float()


def spread(signal: Tensor, width: int, noise: float, generator: Generator) -> Tensor:
    """``(N, width)`` columns of a signal: the signal's own columns, or a 1-D signal plus ``noise`` per column."""
    if signal.ndim == 2:
        return signal
    if width == 1:
        return signal[:, None]
    return signal[:, None] + noise * torch.randn(signal.shape[0], width, generator=generator)


def quantile_classes(signal: Tensor, num_classes: int) -> Tensor:
    """Classes 0..K-1 of equal frequency from a 1-D signal (int64)."""
    edges = torch.quantile(signal, torch.linspace(0, 1, num_classes + 1, dtype=signal.dtype)[1:-1])
    return torch.bucketize(signal, edges)
