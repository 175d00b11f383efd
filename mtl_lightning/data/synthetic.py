"""Synthetic multi-task data with a task-relatedness knob, after the synthetic study of the MMoE paper.

Ma et al. (2018), "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
section 3.2: each task t has a weight vector ``w_t = c (sqrt(rho) u_0 + sqrt(1 - rho) u_t)`` built from a shared
unit vector ``u_0`` and a task-specific one ``u_t`` (all orthonormal), so ``cos(w_s, w_t) = rho`` for every pair.
The latent signal is ``s_t = w_t.x + sum_i sin(alpha_i w_t.x + beta_i)`` with ``alpha, beta`` shared by all tasks;
targets add Gaussian noise. Each task's kind turns its signal into a label: regression keeps the value, binary
thresholds it at its median, multiclass cuts it into equal-frequency bins, multilabel thresholds noisy copies.

With ``groups`` the tasks form clusters of known structure instead: each group ``g`` has its own shared unit vector
``u_g`` and its tasks get ``w_t = c (sqrt(rho) u_g + sqrt(1 - rho) u_t)``, so ``cos(w_s, w_t) = rho`` inside a group
and exactly 0 across groups (every ``u`` is orthonormal to every other). For checking task-grouping methods
(:mod:`mtl_lightning.affinity`) against the grouping planted in the data.
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


def parse_groups(groups: Sequence[Sequence[str]], names: Sequence[str]) -> list[int]:
    """The group index of each task of ``names`` (in that order), from ``groups`` given by task names.

    Every task must be in exactly one group; a task alone is a group of one.
    """
    if isinstance(groups, (str, bytes)) or not all(
        isinstance(g, Sequence) and not isinstance(g, (str, bytes)) for g in groups
    ):
        raise DataError(f"groups must be a list of lists of task names, e.g. [[a, b], [c, d]]; got {groups!r}")
    if not groups:
        raise DataError("groups is empty: give a list of lists of task names, e.g. [[a, b], [c, d]], or leave it out")
    index: dict[str, int] = {}
    for g, group in enumerate(groups):
        if not group:
            raise DataError(f"groups[{g}] is empty: every group needs at least one task")
        for name in group:
            if name not in names:
                raise DataError(f"groups[{g}] names unknown task {name!r}; the tasks are {list(names)}")
            if name in index:
                where = "twice in that group" if index[name] == g else f"in groups[{index[name]}] and groups[{g}]"
                raise DataError(f"task {name!r} is {where}; put every task in exactly one group")
            index[name] = g
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(
            f"tasks {missing} are in no group; put every task in exactly one group (a task alone is a group of "
            f"one, e.g. [{missing[0]}])"
        )
    return [index[n] for n in names]


def grouped_task_directions(
    num_features: int, group_of: Sequence[int], correlation: float, scale: float, gen: Generator
) -> Tensor:
    """``(T, d)`` weight vectors with cosine ``correlation`` inside a group and 0 across (``group_of[t]``: t's group)."""
    if not 0.0 <= correlation <= 1.0:
        raise DataError(f"correlation must be in [0, 1], got {correlation}")
    num_groups, num_tasks = max(group_of) + 1, len(group_of)
    if num_features < num_groups + num_tasks:
        raise DataError(
            f"num_features must be >= number of groups + number of tasks ({num_groups + num_tasks}) for "
            f"orthogonal groups, got {num_features}"
        )
    basis, _ = torch.linalg.qr(torch.randn(num_features, num_groups + num_tasks, generator=gen, dtype=torch.float64))
    shared = basis[:, list(group_of)].T  # u_g of each task's group
    own = basis[:, num_groups:].T
    return (scale * (correlation**0.5 * shared + (1 - correlation) ** 0.5 * own)).float()


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
        correlation: Pairwise cosine similarity of the task weight vectors (inside a group, with ``groups``).
        scale: Norm ``c`` of the weight vectors.
        num_sin: Number of sine terms that make the tasks non-linear (10 in the paper).
        noise: Standard deviation of the label noise.
        missing_rate: Fraction of rows whose label is missing, per task (NaN or -100).
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for testing.
        groups: Task names in groups, e.g. ``[[a, b], [c, d]]``: cosine ``correlation`` inside a group, 0 across
            groups. Every task in exactly one group. None (default): every pair of tasks at ``correlation``.
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
        groups: Sequence[Sequence[str]] | None = None,
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
        self.groups = None if groups is None else [list(g) for g in groups]
        self.group_of = None if groups is None else parse_groups(groups, [s.name for s in self.tasks])
        # Fail at construction, not at setup, on impossible settings.
        self._directions(torch.Generator().manual_seed(0))
        split_indices(1, self.fractions, 0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def _directions(self, gen: Generator) -> Tensor:
        if self.group_of is None:
            return task_directions(self.num_features, len(self.tasks), self.correlation, self.scale, gen)
        return grouped_task_directions(self.num_features, self.group_of, self.correlation, self.scale, gen)

    def generate(self) -> MultiTaskTensorDataset:
        """All rows, deterministic in ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        directions = self._directions(gen)
        x = torch.randn(self.num_samples, self.num_features, generator=gen)
        signals = latent_signals(x, directions, self.num_sin, gen)
        targets = {}
        for i, spec in enumerate(self.tasks):
            target = _label(spec, signals[:, i], self.noise, gen)
            targets[spec.name] = _drop_labels(target, self.missing_rate, gen) if self.missing_rate else target
        return MultiTaskTensorDataset(x, targets)

    def build_datasets(self) -> dict[str, Dataset]:
        return split_generated(self.generate(), self.fractions, self.seed)
