"""mtl_lightning: multi-task learning on PyTorch Lightning — a shared encoder, one head per task, YAML-driven."""

from mtl_lightning.module import MultiTaskModule
from mtl_lightning.tasks import TaskSpec

__version__ = "0.1.0"

__all__ = ["MultiTaskModule", "TaskSpec", "__version__"]
