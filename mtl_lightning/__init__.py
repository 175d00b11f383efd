"""mtl_lightning: multi-task learning on PyTorch Lightning — a shared encoder, one head per task, YAML-driven.

``MultiTaskModule`` and ``TaskSpec`` are imported on first use (PEP 562): ``import mtl_lightning`` alone, as
``mtl --version`` does, loads neither Lightning nor torchmetrics nor the balancers.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtl_lightning.module import MultiTaskModule
    from mtl_lightning.tasks import TaskSpec

try:  # the installed distribution's version (pyproject.toml), so it cannot drift from what pip reports
    __version__ = _version("mtl_lightning")
except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_LAZY = {"MultiTaskModule": "mtl_lightning.module", "TaskSpec": "mtl_lightning.tasks"}

__all__ = ["MultiTaskModule", "TaskSpec", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
