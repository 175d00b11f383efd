"""Multi-Task Attention Network (MTAN): a shared conv backbone and per-task soft attention over its features.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. Each backbone stage ``j`` has an
inner feature map ``u_j`` (after its first conv) and an output ``p_j`` (after its second conv). Task ``t``'s attention
module at stage ``j`` computes a mask ``a_j = h_j(g_j([u_j; f_j(a^_{j-1})]))`` (``g``: 1x1 conv, norm, activation;
``h``: 1x1 conv, norm, sigmoid; at the first stage the input is ``u_1`` alone) and attends ``a^_j = a_j * p_j``. The
attention stream's ``f_j`` (2x2 max pooling to the stage's size, then 3x3 conv, norm, activation) is shared by the
tasks, as in the authors' code; ``g`` and ``h`` are the task's own. (The authors' code convolves before pooling; pooling
first gives the same shapes at a quarter of the cost, which matters since ``f_j`` runs once per task.) Task ``t``'s
representation is its last attended map, average-pooled to a small grid and flattened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import (
    check_conv_args,
    check_pooled_size,
    check_widths,
    conv_block,
    conv_norm,
    image_shape,
    pool_features,
    zero_logs,
)
from mtl_lightning.encoders.mlp import ACTIVATIONS
from mtl_lightning.encoders.per_task import PerTaskEncoder


class BackboneStage(nn.Module):
    """Two ``conv -> norm -> activation`` layers; returns the inner map ``u`` and the output ``p``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, norm: str, activation: str):
        super().__init__()
        self.first = conv_block(c_in, c_out, kernel_size, norm, activation, pool=False)
        self.second = conv_block(c_out, c_out, kernel_size, norm, activation, pool=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.first(x)
        return u, self.second(u)


class AttentionModule(nn.Module):
    """A task's soft attention mask at one stage: ``sigmoid(norm(conv1x1(act(norm(conv1x1(input))))))``."""

    def __init__(self, c_in: int, channels: int, norm: str, activation: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, channels, 1),
            conv_norm(norm, channels),
            ACTIVATIONS[activation](),
            nn.Conv2d(channels, channels, 1),
            conv_norm(norm, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MTAN(PerTaskEncoder):
    """Shared conv backbone, one attention module per task and stage; returns ``{task: pooled attended features}``.

    Args:
        input_shape: ``(C, H, W)``, linked from an image data module.
        channels: Output channels of each backbone stage (2x2 max pooling between stages).
        kernel_size: Odd kernel size of the backbone convolutions (padding keeps the spatial size).
        pooled_size: Side of the grid each task's last attended map is averaged to; the representation has
            ``channels[-1] * pooled_size**2`` features. 1 is global average pooling, which forgets where things are
            (tasks about positions then fail); a small grid keeps a coarse layout.
        norm: ``group`` (GroupNorm, the default: independent of the batch, so it is the same in training and
            evaluation and has no statistics to synchronise under DDP), ``batch`` (the paper's) or ``none``.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.

    ``training_logs()``: ``attention_mean/<task>``, the mean of the task's masks over the stages in the last training
    batch (0.5 at initialisation; towards 1 the task keeps all the shared features, towards 0 it filters them).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        pooled_size: int = 4,
        norm: Literal["none", "batch", "group"] = "group",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_conv_args(self.owner, norm, activation, kernel_size)
        self.channels = check_widths(self.owner, "channels", channels, "[16, 32]")
        c_in = image_shape(self.owner, input_shape, len(self.channels))[0]
        self.pooled_size = check_pooled_size(self.owner, pooled_size)
        self.task_features = self.channels[-1] * self.pooled_size**2
        self.norm, self.activation = norm, activation
        ins = [c_in, *self.channels[:-1]]
        self.stages = nn.ModuleList(
            BackboneStage(i, o, kernel_size, norm, activation) for i, o in zip(ins, self.channels, strict=True)
        )
        self.pool = nn.MaxPool2d(2)
        # f_j for j >= 1: from stage j - 1's attended map to stage j's size and channels (shared by the tasks).
        self.attention_stream = nn.ModuleList(
            nn.Sequential(
                nn.MaxPool2d(2), conv_block(self.channels[j - 1], self.channels[j], 3, norm, activation, False)
            )
            for j in range(1, len(self.channels))
        )
        self.attention = nn.ModuleDict()
        self._last_means: Tensor | None = None

    def _task_attention(self) -> nn.ModuleList:
        return nn.ModuleList(
            AttentionModule(c if j == 0 else 2 * c, c, self.norm, self.activation) for j, c in enumerate(self.channels)
        )

    def bind_parts(self, names: list[str]) -> None:
        """One attention module per task and stage; kept tasks keep theirs."""
        self.attention = self.per_task(self.attention, lambda _: self._task_attention())
        self._last_means = None

    def fsdp_units(self) -> list[nn.Module]:
        """Each backbone stage."""
        return list(self.stages)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        attended: dict[str, Tensor] = {}
        means = []
        h = x
        for j, stage in enumerate(self.stages):
            if j:
                h = self.pool(h)
            u, p = stage(h)
            h = p
            for t, modules in self.attention.items():
                inp = u if j == 0 else torch.cat([u, self.attention_stream[j - 1](attended[t])], dim=1)
                mask = cast(nn.ModuleList, modules)[j](inp)
                attended[t] = mask * p
                if self.training:
                    means.append(mask.detach().float().mean())
        if self.training:
            self._last_means = torch.stack(means).view(len(self.stages), len(self.task_names)).mean(0)
        return {t: pool_features(a, self.pooled_size) for t, a in attended.items()}

    def training_logs(self) -> dict[str, Tensor]:
        keys = [f"attention_mean/{t}" for t in self.task_names]
        if self._last_means is None or self._last_means.numel() != len(keys):
            return zero_logs(keys, self)
        return {k: self._last_means[i] for i, k in enumerate(keys)}
