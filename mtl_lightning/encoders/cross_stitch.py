"""Cross-stitch networks: one column per task, mixed after every layer by learned T x T cross-stitch units.

Misra, Shrivastava, Gupta and Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016. After layer ``l``
the activations ``x_s`` of the task columns are replaced by ``x~_t = sum_s alpha_ts x_s``; ``alpha`` starts near the
identity (``alpha_same`` on the diagonal, the rest spread evenly over the other tasks so each row sums to 1, the
paper's convex initialisation) and is learned with the columns. ``alpha_same: 1`` starts from independent columns.
The paper also gives the units a larger learning rate (x10^2..10^3); give them their own optimizer parameter group if
you want that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, cast

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders._common import (
    check_conv_args,
    check_mlp_args,
    check_pooled_size,
    check_widths,
    conv_block,
    flat_features,
    image_shape,
    pool_features,
    rebind,
)
from mtl_lightning.encoders.mlp import ACTIVATIONS, NORMS
from mtl_lightning.encoders.per_task import PerTaskEncoder
from mtl_lightning.errors import ConfigError


class StitchRow(nn.Module):
    """Task ``t``'s row of a cross-stitch unit: one learned weight ``from_<s>`` (shape ``(1,)``: FSDP2 shards no
    0-d parameter) per source task ``s``.

    Its own forward does the mixing (``sum_s alpha_ts x_s``), so every parameter is used by the module that owns it
    (what TorchJD's autogram engine needs), and the parameter names are task names, so a checkpoint's entries load
    by name into a model with other tasks (``init_from``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def weight(self, source: str) -> Tensor:
        return getattr(self, f"from_{source}")

    def set_sources(self, sources: list[str], initial: dict[str, float], like: Tensor | None) -> None:
        """Keep the weights of kept sources, add new ones at ``initial[s]``, drop the others."""
        for s in self.sources:
            if s not in sources:
                delattr(self, f"from_{s}")
        for s in sources:
            if s not in self.sources:
                value = torch.tensor([initial[s]])
                if like is not None:
                    value = value.to(like.device, like.dtype)
                self.register_parameter(f"from_{s}", nn.Parameter(value))
        self.sources = list(sources)

    def forward(self, stacked: Tensor) -> Tensor:
        """``stacked``: ``(T, N, ...)`` in the order of ``sources``; returns ``(N, ...)``."""
        weights = torch.cat([self.weight(s) for s in self.sources]).to(stacked.dtype)
        return torch.einsum("s,s...->...", weights, stacked)


class CrossStitchUnit(nn.Module):
    """A learned ``T x T`` matrix ``alpha`` applied across the task axis, ``(T, N, ...) -> (T, N, ...)``, stored as one
    :class:`StitchRow` per task.

    :meth:`bind_tasks` keeps the entries between kept tasks; the entries of a new task start from the initialisation
    (``alpha_same`` on the diagonal, ``(1 - alpha_same) / (T - 1)`` elsewhere; 1 when there is one task).
    """

    def __init__(self, alpha_same: float):
        super().__init__()
        self.alpha_same = alpha_same
        self.rows = nn.ModuleDict()

    @property
    def task_names(self) -> list[str]:
        return list(self.rows)

    @property
    def task_rows(self) -> Mapping[str, StitchRow]:
        """The rows by task (``self.rows`` with its value type, which a ModuleDict does not carry)."""
        return cast(Mapping[str, StitchRow], self.rows)

    def bind_tasks(self, names: list[str], like: Tensor | None = None) -> None:
        off = (1.0 - self.alpha_same) / (len(names) - 1) if len(names) > 1 else 0.0
        self.rows = rebind(self, self.rows, names, lambda _: StitchRow())
        for t, row in self.task_rows.items():
            initial = {s: (self.alpha_same if len(names) > 1 else 1.0) if s == t else off for s in names}
            row.set_sources(list(names), initial, like)

    @property
    def alpha(self) -> Tensor:
        """The ``T x T`` matrix (rows: the task written to, columns: the task read from)."""
        return torch.stack([torch.cat([row.weight(s) for s in row.sources]) for row in self.task_rows.values()])

    def forward(self, stacked: Tensor) -> Tensor:
        return torch.stack([row(stacked) for row in self.rows.values()])


class _CrossStitchBase(PerTaskEncoder):
    """Columns of blocks (``self.blocks[l][task]``), a cross-stitch unit after every block, a final per-column map."""

    def _setup_units(self, num_layers: int, alpha_same: float) -> None:
        if not 0.0 <= alpha_same <= 1.0:
            raise ConfigError(f"{self.owner}: alpha_same must be in [0, 1] (0.9 in the paper), got {alpha_same}")
        self.alpha_same = alpha_same
        self.blocks = nn.ModuleList(nn.ModuleDict() for _ in range(num_layers))
        self.stitches = nn.ModuleList(CrossStitchUnit(alpha_same) for _ in range(num_layers))

    def _build_block(self, layer: int) -> nn.Module:
        raise NotImplementedError

    # Typed views of the ModuleLists (which are typed as holding any Module).
    def _columns(self) -> list[nn.ModuleDict]:
        return cast(list[nn.ModuleDict], list(self.blocks))

    def _units(self) -> list[CrossStitchUnit]:
        return cast(list[CrossStitchUnit], list(self.stitches))

    def _finish(self, h: Tensor) -> Tensor:
        return h

    def bind_parts(self, names: list[str]) -> None:
        """One column per task; kept tasks keep their columns, the stitch matrices keep their entries between them."""
        for layer in range(len(self.blocks)):

            def build(_: str, layer: int = layer) -> nn.Module:
                return self._build_block(layer)

            column = self.per_task(self._columns()[layer], build)
            self.blocks[layer] = column
            self._units()[layer].bind_tasks(names, like=next(column.parameters()))

    def fsdp_units(self) -> list[nn.Module]:
        """Every block of every column."""
        return [block for blocks in self._columns() for block in blocks.values()]

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        hs: list[Tensor] | Tensor = [x] * len(self.task_names)
        for blocks, stitch in zip(self._columns(), self.stitches, strict=True):
            hs = stitch(torch.stack([block(h) for block, h in zip(blocks.values(), hs, strict=True)])).unbind(0)
        return {t: self._finish(h) for t, h in zip(self.task_names, hs, strict=True)}

    def training_logs(self) -> dict[str, Tensor]:
        """``stitch_diagonal/<l>``: mean diagonal of layer ``l``'s unit (1 = the tasks stay separate), and
        ``stitch_diagonal``, their mean; read from the parameters, so the same before and after a forward."""
        diagonals = [
            torch.cat([r.weight(t) for t, r in s.task_rows.items()]).detach().float().mean() for s in self._units()
        ]
        logs = {f"stitch_diagonal/{i}": d for i, d in enumerate(diagonals)}
        logs["stitch_diagonal"] = torch.stack(diagonals).mean()
        return logs


class CrossStitch(_CrossStitchBase):
    """Cross-stitch network of MLP columns for flat inputs; returns ``{task: column output}``.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        hidden: Widths of each column's layers (``Linear -> norm -> activation -> dropout``); a cross-stitch unit
            follows every layer; the last width is the representation size.
        alpha_same: Initial diagonal of the cross-stitch units (0.9 in the paper; 1 = independent columns).
        dropout: Dropout after each layer.
        norm: ``none``, ``batch`` or ``layer`` normalisation after each linear layer.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (128, 64),
        alpha_same: float = 0.9,
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_mlp_args(self.owner, norm, activation, dropout)
        self.hidden = check_widths(self.owner, "hidden", hidden, "[128, 64]")
        self.in_features = flat_features(self.owner, input_shape)
        self._layer_args = (dropout, norm, activation)
        self.task_features = self.hidden[-1]
        self._setup_units(len(self.hidden), alpha_same)

    def _build_block(self, layer: int) -> nn.Module:
        dropout, norm, activation = self._layer_args
        width = self.hidden[layer]
        layers: list[nn.Module] = [nn.Linear(self.hidden[layer - 1] if layer else self.in_features, width)]
        norm_layer = NORMS[norm]
        if norm_layer is not None:
            layers.append(norm_layer(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers)

    def forward_tasks(self, x: Tensor) -> dict[str, Tensor]:
        return super().forward_tasks(x.flatten(1))


class CrossStitchConv(_CrossStitchBase):
    """Cross-stitch network of small conv columns for ``(C, H, W)`` images; returns ``{task: pooled features}``.

    Each stage of a column is ``Conv2d -> norm -> activation -> 2x2 max pooling`` (no pooling after the last stage);
    a cross-stitch unit follows every stage, as the paper places them after every pooling layer. The last stage's
    features are average-pooled to a ``pooled_size x pooled_size`` grid and flattened.

    Args:
        input_shape: ``(C, H, W)``, linked from an image data module.
        channels: Output channels of each stage.
        kernel_size: Odd kernel size of the convolutions (padding keeps the spatial size).
        alpha_same: Initial diagonal of the cross-stitch units (0.9 in the paper; 1 = independent columns).
        pooled_size: Side of the grid the last feature map is averaged to; the representation has
            ``channels[-1] * pooled_size**2`` features. 1 is global average pooling, which forgets where things are
            (tasks about positions then fail); a small grid keeps a coarse layout.
        norm: ``group`` (GroupNorm, the default: independent of the batch, so it is the same in training and
            evaluation and has no statistics to synchronise under DDP), ``batch`` or ``none``.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (16, 32),
        kernel_size: int = 3,
        alpha_same: float = 0.9,
        pooled_size: int = 4,
        norm: Literal["none", "batch", "group"] = "group",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        check_conv_args(self.owner, norm, activation, kernel_size)
        self.channels = check_widths(self.owner, "channels", channels, "[16, 32]")
        self.in_channels = image_shape(self.owner, input_shape, len(self.channels))[0]
        self.pooled_size = check_pooled_size(self.owner, pooled_size)
        self._stage_args = (kernel_size, norm, activation)
        self.task_features = self.channels[-1] * self.pooled_size**2
        self._setup_units(len(self.channels), alpha_same)

    def _build_block(self, layer: int) -> nn.Module:
        c_in = self.channels[layer - 1] if layer else self.in_channels
        pool = layer < len(self.channels) - 1
        return conv_block(c_in, self.channels[layer], *self._stage_args, pool=pool)

    def _finish(self, h: Tensor) -> Tensor:
        return pool_features(h, self.pooled_size)
