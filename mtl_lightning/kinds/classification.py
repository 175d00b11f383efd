"""What the classification kinds share: torchmetrics' task-wrapper metrics, missing labels as -100 for them, and
probabilities as predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torchmetrics
from torch import Tensor

from mtl_lightning.kinds.base import IGNORE_INDEX, KindError, MetricTable, TaskKind

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec

CLASSIFICATION_METRICS: MetricTable = {
    "accuracy": (torchmetrics.Accuracy, {"average": "micro"}),
    "f1": (torchmetrics.F1Score, {"average": "macro"}),
    "precision": (torchmetrics.Precision, {"average": "macro"}),
    "recall": (torchmetrics.Recall, {"average": "macro"}),
    "auroc": (torchmetrics.AUROC, {}),
    "average_precision": (torchmetrics.AveragePrecision, {}),
}


class ClassificationKind(TaskKind):
    """A kind scored by torchmetrics' classification metrics (``task=binary|multiclass|multilabel``).

    The metrics are built with ``ignore_index=-100`` and receive missing labels as -100, so they need no boolean
    indexing (no host sync).
    """

    is_classification: ClassVar[bool] = True
    default_loss: ClassVar[str] = "bce"
    metric_table: ClassVar[MetricTable] = CLASSIFICATION_METRICS
    default_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "f1")
    metric_task: ClassVar[str] = ""
    """The ``task`` argument of torchmetrics' classification wrappers."""
    outputs_are: ClassVar[str] = "classes"
    """What ``num_outputs`` counts, for error messages."""

    def checked_num_outputs(self, spec: TaskSpec) -> int:
        """``num_outputs`` of a K-way task: required, at least 2."""
        n = spec.num_outputs
        if n is None or n < 2:
            raise KindError(
                f"task {spec.name!r}: a {spec.kind} task needs num_outputs (the number of {self.outputs_are}) >= 2, "
                f"got {n}; use kind 'binary' for a single yes/no target"
            )
        return int(n)

    def metric_kwargs(self, spec: TaskSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**kwargs, "task": self.metric_task, "ignore_index": IGNORE_INDEX, "validate_args": False}

    def custom_metric_kwargs(self, spec: TaskSpec, accepted: Mapping[str, Any]) -> dict[str, Any]:
        # Missing labels reach classification metrics as -100; without this they fail their value checks.
        return {"ignore_index": IGNORE_INDEX} if "ignore_index" in accepted else {}

    def metric_inputs(self, spec: TaskSpec, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        preds = self.predictions(spec, output.detach())
        ignore = torch.full((), IGNORE_INDEX, dtype=torch.long, device=target.device)
        return preds, torch.where(self.label_mask(spec, target), target, ignore).long()

    def metric_update(
        self, collection: torchmetrics.MetricCollection, spec: TaskSpec, preds: Tensor, target: Tensor
    ) -> None:
        collection.update(preds, target)


def sigmoid_average(outputs: Tensor) -> Tensor:
    """The logit of the mean probability ``sigmoid(outputs)`` over the first axis (an ensemble's members).

    ``log(mean p) - log(mean (1 - p))`` from log-sigmoids with log-sum-exp: finite for every finite logit, where
    ``logit(mean(sigmoid))`` gives inf once a mean probability rounds to 1 (and then a NaN loss).
    """
    log_p = torch.nn.functional.logsigmoid(outputs)
    log_q = torch.nn.functional.logsigmoid(-outputs)
    return torch.logsumexp(log_p, dim=0) - torch.logsumexp(log_q, dim=0)


def above(probabilities: Any, threshold: float) -> Any:
    """The one threshold rule of binary decisions, torchmetrics' own: a probability above ``threshold`` is 1.

    Works on tensors and numpy arrays alike, so the logged accuracy and the written predictions agree at p = 0.5.
    """
    return probabilities > threshold
