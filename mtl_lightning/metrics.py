"""Per-task torchmetrics: defaults per task kind, short names, and masking of missing labels.

Classification metrics are built with ``ignore_index=-100`` and receive missing labels as -100, so they need no
boolean indexing (no host sync). Regression metrics cannot ignore entries, so only fully labelled rows reach them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torchmetrics
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mtl_lightning._imports import import_from_path
from mtl_lightning.errors import ConfigError
from mtl_lightning.targets import label_mask
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

# name -> (torchmetrics task-wrapper class, default kwargs for multiclass/multilabel)
CLASSIFICATION_METRICS: dict[str, tuple[type[Metric], dict[str, Any]]] = {
    "accuracy": (torchmetrics.Accuracy, {"average": "micro"}),
    "f1": (torchmetrics.F1Score, {"average": "macro"}),
    "precision": (torchmetrics.Precision, {"average": "macro"}),
    "recall": (torchmetrics.Recall, {"average": "macro"}),
    "auroc": (torchmetrics.AUROC, {}),
    "average_precision": (torchmetrics.AveragePrecision, {}),
}
REGRESSION_METRICS: dict[str, tuple[type[Metric], dict[str, Any]]] = {
    "mae": (torchmetrics.MeanAbsoluteError, {}),
    "mse": (torchmetrics.MeanSquaredError, {}),
    "rmse": (torchmetrics.MeanSquaredError, {"squared": False}),
    "r2": (torchmetrics.R2Score, {}),
}
HIGHER_IS_BETTER = {"accuracy", "f1", "precision", "recall", "auroc", "average_precision", "r2"}


def metric_key(name: str) -> str:
    """The name a metric is logged under: its short name, or the class name of a dotted path, lower-cased."""
    return name.rpartition(".")[2].lower()


def _build_metric(spec: TaskSpec, name: str) -> Metric:
    user_args = dict(spec.metric_args.get(name, {}))
    table = CLASSIFICATION_METRICS if spec.is_classification else REGRESSION_METRICS
    if name in table:
        cls, defaults = table[name]
        kwargs: dict[str, Any] = {**defaults, **user_args}
        if spec.is_classification:
            kwargs.update(task=spec.kind, ignore_index=IGNORE_INDEX, validate_args=False)
            if spec.kind == "binary":
                kwargs.pop("average", None)
            elif spec.kind == "multiclass":
                kwargs["num_classes"] = spec.num_outputs
            else:
                kwargs["num_labels"] = spec.num_outputs
        return cls(**kwargs)
    other = CLASSIFICATION_METRICS if table is REGRESSION_METRICS else REGRESSION_METRICS
    if name in other:
        raise ConfigError(
            f"task {spec.name!r}: metric {name!r} does not apply to a {spec.kind} task; use one of {sorted(table)}"
        )
    cls = import_from_path(name, f"task {spec.name!r}: metric")
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ConfigError(f"task {spec.name!r}: metric {name!r} is not a torchmetrics.Metric class")
    if spec.is_classification and "ignore_index" in inspect.signature(cls).parameters:
        # Missing labels reach classification metrics as -100; without this they fail their value checks.
        user_args.setdefault("ignore_index", IGNORE_INDEX)
    return cls(**user_args)


def build_metrics(spec: TaskSpec, stage: str) -> MetricCollection:
    """A MetricCollection for one task and stage, logged as ``{stage}/{task}/{metric}``."""
    metrics: dict[str, Metric | MetricCollection] = {metric_key(n): _build_metric(spec, n) for n in spec.metric_names}
    return MetricCollection(metrics, prefix=f"{stage}/{spec.name}/")


def predictions(spec: TaskSpec, output: Tensor) -> Tensor:
    """Turn a head's raw output into predictions: probabilities for classification, values for regression."""
    if spec.kind == "multiclass":
        return output.softmax(dim=-1)
    if spec.kind in ("binary", "multilabel"):
        return output.sigmoid()
    return output


def metric_inputs(spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(preds, target) for the task's metrics with missing labels masked as the metrics expect."""
    preds = predictions(spec, output.detach())
    if spec.is_classification:
        mask = label_mask(spec, target)
        ignore = torch.full((), IGNORE_INDEX, dtype=torch.long, device=target.device)
        return preds, torch.where(mask, target, ignore).long()
    mask = label_mask(spec, target)
    rows = mask if mask.ndim == 1 else mask.all(dim=1)
    return preds[rows], target[rows]


def metric_update(collection: MetricCollection, spec: TaskSpec, preds: Tensor, target: Tensor) -> None:
    """Update a task's metrics; regression metrics other than R2 see flattened multi-output values."""
    if spec.kind == "regression" and preds.ndim == 2:
        for metric in collection.values(copy_state=False):
            if isinstance(metric, torchmetrics.R2Score):
                metric.update(preds, target)
            else:
                metric.update(preds.reshape(-1), target.reshape(-1))
        return
    collection.update(preds, target)
