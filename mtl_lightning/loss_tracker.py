"""Epoch-level per-task loss means, exact over labelled rows and synchronised across DDP ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TaskLossMean(Metric):
    """Accumulates per-task loss sums and labelled-entry counts; ``compute`` gives per-task means ``(T,)``.

    One vector update per step instead of one metric per task keeps the per-step cost flat in the number of
    tasks; torchmetrics sums the states across ranks at ``compute``.
    """

    full_state_update = False

    def __init__(self, num_tasks: int):
        super().__init__(sync_on_compute=True)
        self.add_state("sums", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", default=torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: Tensor, counts: Tensor) -> None:
        self.sums += sums.detach().to(self.sums.dtype)
        self.counts += counts.detach().to(self.counts.dtype)

    def compute(self) -> tuple[Tensor, Tensor]:
        """(per-task mean loss, per-task labelled count); tasks never labelled get NaN, not a fake zero."""
        means = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), torch.nan)
        return means, self.counts
