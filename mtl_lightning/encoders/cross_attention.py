"""Cross-task attention: each task's features attend over every task's features before its head.

A shared MLP trunk gives ``h``; a projection per task gives task features ``p_t = P_t h``; one multi-head
attention over the task axis (queries, keys and values from the ``p_s``, shared weights) lets task ``t`` read
what the others computed: ``z_t = LN(p_t + sum_s a_ts V p_s)``, with ``a_t = softmax_s(q_t . k_s / sqrt(d))``. In
the spirit of the attention-based task-interaction modules of dense multi-task networks (PAD-Net, MTI-Net,
InvPT), on per-sample features. The per-pair weights ``a_ts`` are logged, so one can see which tasks read which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import check_count, check_mlp_args, check_widths, flat_features, mlp, zero_logs
from mtl_lightning.encoders.per_task import PerTaskEncoder
from mtl_lightning.errors import ConfigError


class CrossTaskAttention(PerTaskEncoder):
    """A shared trunk, one projection per task, and attention across the tasks' features; ``{task: z_t}``.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        hidden: Widths of the shared MLP trunk; the last is the width of every task's features.
        num_heads: Attention heads; must divide ``hidden[-1]``.
        include_self: Task ``t`` attends to its own features too; ``False`` lets it read only the other tasks
            (needs two tasks or more).
        dropout: Dropout in the trunk and on the attention weights.
        norm: ``none``, ``batch`` or ``layer`` normalisation in the trunk.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.

    ``training_logs()`` (logged as ``train/encoder/...``) reports ``attention/<task>/<other>``: the mean weight,
    over the last training batch and the heads, that ``task`` gives ``other`` (each task's weights sum to 1).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (128, 64),
        num_heads: int = 4,
        include_self: bool = True,
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        widths = check_widths(self.owner, "hidden", hidden, "[128, 64]")
        self.num_heads = check_count(self.owner, "num_heads", num_heads, 1, "e.g. num_heads: 4")
        if widths[-1] % self.num_heads:
            raise ConfigError(f"{self.owner}: num_heads ({num_heads}) must divide the last hidden width ({widths[-1]})")
        self.include_self = include_self
        self.task_features = widths[-1]
        self.trunk = mlp(flat_features(self.owner, input_shape), widths, dropout, norm, activation)
        self.projections = nn.ModuleDict()
        # Written out rather than nn.MultiheadAttention, which uses its projections' weights outside their own
        # forward: TorchJD's autogram Gramian (gramian: autogram) hooks module calls and would miss them.
        width = self.task_features
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.attention_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(self.task_features)
        self._last_attention: Tensor | None = None

    def bind_parts(self, names: list[str]) -> None:
        """One projection per task: kept tasks keep theirs, new tasks get a new one, removed tasks lose theirs."""
        if not self.include_self and len(names) < 2:
            raise ConfigError(
                f"{self.owner}: include_self: false lets a task read only the other tasks, and there is only "
                f"{names}; add a task or set include_self: true"
            )
        width = self.task_features
        self.projections = self.per_task(self.projections, lambda _: nn.Linear(width, width))
        self._last_attention = None

    def fsdp_units(self) -> list[nn.Module]:
        """The trunk (the projections and the attention are small)."""
        return [self.trunk]

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x.flatten(1))
        p = torch.stack([proj(h) for proj in self.projections.values()], dim=1)  # (N, T, D)
        n, t, d = p.shape
        q, k, v = (
            proj(p).view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)
            for proj in (self.query, self.key, self.value)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.num_heads)  # (N, heads, T, T): T is small
        if not self.include_self:  # a task may not attend to itself: the diagonal
            scores = scores.masked_fill(torch.eye(t, dtype=torch.bool, device=p.device), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if self.training:  # a reference only: the means are taken in training_logs, on logging steps
            self._last_attention = weights.detach().mean(dim=1)  # (N, T, T): row t = what task t reads
        mixed = self.out((self.attention_dropout(weights) @ v).transpose(1, 2).reshape(n, t, d))
        z = self.norm(p + mixed)
        return {name: z[:, i] for i, name in enumerate(self.task_names)}

    def training_logs(self) -> dict[str, Tensor]:
        names = self.task_names
        weights = self._last_attention
        if weights is None or weights.shape[1] != len(names):
            return zero_logs([f"attention/{t}/{s}" for t in names for s in names], self)
        mean = weights.float().mean(dim=0)  # (T, T)
        return {f"attention/{t}/{s}": mean[i, j] for i, t in enumerate(names) for j, s in enumerate(names)}
