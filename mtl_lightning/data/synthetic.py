"""Synthetic multi-task data with a task-relatedness knob, after the synthetic study of the MMoE paper.

Ma et al. (2018), "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
section 3.2: each task t has a weight vector ``w_t = c (sqrt(rho) u_0 + sqrt(1 - rho) u_t)`` built from a shared
unit vector ``u_0`` and a task-specific one ``u_t`` (all orthonormal), so ``cos(w_s, w_t) = rho`` for every pair.
The latent signal is ``s_t = w_t.x + sum_i sin(alpha_i w_t.x + beta_i)`` with ``alpha, beta`` shared by all tasks;
targets add Gaussian noise. Each task's kind turns its signal into a label: regression keeps the value, binary
thresholds it at its median, multiclass cuts it into equal-frequency bins, multilabel thresholds noisy copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Generator, Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.base import DataError, MultiTaskDataModule, split_generated, split_indices
from mtl_lightning.data.datasets import MultiTaskTensorDataset
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec


def task_directions(num_features: int, num_tasks: int, correlation: float, scale: float, gen: Generator) -> Tensor:
    """``(T, d)`` weight vectors with pairwise cosine similarity exactly ``correlation``."""
    if not 0.0 <= correlation <= 1.0:
        raise DataError(f"correlation must be in [0, 1], got {correlation}")
    if num_features < num_tasks + 1:
        raise DataError(f"num_features must be >= number of tasks + 1 ({num_tasks + 1}), got {num_features}")
    basis, _ = torch.linalg.qr(torch.randn(num_features, num_tasks + 1, generator=gen, dtype=torch.float64))
    u0, ut = basis[:, 0], basis[:, 1:].T
    return (scale * (correlation**0.5 * u0 + (1 - correlation) ** 0.5 * ut)).float()


def latent_signals(x: Tensor, directions: Tensor, num_sin: int, gen: Generator) -> Tensor:
    """``(N, T)`` signals ``w_t.x + sum_i sin(alpha_i w_t.x + beta_i)``."""
    proj = x @ directions.T
    alpha = torch.randn(num_sin, generator=gen)
    beta = torch.randn(num_sin, generator=gen)
    return proj + torch.sin(proj[..., None] * alpha + beta).sum(-1)


def _label(spec: TaskSpec, signal: Tensor, noise: float, gen: Generator) -> Tensor:
    """The task's kind turns its noisy signal into a label (:meth:`~mtl_lightning.kinds.TaskKind.label_from_signal`)."""
    noisy = signal + noise * torch.randn(signal.shape[0], generator=gen)
    return spec.task_kind.label_from_signal(spec, noisy, gen, noise)


def _drop_labels(target: Tensor, rate: float, gen: Generator) -> Tensor:
    drop = torch.rand(target.shape[0], generator=gen) < rate
    target = target.clone()
    target[drop] = IGNORE_INDEX if not target.is_floating_point() else torch.nan
    return target


class SyntheticDataModule(MultiTaskDataModule):
    """Generated multi-task data whose task relatedness is set by ``correlation`` (0 unrelated, 1 identical).

    Args:
        tasks: Task specs; each task gets its own signal, turned into a label by the task's kind.
        num_samples: Rows in total, split into train/val/test.
        num_features: Input dimension ``d``.
        correlation: Pairwise cosine similarity of the task weight vectors.
        scale: Norm ``c`` of the weight vectors.
        num_sin: Number of sine terms that make the tasks non-linear (10 in the paper).
        noise: Standard deviation of the label noise.
        missing_rate: Fraction of rows whose label is missing, per task (NaN or -100).
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for testing.
        **kwargs: Loader settings and the split/generation ``seed`` of :class:`MultiTaskDataModule`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        num_samples: int = 20000,
        num_features: int = 64,
        correlation: float = 0.8,
        scale: float = 1.0,
        num_sin: int = 10,
        noise: float = 0.1,
        missing_rate: float = 0.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ):
        # jsonargparse follows **kwargs into the base class, so the CLI still shows the loader settings.
        super().__init__(tasks, **kwargs)
        if not 0.0 <= missing_rate < 1.0:
            raise DataError(f"missing_rate must be in [0, 1), got {missing_rate}")
        if num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.num_features = num_features
        self.correlation = correlation
        self.scale = scale
        self.num_sin = num_sin
        self.noise = noise
        self.missing_rate = missing_rate
        self.fractions = (val_fraction, test_fraction)
        # Fail at construction, not at setup, on impossible settings.
        task_directions(num_features, len(self.tasks), correlation, scale, torch.Generator().manual_seed(0))
        split_indices(1, self.fractions, 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def generate(self) -> MultiTaskTensorDataset:
        """All rows, deterministic in ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        directions = task_directions(self.num_features, len(self.tasks), self.correlation, self.scale, gen)
        x = torch.randn(self.num_samples, self.num_features, generator=gen)
        signals = latent_signals(x, directions, self.num_sin, gen)
        targets = {}
        for i, spec in enumerate(self.tasks):
            target = _label(spec, signals[:, i], self.noise, gen)
            targets[spec.name] = _drop_labels(target, self.missing_rate, gen) if self.missing_rate else target
        return MultiTaskTensorDataset(x, targets)

    def build_datasets(self) -> dict[str, Dataset]:
        return split_generated(self.generate(), self.fractions, self.seed)
