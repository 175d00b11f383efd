"""Per-task torchmetrics: defaults and short names from the task's kind, and masking of missing labels.

Each kind says which short metric names it takes (:attr:`~mtl_lightning.kinds.TaskKind.metric_table`), the keyword
arguments they need (``num_classes``, ``ignore_index``), and how its outputs and targets reach them
(:meth:`~mtl_lightning.kinds.TaskKind.metric_inputs`): classification metrics ignore -100 labels, so they need no
boolean indexing (no host sync); value metrics cannot ignore entries, so only fully labelled rows reach them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mtl_lightning._imports import import_from_path
from mtl_lightning.errors import ConfigError
from mtl_lightning.kinds.classification import CLASSIFICATION_METRICS
from mtl_lightning.kinds.count import COUNT_METRICS
from mtl_lightning.kinds.regression import REGRESSION_METRICS
from mtl_lightning.tasks import TaskSpec

__all__ = [
    "CLASSIFICATION_METRICS",
    "HIGHER_IS_BETTER",
    "REGRESSION_METRICS",
    "build_metrics",
    "metric_inputs",
    "metric_key",
    "metric_update",
    "predictions",
]

HIGHER_IS_BETTER = {"accuracy", "f1", "precision", "recall", "auroc", "average_precision", "r2"}
"""Short metric names where a higher value is better (the others: lower is better)."""
_KNOWN = {**CLASSIFICATION_METRICS, **REGRESSION_METRICS, **COUNT_METRICS}


def metric_key(name: str) -> str:
    """The name a metric is logged under: its short name, or the class name of a dotted path, lower-cased."""
    return name.rpartition(".")[2].lower()


def _build_metric(spec: TaskSpec, name: str) -> Metric:
    kind = spec.task_kind
    user_args = dict(spec.metric_args.get(name, {}))
    if name in kind.metric_table:
        cls, defaults = kind.metric_table[name]
        return cls(**kind.metric_kwargs(spec, {**defaults, **user_args}))
    if name in _KNOWN:
        raise ConfigError(
            f"task {spec.name!r}: metric {name!r} does not apply to a {spec.kind} task; use one of "
            f"{sorted(kind.metric_table)}"
        )
    cls = import_from_path(name, f"task {spec.name!r}: metric")
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ConfigError(f"task {spec.name!r}: metric {name!r} is not a torchmetrics.Metric class")
    defaults = kind.custom_metric_kwargs(spec, inspect.signature(cls).parameters)
    return cls(**{**defaults, **user_args})


def build_metrics(spec: TaskSpec, stage: str) -> MetricCollection:
    """A MetricCollection for one task and stage, logged as ``{stage}/{task}/{metric}``."""
    metrics: dict[str, Metric | MetricCollection] = {metric_key(n): _build_metric(spec, n) for n in spec.metric_names}
    return MetricCollection(metrics, prefix=f"{stage}/{spec.name}/")


def predictions(spec: TaskSpec, output: Tensor) -> Tensor:
    """A head's raw output as predictions: probabilities for classification, values for regression, ..."""
    return spec.task_kind.predictions(spec, output)


def task_predictions(tasks: Mapping[str, TaskSpec], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every task's predictions from the model's raw outputs ``{task: output}`` (what ``predict_step`` returns)."""
    return {name: predictions(tasks[name], out) for name, out in outputs.items()}


def metric_inputs(spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(preds, target) for the task's metrics with missing labels masked as the metrics expect."""
    return spec.task_kind.metric_inputs(spec, output, target)


def metric_update(collection: MetricCollection, spec: TaskSpec, preds: Tensor, target: Tensor) -> None:
    """Update a task's metrics the way its kind says (e.g. R2 per output, the others on flattened values)."""
    spec.task_kind.metric_update(collection, spec, preds, target)
