"""Write the pairwise cosine similarities of the task gradients as a heatmap image to every logger that takes images.

Gradient balancers (:class:`~mtl_lightning.balancers.GradientBalancer`) keep the last ``T x T`` cosine matrix of
the per-task gradients in ``balancer.last_cosine`` (the :class:`~mtl_lightning.contracts.HasGradientTelemetry`
contract, which a balancer of one's own can meet too) whenever they compute telemetry (on the steps whose logs are
written, see ``trainer.log_every_n_steps``). This callback renders the latest one: blue = opposed gradients
(cosine -1), white = orthogonal, red = aligned (+1); rows and columns follow the model's task order, which is
written once as a text entry next to the images. Rendered with torch alone (no matplotlib).

The images go to TensorBoard (``add_image``), MLflow (``log_image``, under the run's images) and W&B (``log_image``,
the task order as the caption); loggers without images (CSV) are skipped (:func:`mtl_lightning.trackers.log_image`).
The drawing and writing (:func:`signed_heatmap`, :func:`write_heatmap`) are shared with
:class:`~mtl_lightning.callbacks.TaskAffinity`, whose affinity matrices are drawn the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import Tensor

from mtl_lightning import trackers
from mtl_lightning.contracts import HasGradientTelemetry

TAG = "train/balance/cosine_heatmap"


def signed_heatmap(matrix: Tensor, limit: float = 1.0, cell: int = 24) -> Tensor:
    """``(T*cell, T*cell, 3)`` uint8 image of a matrix of signed values: blue (-limit), white (0), red (+limit).

    Values beyond ``±limit`` are clamped and NaN (not measured) is drawn white; ``limit`` must be > 0.
    """
    if not limit > 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    c = (torch.nan_to_num(matrix.detach().float().cpu()) / limit).clamp(-1.0, 1.0)
    neg, pos = (-c).clamp_min(0), c.clamp_min(0)
    # white fades to red as c -> +1 (green and blue drop) and to blue as c -> -1 (red and green drop)
    rgb = torch.stack([1 - neg, 1 - neg - pos, 1 - pos], dim=-1)
    rgb = rgb.repeat_interleave(cell, dim=0).repeat_interleave(cell, dim=1)
    return (rgb * 255).round().to(torch.uint8)


def cosine_heatmap(cosine: Tensor, cell: int = 24) -> Tensor:
    """``(T*cell, T*cell, 3)`` uint8 image of a cosine matrix: blue (-1), white (0), red (+1)."""
    return signed_heatmap(cosine, 1.0, cell)


def task_order(names: Sequence[str]) -> str | None:
    """The caption that says which task each row and column is (None without names)."""
    return "rows and columns, top to bottom: " + ", ".join(names) if names else None


def write_heatmap(
    loggers: Iterable[Logger], tag: str, image: Tensor, step: int, caption: str | None, with_text: bool
) -> bool:
    """Add ``image`` to every logger that takes images; with ``with_text``, ``caption`` as a text entry next to it.

    True when at least one logger took the image (loggers without images, such as CSV, are skipped).
    """
    written = [lg for lg in loggers if trackers.log_image(lg, tag, image, step, caption=caption)]
    if written and with_text and caption:
        for logger in written:
            trackers.log_text(logger, f"{tag}/tasks", caption, step)
    return bool(written)


class GradientConflictHeatmap(Callback):
    """Every ``every_n_steps`` optimizer steps, add the latest gradient-cosine heatmap to each logger that takes images.

    Does nothing for balancers without gradient telemetry (loss weighting) or with ``telemetry: false``.

    Args:
        every_n_steps: Minimum number of global steps between two images.
        cell: Size in pixels of one task pair's square.
    """

    def __init__(self, every_n_steps: int = 100, cell: int = 24):
        if every_n_steps < 1 or cell < 1:
            raise ValueError(f"every_n_steps and cell must be >= 1, got {every_n_steps} and {cell}")
        self.every_n_steps = every_n_steps
        self.cell = cell
        self._last_step: int | None = None
        self._last_matrix: Tensor | None = None
        self._names_written = False

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        # The LightningModule's `balancer` attribute (MultiTaskModule's; other modules may have none).
        balancer = getattr(pl_module, "balancer", None)
        if not isinstance(balancer, HasGradientTelemetry):
            return
        cosine = balancer.last_cosine
        if cosine is None or cosine is self._last_matrix:
            return
        step = trainer.global_step
        if self._last_step is not None and step - self._last_step < self.every_n_steps:
            return
        if not trainer.loggers:
            return
        image = cosine_heatmap(cosine, self.cell)
        order = task_order(list(balancer.task_names))
        if not write_heatmap(trainer.loggers, TAG, image, step, order, with_text=not self._names_written):
            return
        self._names_written = True
        self._last_step, self._last_matrix = step, cosine
