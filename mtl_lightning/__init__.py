"""mtl_lightning: multi-task learning on PyTorch Lightning — a shared encoder, one head per task, YAML-driven."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from mtl_lightning.module import MultiTaskModule
from mtl_lightning.tasks import TaskSpec

try:  # the installed distribution's version (pyproject.toml), so it cannot drift from what pip reports
    __version__ = _version("mtl_lightning")
except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
    __version__ = "0+unknown"

__all__ = ["MultiTaskModule", "TaskSpec", "__version__"]
