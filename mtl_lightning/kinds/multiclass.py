"""``multiclass``: one of K classes per sample (int64 class index, -100 = missing); K logits out, cross-entropy."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Generator, Tensor

from mtl_lightning.kinds.base import IGNORE_INDEX, TargetError, quantile_classes
from mtl_lightning.kinds.classification import ClassificationKind

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec


class MulticlassKind(ClassificationKind):
    name: ClassVar[str] = "multiclass"
    integer_targets: ClassVar[bool] = True
    default_loss: ClassVar[str] = "ce"
    metric_task: ClassVar[str] = "multiclass"

    def target_shape(self, spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
        return (batch_size,)

    def output_shape(self, spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
        return (batch_size, int(spec.num_outputs or 2))

    def metric_kwargs(self, spec: TaskSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**super().metric_kwargs(spec, kwargs), "num_classes": spec.num_outputs}

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= int(spec.num_outputs or 0):
            raise TargetError(
                f"task {spec.name!r} in {where}: class labels must be in [0, {spec.num_outputs}) or "
                f"{IGNORE_INDEX} for missing, found values in [{low}, {high}]; fix the labels or num_outputs"
            )

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        return output.softmax(dim=-1)

    def average_outputs(self, spec: TaskSpec, outputs: Tensor) -> Tensor:
        """The log of the members' mean class probabilities: its softmax is that mean, its cross-entropy -log of it."""
        return torch.logsumexp(outputs.log_softmax(dim=-1), dim=0) - math.log(outputs.shape[0])

    def columns(self, spec: TaskSpec, values: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        cols = {f"{spec.name}_prob_{k}": values[:, k] for k in range(values.shape[1])}
        return {**cols, f"{spec.name}_pred": values.argmax(axis=1).astype(np.int64)}

    def class_column(self, spec: TaskSpec) -> str | None:
        return f"{spec.name}_pred"

    def target_width(self, spec: TaskSpec) -> int:
        return 1

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        """Classes of equal frequency from the quantiles of the signal (its first column)."""
        return quantile_classes(signal if signal.ndim == 1 else signal[:, 0], int(spec.num_outputs or 2))
