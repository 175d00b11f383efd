"""ResNet-18/34/50 image encoders that load torchvision's weight files, without needing torchvision.

The layers are torchvision's ResNet (v1.5: the stride of a bottleneck is on its 3x3 conv) with the same module
names, so ``torchvision.models.resnet18(...).state_dict()`` saved with ``torch.save`` loads here as it is (its
``fc.*`` classifier is dropped). Why not import torchvision: its PyPI wheels are built against PyPI's CUDA torch, and
on a CPU build of torch (what ``make setup`` installs without a GPU) ``import torchvision`` fails, and then so does
``import lightning``, which imports torchvision through torchmetrics whenever it is installed. Nothing is downloaded:
weights come only from a local file (``weights_path``) or are randomly initialised as torchvision does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.errors import ConfigError


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's two-conv residual block (ResNet-18/34). Out-of-place ReLU and sum (torchvision's are in place):
    same values, and safe for hooks that keep a module's output (TorchJD's autogram, gradient balancers)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's 1x1-3x3-1x1 bottleneck block (ResNet-50), stride on the 3x3 conv (ResNet v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetEncoder(nn.Module):
    """A ResNet without its classifier: images ``(N, C, H, W)`` -> ``(N, 512)`` (ResNet-18/34) or ``(N, 2048)``
    (ResNet-50) after global average pooling.

    Args:
        input_shape: ``(C, H, W)`` of one image (linked from the data module). Any size works (the pooling is
            adaptive); the stem divides it by 4 and the stages by 8 more, so 32x32 ends as 1x1 before pooling.
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        weights_path: A local file to start from, e.g. torchvision's ImageNet weights saved once with
            ``torch.save(torchvision.models.resnet18(weights="DEFAULT").state_dict(), "resnet18.pth")``, or a
            checkpoint of a ``MultiTaskModule`` with this encoder (its ``encoder.*`` weights are taken). None:
            random initialisation (torchvision's). Inputs should then be normalised as the weights expect
            (ImageNet mean and std for torchvision's).
        freeze_bn: Keep every BatchNorm in eval mode (normalising with the loaded running statistics, which are
            not updated) and its scale and shift fixed: the usual choice when fine-tuning with small batches.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18",
        weights_path: str | Path | None = None,
        freeze_bn: bool = False,
    ):
        super().__init__()
        if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
            raise ConfigError(
                f"ResNetEncoder: input_shape must be (channels, height, width), got {tuple(input_shape)}; use an "
                "image data module (e.g. mtl_lightning.data.SyntheticImageDataModule)"
            )
        if arch not in ARCHS:
            raise ConfigError(f"ResNetEncoder: arch must be one of {list(ARCHS)}, got {arch!r}")
        block, depths = ARCHS[arch]
        self.arch = arch
        self.in_channels = int(input_shape[0])
        self.freeze_bn = freeze_bn
        self.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        layers = []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    _conv1x1(inplanes, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion)
                )
            blocks = [block(inplanes, planes, stride, downsample)]
            inplanes = planes * block.expansion
            blocks += [block(inplanes, planes) for _ in range(1, depth)]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_features = inplanes  # torchvision's fc.in_features
        self.reset_parameters()
        if weights_path is not None:
            self.load_weights(weights_path)
        if freeze_bn:
            for module in self._batch_norms():
                module.eval()
                for param in module.parameters():
                    param.requires_grad_(False)

    def reset_parameters(self) -> None:
        """torchvision's initialisation: Kaiming-normal (fan out) convs, BatchNorm scale 1 and shift 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _batch_norms(self) -> list[nn.BatchNorm2d]:
        return [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def train(self, mode: bool = True) -> ResNetEncoder:
        super().train(mode)
        if self.freeze_bn:  # Lightning switches the model to train mode every epoch: keep the norms in eval
            for module in self._batch_norms():
                module.eval()
        return self

    def fsdp_units(self) -> list[nn.Module]:
        """The residual blocks, to shard one by one under FSDP/FSDP2 (the stem stays with the root unit)."""
        return [block for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for block in layer]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetEncoder was built for images with {self.in_channels} channel(s), (N, C, H, W), but got "
                f"{tuple(x.shape)}; check the data module's channels"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    # --------------------------------------------------------------------------------------------- weights
    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict (``fc.*`` ignored) or a MultiTaskModule checkpoint's encoder.

        A 3-channel first conv is adapted to this encoder's channels as timm does: summed over RGB for one channel
        (a grey image then gives the response of the same grey in colour), otherwise tiled and scaled by 3/C.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"ResNetEncoder: weights_path {str(path)!r} is not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(
                f"ResNetEncoder: cannot read {str(path)!r} as a state dict ({type(err).__name__}: {err}). Save "
                "the weights with torch.save(model.state_dict(), path), not the whole model"
            ) from err
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):  # a Lightning checkpoint
            state = {k.removeprefix("encoder."): v for k, v in state["state_dict"].items() if k.startswith("encoder.")}
        if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConfigError(f"ResNetEncoder: {str(path)!r} holds a {type(state).__name__}, not a state dict")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not part of it
        conv1 = state.get("conv1.weight")
        if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3 and self.in_channels != 3:
            state["conv1.weight"] = adapt_input_conv(conv1, self.in_channels)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            parts = [
                f"{label} {_first(items)}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", wrong))
                if items
            ]
            raise ConfigError(
                f"ResNetEncoder({self.arch}): {str(path)!r} does not fit: {'; '.join(parts)}. It should be the "
                f"state_dict of a torchvision {self.arch} (or of this encoder); check arch"
            )
        self.load_state_dict(state)


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A first conv's ``(out, 3, k, k)`` weight for ``in_channels`` inputs (sum for 1, tile and scale 3/C else)."""
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _first(items: list[str], n: int = 8) -> str:
    return str(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
