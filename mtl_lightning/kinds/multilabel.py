"""``multilabel``: K independent yes/no labels per sample (float 0/1, NaN = missing); K logits out, BCE loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Generator, Tensor

from mtl_lightning.kinds.base import spread
from mtl_lightning.kinds.binary import check_zero_one
from mtl_lightning.kinds.classification import ClassificationKind, above, sigmoid_average

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec


class MultilabelKind(ClassificationKind):
    name: ClassVar[str] = "multilabel"
    metric_task: ClassVar[str] = "multilabel"
    outputs_are: ClassVar[str] = "labels"

    def target_shape(self, spec: TaskSpec, batch_size: int) -> tuple[int, ...]:
        return (batch_size, int(spec.num_outputs or 2))

    def output(self, spec: TaskSpec, raw: Tensor) -> Tensor:
        return raw

    def metric_kwargs(self, spec: TaskSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**super().metric_kwargs(spec, kwargs), "num_labels": spec.num_outputs}

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        check_zero_one(spec, values, where)

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        return output.sigmoid()

    def average_outputs(self, spec: TaskSpec, outputs: Tensor) -> Tensor:
        """Per label, the logit of the members' mean probability."""
        return sigmoid_average(outputs)

    def columns(self, spec: TaskSpec, values: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        k = values.shape[1]
        probs = {f"{spec.name}_prob_{i}": values[:, i] for i in range(k)}
        preds = {f"{spec.name}_pred_{i}": above(values[:, i], threshold).astype(np.int64) for i in range(k)}
        return {**probs, **preds}

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        """Label j fires when its column passes its own quantile (0.2 ... 0.8), so each label has its own rate.

        A 1-D signal is spread to K noisy copies, each with noise of the signal's own scale.
        """
        k = int(spec.num_outputs or 2)
        copies = spread(signal, k, float(signal.std()), generator)
        thresholds = torch.quantile(copies, torch.linspace(0.2, 0.8, k, dtype=copies.dtype), dim=0).diagonal()
        return (copies > thresholds).float()
