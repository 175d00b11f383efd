"""Loss weighting with fixed weights: equal weighting (the default) and static per-task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.balancers.base import BalanceInput, BalanceOutput, Balancer, weighted_mean
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec


class EqualWeighting(Balancer):
    """The mean of the present tasks' losses (every task weighs the same)."""

    weights: Tensor  # buffer registered in bind()

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        self.register_buffer("weights", torch.ones(len(tasks)), persistent=False)

    def fixed_weights(self, tasks: Sequence[TaskSpec]) -> Tensor:
        return torch.ones(len(tasks))

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        return weighted_mean(inputs.losses, self.weights, inputs.present)


class StaticWeighting(Balancer):
    """A weighted mean with fixed weights: each task's ``weight`` from its spec, or ``weights`` given here.

    The evaluation loss (``val/loss``) uses the same weights, overrides included (:meth:`fixed_weights`).

    Args:
        weights: Optional ``{task: weight}`` overriding the specs' weights for the tasks it names.
    """

    weights: Tensor  # buffer registered in bind()

    def __init__(self, weights: Mapping[str, float] | None = None):
        super().__init__()
        self.overrides = dict(weights or {})

    def bind(self, tasks: list[TaskSpec], encoder: nn.Module | None = None) -> None:
        super().bind(tasks, encoder)
        unknown = sorted(set(self.overrides) - set(self.task_names))
        if unknown:
            raise ConfigError(
                f"StaticWeighting: weights given for unknown tasks {unknown}; tasks are {self.task_names}"
            )
        values = self.fixed_weights(tasks)
        if (values < 0).any() or not (values > 0).any():
            raise ConfigError(f"StaticWeighting: weights must be >= 0 with at least one > 0, got {values.tolist()}")
        self.register_buffer("weights", values, persistent=False)

    def fixed_weights(self, tasks: Sequence[TaskSpec]) -> Tensor:
        return torch.tensor([float(self.overrides.get(t.name, t.weight)) for t in tasks])

    def forward(self, inputs: BalanceInput) -> BalanceOutput:
        return weighted_mean(inputs.losses, self.weights, inputs.present)
