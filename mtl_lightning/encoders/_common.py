"""Building blocks shared by the sharing architectures: argument checks, MLP/conv blocks, per-task module dicts
that can be re-bound to a new task list, and gate statistics for ``training_logs()``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from mtl_lightning.encoders.mlp import ACTIVATIONS, NORMS, MLPEncoder
from mtl_lightning.errors import ConfigError

CONV_NORMS = ("none", "batch", "group")


def check_mlp_args(owner: str, norm: str, activation: str, dropout: float) -> None:
    """One ConfigError naming the bad MLP option and the allowed values."""
    if norm not in NORMS:
        raise ConfigError(f"{owner}: norm must be one of {list(NORMS)}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{owner}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{owner}: dropout must be in [0, 1), got {dropout}")


def check_widths(owner: str, key: str, widths: Sequence[int], example: str, allow_empty: bool = False) -> list[int]:
    """The widths as ints; a ConfigError when one is < 1, or when the list is empty and must not be."""
    widths = [int(w) for w in widths]
    if not widths and not allow_empty:
        raise ConfigError(f"{owner}: {key} needs at least one width, e.g. {key}: {example}")
    if any(w < 1 for w in widths):
        raise ConfigError(f"{owner}: {key} widths must be >= 1, got {widths}")
    return widths


def check_count(owner: str, key: str, value: int, minimum: int = 1, hint: str = "") -> int:
    if int(value) != value or value < minimum:
        raise ConfigError(f"{owner}: {key} must be an integer >= {minimum}, got {value}{'; ' + hint if hint else ''}")
    return int(value)


def flat_features(owner: str, input_shape: Sequence[int]) -> int:
    """Number of features of one flattened sample."""
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise ConfigError(f"{owner}: input_shape must be a non-empty shape of positive sizes, got {tuple(input_shape)}")
    return math.prod(int(d) for d in input_shape)


def image_shape(owner: str, input_shape: Sequence[int], stages: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of an image input, checked to survive ``stages - 1`` halvings (2x2 max pooling)."""
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ConfigError(
            f"{owner} takes images: input_shape must be (C, H, W), got {tuple(input_shape)}; pair it with image "
            "data, e.g. --data configs/data/images.yaml"
        )
    c, h, w = (int(d) for d in input_shape)
    if min(h, w) < 2 ** (stages - 1):
        raise ConfigError(
            f"{owner}: {stages} stages halve the image {stages - 1} times, too often for {h}x{w}; use fewer "
            "channels entries or larger images"
        )
    return c, h, w


def mlp(in_features: int, widths: Sequence[int], dropout: float, norm: str, activation: str) -> nn.Module:
    """``[Linear -> norm -> activation -> dropout] * len(widths)`` on flat inputs (an :class:`MLPEncoder`)."""
    return MLPEncoder((in_features,), widths, dropout, norm, activation)  # type: ignore[arg-type]


def conv_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm (up to 8 groups, as many as divide ``channels``) or nothing."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


def check_conv_args(owner: str, norm: str, activation: str, kernel_size: int) -> None:
    if norm not in CONV_NORMS:
        raise ConfigError(f"{owner}: norm must be one of {list(CONV_NORMS)}, got {norm!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{owner}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"{owner}: kernel_size must be odd and >= 1 (the padding keeps the size), got {kernel_size}")


def conv_block(c_in: int, c_out: int, kernel_size: int, norm: str, activation: str, pool: bool) -> nn.Sequential:
    """``Conv2d (same padding) -> norm -> activation`` and an optional 2x2 max pooling."""
    layers = [
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
        conv_norm(norm, c_out),
        ACTIVATIONS[activation](),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def check_pooled_size(owner: str, pooled_size: int) -> int:
    return check_count(
        owner, "pooled_size", pooled_size, 1, "1 = global average pooling, 4 = a 4x4 grid that keeps where things are"
    )


def pool_features(h: Tensor, pooled_size: int) -> Tensor:
    """``(N, C, H, W) -> (N, C * s * s)``: average pooling to an ``s x s`` grid, flattened (``s = 1``: global mean)."""
    if pooled_size == 1:
        return h.mean(dim=(-2, -1))
    return nn.functional.adaptive_avg_pool2d(h, pooled_size).flatten(1)


def check_task_names(owner: str, names: Iterable[str]) -> list[str]:
    names = list(names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{owner}.bind_tasks needs a non-empty list of distinct task names, got {names}")
    return names


def rebind(
    owner: nn.Module, current: nn.ModuleDict | None, names: Sequence[str], build: Callable[[str], nn.Module]
) -> nn.ModuleDict:
    """A ModuleDict in the order of ``names``: the modules of kept tasks (same objects, same weights), new ones from
    ``build(name)`` on the device and dtype of ``owner``'s existing parameters; dropped tasks' modules are gone."""
    current = current if current is not None else nn.ModuleDict()
    reference = next((p for p in owner.parameters() if p.is_floating_point()), None)
    modules = {}
    for name in names:
        if name in current:
            modules[name] = current[name]
        else:
            module = build(name)
            modules[name] = module.to(reference.device, reference.dtype) if reference is not None else module
    return nn.ModuleDict(modules)


def unbound(owner: str) -> RuntimeError:
    return RuntimeError(f"{owner} has no tasks yet: call bind_tasks(names) first (MultiTaskModule does it)")


# ------------------------------------------------------------------------------------------------ gate statistics
def normalised_entropy(weights: Tensor) -> Tensor:
    """Mean over rows of the entropy of each row's distribution, divided by log(E): 1 = uniform, 0 = one expert."""
    num = weights.shape[-1]
    weights = weights.float()
    if num < 2:
        return weights.new_zeros(())
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
    return entropy / math.log(num)


def coefficient_of_variation(load: Tensor) -> Tensor:
    """``std / mean`` of the per-expert load (0 = perfectly balanced; sqrt(E - 1) = one expert takes it all)."""
    if load.numel() < 2:
        return load.new_zeros(())
    return load.std(unbiased=False) / load.mean().clamp_min(1e-12)


def zero_logs(keys: Iterable[str], module: nn.Module) -> dict[str, Tensor]:
    """Zeros under every key, on the module's device: what ``training_logs()`` reports before a training forward."""
    reference = next(module.parameters(), None)
    return {k: torch.zeros((), device=reference.device if reference is not None else None) for k in keys}
