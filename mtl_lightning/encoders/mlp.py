"""A multi-layer perceptron encoder for flat (tabular) inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError

NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class MLPEncoder(nn.Module):
    """``[Linear -> norm -> activation -> dropout] * len(hidden)``; the shared representation is the last block.

    Args:
        input_shape: Shape of one input sample (linked from the data module); it is flattened.
        hidden: Widths of the hidden layers; the last one is the representation size ``out_features``.
        dropout: Dropout after each block.
        norm: ``none``, ``batch`` or ``layer`` normalisation after each linear layer.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        norm: Literal["none", "batch", "layer"] = "none",
        activation: Literal["relu", "gelu", "silu", "tanh"] = "relu",
    ):
        super().__init__()
        if not hidden:
            raise ConfigError("MLPEncoder needs at least one hidden width, e.g. hidden: [256]")
        if any(int(h) < 1 for h in hidden):
            raise ConfigError(f"MLPEncoder: hidden widths must be >= 1, got {list(hidden)}")
        if norm not in NORMS or activation not in ACTIVATIONS:
            raise ConfigError(
                f"MLPEncoder: norm must be one of {list(NORMS)} and activation one of {list(ACTIVATIONS)}, "
                f"got norm={norm!r}, activation={activation!r}"
            )
        self.in_features = math.prod(int(d) for d in input_shape)
        layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
        width = self.in_features
        for h in hidden:
            layers.append(nn.Linear(width, int(h)))
            norm_layer = NORMS[norm]
            if norm_layer is not None:
                layers.append(norm_layer(int(h)))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
