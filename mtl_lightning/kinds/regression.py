"""``regression``: K real values per sample (float, NaN = missing); K outputs, MSE loss, value metrics."""

from __future__ import annotations

from typing import ClassVar

import torchmetrics
from torchmetrics import Metric

from mtl_lightning.kinds.base import MetricTable, TaskKind

REGRESSION_METRICS: MetricTable = {
    "mae": (torchmetrics.MeanAbsoluteError, {}),
    "mse": (torchmetrics.MeanSquaredError, {}),
    "rmse": (torchmetrics.MeanSquaredError, {"squared": False}),
    "r2": (torchmetrics.R2Score, {}),
}


class RegressionKind(TaskKind):
    """Everything is :class:`TaskKind`'s default: float targets, the values as predictions, R2 per output."""

    name: ClassVar[str] = "regression"
    default_loss: ClassVar[str] = "mse"
    default_metrics: ClassVar[tuple[str, ...]] = ("mae", "mse", "r2")
    metric_table: ClassVar[MetricTable] = REGRESSION_METRICS
    per_output_metrics: ClassVar[tuple[type[Metric], ...]] = (torchmetrics.R2Score,)
