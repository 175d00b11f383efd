"""Partial sharing: a shared MLP bottom and one MLP tower per task (the "shared-bottom" model).

Caruana, "Multitask Learning", Machine Learning 28 (1997): hidden layers shared by all tasks, task-specific layers on
top. It is the baseline of MMoE (Ma et al. 2018) and PLE (Tang et al. 2020) under the name "shared-bottom".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import (
    check_count,
    check_mlp_args,
    check_widths,
    flat_features,
    mlp,
)
from mtl_lightning.encoders.per_task import PerTaskEncoder
from mtl_lightning.errors import ConfigError


class SharedBottom(PerTaskEncoder):
    """``z_t = tower_t(bottom(x))``: the ``shared`` layers are common to all tasks, the ``tower`` layers are per task.

    Every layer is ``Linear -> norm -> activation -> dropout``. ``tower: []`` is hard sharing (every task reads the
    bottom's output), ``shared: []`` gives one independent network per task.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        shared: Widths of the shared layers.
        tower: Widths of each task's tower; the last one (or the bottom's, without a tower) is the task's
            representation size.
        dropout: Dropout after each layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation after each linear layer.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        shared: Sequence[int] = (256, 128),
        tower: Sequence[int] = (64,),
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        shared = check_widths(self.owner, "shared", shared, "[256, 128]", allow_empty=True)
        tower = check_widths(self.owner, "tower", tower, "[64]", allow_empty=True)
        if not shared and not tower:
            raise ConfigError(
                f"{self.owner}: shared and tower are both empty; give at least one layer, e.g. shared: [256]"
            )
        self.in_features = flat_features(self.owner, input_shape)
        self.shared_widths, self.tower_widths = shared, tower
        self._mlp_args: dict[str, Any] = {"dropout": dropout, "norm": norm, "activation": activation}
        self.flatten = nn.Flatten()
        self.bottom = mlp(self.in_features, shared, **self._mlp_args) if shared else nn.Identity()
        self.bottom_features = shared[-1] if shared else self.in_features
        self.towers: nn.ModuleDict | None = nn.ModuleDict() if tower else None
        self.task_features = tower[-1] if tower else self.bottom_features

    def bind_parts(self, names: list[str]) -> None:
        """One tower per task: kept tasks keep theirs (and its weights), new tasks get a new one."""
        if self.towers is not None:
            self.towers = self.per_task(
                self.towers, lambda _: mlp(self.bottom_features, self.tower_widths, **self._mlp_args)
            )

    def fsdp_units(self) -> list[nn.Module]:
        """The bottom and each tower."""
        units = [self.bottom] if self.shared_widths else []
        return units + (list(self.towers.values()) if self.towers is not None else [])

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        h = self.bottom(self.flatten(x) if x.ndim > 2 else x)
        if self.towers is None:
            return dict.fromkeys(self.task_names, h)
        return {name: tower(h) for name, tower in self.towers.items()}


class PartialSharing(SharedBottom):
    """:class:`SharedBottom` described as one stack of widths and how many of its first layers are shared.

    ``hidden: [256, 128, 64], shared_layers: 2`` is ``shared: [256, 128], tower: [64]``; sweep ``shared_layers`` from
    ``0`` (independent networks) to ``len(hidden)`` (hard sharing) to choose where the tasks branch.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        hidden: Widths of every layer, bottom to top.
        shared_layers: How many of the first layers all tasks share.
        dropout, norm, activation: As in :class:`SharedBottom`.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (256, 128, 64),
        shared_layers: int = 2,
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        hidden = check_widths("PartialSharing", "hidden", hidden, "[256, 128, 64]")
        check_count("PartialSharing", "shared_layers", shared_layers, 0)
        if shared_layers > len(hidden):
            raise ConfigError(
                f"PartialSharing: shared_layers ({shared_layers}) exceeds the {len(hidden)} layers of hidden; use "
                f"0..{len(hidden)}"
            )
        super().__init__(input_shape, hidden[:shared_layers], hidden[shared_layers:], dropout, norm, activation)
