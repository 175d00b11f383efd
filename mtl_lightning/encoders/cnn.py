"""A small LeNet-style convolutional encoder for images ``(C, H, W)``: MNIST-sized digits or small RGB pictures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError

POOLINGS = ("flatten", "avg")


class SmallCNN(nn.Module):
    """``[Conv -> (BatchNorm) -> ReLU -> MaxPool 2] * len(channels)``, then flatten or global average pooling, then
    an optional ``Linear -> ReLU -> Dropout`` whose width is the representation ``out_features``.

    With ``channels: [10, 20]``, ``kernel_size: 5``, ``padding: 0``, ``norm: none`` and ``fc_width: 50`` it is the
    LeNet-style shared encoder that Sener & Koltun (2018) use on MultiMNIST (1x28x28 -> 20x4x4 -> 50). The defaults
    (two size-preserving 3x3 stages of 32 and 64 channels with BatchNorm, flatten, 128 features) suit 1x28x28 and
    3x32x32 inputs.

    Args:
        input_shape: ``(C, H, W)`` of one image (linked from the data module).
        channels: Output channels of each conv stage; every stage halves the height and width (max pooling).
        kernel_size: Side of the square conv kernels.
        padding: Zero padding of each conv; None: ``kernel_size // 2``, which keeps the size before pooling.
        norm: ``batch`` (BatchNorm2d after each conv) or ``none``.
        pooling: ``flatten`` the last feature map (keeps where things are: positions matter for many tasks) or
            ``avg``: global average pooling (one value per channel, any input size).
        fc_width: Width of the fully connected layer on top (the representation); None: the flattened or pooled
            conv features are the representation.
        dropout: Dropout after the fully connected layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        kernel_size: int = 3,
        padding: int | None = None,
        norm: Literal["batch", "none"] = "batch",
        pooling: Literal["flatten", "avg"] = "flatten",
        fc_width: int | None = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        height, width = _check_args(input_shape, channels, kernel_size, padding, norm, pooling, fc_width, dropout)
        self.input_shape = tuple(int(d) for d in input_shape)
        stages: list[nn.Module] = []
        in_channels = self.input_shape[0]
        for out_channels in channels:
            stage: list[nn.Module] = [
                nn.Conv2d(in_channels, int(out_channels), kernel_size, padding=padding, bias=norm != "batch")
            ]
            if norm == "batch":
                stage.append(nn.BatchNorm2d(int(out_channels)))
            stage += [nn.ReLU(), nn.MaxPool2d(2)]
            stages.append(nn.Sequential(*stage))
            in_channels = int(out_channels)
            height, width = (height + 2 * padding - kernel_size + 1) // 2, (width + 2 * padding - kernel_size + 1) // 2
        self.stages = nn.Sequential(*stages)
        if pooling == "avg":
            self.pool: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = in_channels
        else:
            self.pool = nn.Flatten()
            features = in_channels * height * width
        self.feature_shape = (in_channels, height, width)  # of the last conv stage
        if fc_width is None:
            self.fc: nn.Module = nn.Identity()
            self.out_features = features
        else:
            fc: list[nn.Module] = [nn.Linear(features, fc_width), nn.ReLU()]
            if dropout:
                fc.append(nn.Dropout(dropout))
            self.fc = nn.Sequential(*fc)
            self.out_features = int(fc_width)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"SmallCNN was built for images of shape (N, {', '.join(map(str, self.input_shape))}) but got "
                f"{tuple(x.shape)}; check the data module's image size and channels"
            )
        return self.fc(self.pool(self.stages(x)))


def _check_args(
    input_shape: Sequence[int],
    channels: Sequence[int],
    kernel_size: int,
    padding: int,
    norm: str,
    pooling: str,
    fc_width: int | None,
    dropout: float,
) -> tuple[int, int]:
    """Raise one ConfigError naming every bad argument; return the input's (height, width)."""
    problems = []
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ConfigError(
            f"SmallCNN: input_shape must be (channels, height, width), got {tuple(input_shape)}; use an image data "
            "module (e.g. mtl_lightning.data.SyntheticImageDataModule)"
        )
    if not channels or any(int(c) < 1 for c in channels):
        problems.append(f"channels must be a non-empty list of widths >= 1, got {list(channels)}")
    if kernel_size < 1 or padding < 0:
        problems.append(f"kernel_size must be >= 1 and padding >= 0, got {kernel_size} and {padding}")
    if norm not in ("batch", "none"):
        problems.append(f"norm must be 'batch' or 'none', got {norm!r}")
    if pooling not in POOLINGS:
        problems.append(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if fc_width is not None and fc_width < 1:
        problems.append(f"fc_width must be >= 1 or null, got {fc_width}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout}")
    if problems:
        raise ConfigError("SmallCNN: " + "; ".join(problems))
    height, width = int(input_shape[1]), int(input_shape[2])
    h, w = height, width
    for _ in channels:
        h, w = (h + 2 * padding - kernel_size + 1) // 2, (w + 2 * padding - kernel_size + 1) // 2
    if h < 1 or w < 1:
        raise ConfigError(
            f"SmallCNN: {len(channels)} conv stages (kernel {kernel_size}, padding {padding}, each followed by 2x2 "
            f"pooling) shrink a {height}x{width} image to nothing; use fewer channels entries, a smaller kernel_size "
            "or more padding"
        )
    return height, width
