"""``binary``: one yes/no target per sample (float 0/1, NaN = missing); one logit out, BCE loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import Generator, Tensor

from mtl_lightning.kinds.base import IGNORE_INDEX, KindError, TargetError
from mtl_lightning.kinds.classification import ClassificationKind, above, sigmoid_average

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec


class BinaryKind(ClassificationKind):
    """One logit out; p = sigmoid(logit). torchmetrics calls p > 0.5 positive, and so does the writer (:func:`above`)."""

    name: ClassVar[str] = "binary"
    default_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1", "auroc")
    metric_task: ClassVar[str] = "binary"

    def checked_num_outputs(self, spec: TaskSpec) -> int:
        if spec.num_outputs not in (None, 1):
            raise KindError(
                f"task {spec.name!r}: a binary task has exactly one output, got num_outputs={spec.num_outputs}; "
                "use kind 'multiclass' or 'multilabel' for more"
            )
        return 1

    def metric_kwargs(self, spec: TaskSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = super().metric_kwargs(spec, kwargs)
        kwargs.pop("average", None)  # one score for one label: averaging is not a binary metric's setting
        return kwargs

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        check_zero_one(spec, values, where)

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        return output.sigmoid()

    def average_outputs(self, spec: TaskSpec, outputs: Tensor) -> Tensor:
        """The logit of the members' mean probability."""
        return sigmoid_average(outputs)

    def columns(self, spec: TaskSpec, values: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
        prob = values.reshape(-1)
        return {f"{spec.name}_prob": prob, f"{spec.name}_pred": above(prob, threshold).astype(np.int64)}

    def class_column(self, spec: TaskSpec) -> str | None:
        return f"{spec.name}_pred"

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        """Above or below the median of the signal (its first column)."""
        first = signal if signal.ndim == 1 else signal[:, 0]
        return (first > first.median()).float()


def check_zero_one(spec: TaskSpec, values: Tensor, where: str) -> None:
    """Labels of binary and multilabel tasks are 0 or 1."""
    bad = values[(values != 0) & (values != 1)]
    if bad.numel():
        raise TargetError(
            f"task {spec.name!r} in {where}: {spec.kind} labels must be 0 or 1 (NaN or {IGNORE_INDEX} for "
            f"missing), found {bad[:5].tolist()}"
        )
