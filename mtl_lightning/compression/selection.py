"""Pick the layers a compression method works on, by module name pattern and layer type."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TypeVar

import torch.nn as nn

from mtl_lightning.errors import ConfigError

# MultiheadAttention keeps its output projection as this Linear subclass and reads `.weight` directly instead of
# calling the layer, so a forward pre-hook (pruning) never runs on it and a replaced module (SVD) is never used.
_SKIPPED = (nn.modules.linear.NonDynamicallyQuantizableLinear,)
DEFAULT_PATTERNS = ("encoder.*", "heads.*")

M = TypeVar("M", bound=nn.Module)


def candidate_layers(model: nn.Module, types: tuple[type[M], ...]) -> dict[str, M]:
    """Every sub-module of ``model`` that is an instance of ``types`` (MultiheadAttention's projection excluded)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and isinstance(module, types) and not isinstance(module, _SKIPPED)
    }


def select_layers(model: nn.Module, patterns: Sequence[str], types: tuple[type[M], ...], what: str) -> dict[str, M]:
    """The layers of ``types`` whose names match any of ``patterns`` (shell-style, e.g. ``encoder.*``).

    Every pattern must match at least one layer: a typo would otherwise silently compress nothing. ``what`` names
    the setting in the error message.
    """
    candidates = candidate_layers(model, types)
    kinds = "/".join(t.__name__ for t in types)
    if not patterns:
        raise ConfigError(f"{what}: give at least one layer name pattern, e.g. 'encoder.*'")
    unmatched = [p for p in patterns if not any(fnmatchcase(name, p) for name in candidates)]
    if unmatched:
        listing = ", ".join(candidates) or "none"
        raise ConfigError(
            f"{what}: pattern(s) {unmatched} match no {kinds} layer of this model; its {kinds} layers are: {listing}"
        )
    return {name: m for name, m in candidates.items() if any(fnmatchcase(name, p) for p in patterns)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the sub-module ``name`` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
