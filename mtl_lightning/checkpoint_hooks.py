"""Hooks that prepare a model for a checkpoint before Lightning loads its weights, found by the checkpoint's keys.

A tool that writes checkpoints the plain model cannot load as they are (compression rebuilds factorised or int8
layers) records its changes under a top-level key and names a hook for that key. The module runs the hooks of the
keys a checkpoint holds, so it never imports the tools: they come in through the ``mtl_lightning.checkpoint_hooks``
entry-point group of their package (``pyproject.toml``), read when a checkpoint loads. No registry lives in this
module: what is installed is what runs, in every process alike.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import torch.nn as nn

LoadHook = Callable[[nn.Module, dict[str, Any], bool], None]
"""``hook(model, checkpoint, fitting)``: change ``model`` (or refuse the checkpoint) before its weights load."""
ENTRY_POINT_GROUP = "mtl_lightning.checkpoint_hooks"


def hooks() -> dict[str, LoadHook]:
    """The hooks of the installed packages' entry points, by the checkpoint key each handles."""
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


def run_load_hooks(model: nn.Module, checkpoint: dict[str, Any], fitting: bool) -> None:
    """Run the hook of every key of ``checkpoint`` that has one (``fitting``: the checkpoint resumes a fit)."""
    keyed = [key for key in checkpoint if isinstance(key, str)]
    if not keyed:
        return
    available = hooks()
    for key in keyed:
        if key in available:
            available[key](model, checkpoint, fitting)
