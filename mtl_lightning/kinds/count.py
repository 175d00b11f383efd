"""``count``: non-negative counts per sample (float, NaN = missing), Poisson regression with a log link.

The head outputs the log of the expected count; the loss is the Poisson negative log-likelihood on that log-rate
(``PoissonNLLLoss(log_input=True)``); predictions are the expected counts ``exp(output)``; the metrics score those
against the counts: mean absolute error and the Poisson deviance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torchmetrics
from torch import Generator, Tensor

from mtl_lightning.kinds.base import MetricTable, TargetError, spread
from mtl_lightning.kinds.regression import REGRESSION_METRICS, RegressionKind

if TYPE_CHECKING:
    from mtl_lightning.tasks import TaskSpec

COUNT_METRICS: MetricTable = {
    **REGRESSION_METRICS,
    "poisson_deviance": (torchmetrics.TweedieDevianceScore, {"power": 1.0}),
}


class CountKind(RegressionKind):
    name: ClassVar[str] = "count"
    default_loss: ClassVar[str] = "poisson"
    default_metrics: ClassVar[tuple[str, ...]] = ("mae", "poisson_deviance")
    metric_table: ClassVar[MetricTable] = COUNT_METRICS

    def check_values(self, spec: TaskSpec, values: Tensor, where: str) -> None:
        bad = values[~torch.isfinite(values) | (values < 0)]
        if bad.numel():
            raise TargetError(
                f"task {spec.name!r} in {where}: count targets must be finite and >= 0 (NaN for missing), found "
                f"{bad[:5].tolist()}; use kind regression for signed values"
            )

    def predictions(self, spec: TaskSpec, output: Tensor) -> Tensor:
        return output.exp()

    def average_outputs(self, spec: TaskSpec, outputs: Tensor) -> Tensor:
        """The log of the members' mean expected count (the head outputs a log-rate)."""
        return torch.logsumexp(outputs, dim=0) - math.log(outputs.shape[0])

    def label_from_signal(self, spec: TaskSpec, signal: Tensor, generator: Generator, noise: float = 0.0) -> Tensor:
        """Poisson draws whose log-rate is the standardised signal (clipped to ±3: at most ~e^2 events)."""
        columns = spread(signal, int(spec.num_outputs or 1), noise, generator).double()
        z = ((columns - columns.mean(0)) / columns.std(0).clamp_min(1e-12)).clamp(-3, 3)
        counts = torch.poisson((0.7 * z).exp(), generator=generator).float()
        return counts if counts.shape[1] > 1 else counts[:, 0]
