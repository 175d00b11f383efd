"""Print the per-task metrics of the last validation as a table when ``fit`` ends."""

from __future__ import annotations

from collections import defaultdict

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from rich.console import Console
from rich.table import Table

from mtl_lightning import trackers


def task_table(metrics: dict[str, float], stage: str) -> Table | None:
    """A table with one row per task and one column per metric, from names ``{stage}/{task}/{metric}``."""
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == stage:
            rows[parts[1]][parts[2]] = float(value)
    if not rows:
        return None
    columns = sorted({m for r in rows.values() for m in r}, key=lambda m: (m != "loss", m))
    title = f"{stage} metrics" + (
        f" (total loss {float(metrics[f'{stage}/loss']):.4f})" if f"{stage}/loss" in metrics else ""
    )
    table = Table(title=title)
    table.add_column("task")
    for col in columns:
        table.add_column(col, justify="right")
    for task, values in rows.items():
        table.add_row(task, *(f"{values[c]:.4f}" if c in values else "-" for c in columns))
    return table


class MetricsTable(Callback):
    """At the end of ``fit``, print the last validation metrics per task and where the checkpoints are."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # fast_dev_run is set on the Trainer by Lightning's debugging-flags connector, which its type does not declare.
        if trainer.sanity_checking or trainer.fast_dev_run:  # type: ignore[attr-defined]
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask for it
        if not trainer.is_global_zero:
            return
        console = Console()
        table = task_table({k: float(v) for k, v in trainer.callback_metrics.items()}, "val")
        if table is not None:
            console.print(table)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
                # A checkpoint without a monitor has a best path (the latest save) but no score.
                score = cb.best_model_score
                value = f" ({cb.monitor}={float(score):.4f})" if score is not None else ""
                console.print(f"best checkpoint{value}: {cb.best_model_path}")
            if isinstance(cb, ModelCheckpoint) and cb.last_model_path:
                console.print(f"last checkpoint: {cb.last_model_path}")
        for logger in trainer.loggers:  # how to look at the run: tensorboard, mlflow ui, wandb sync, metrics.csv
            hint = trackers.viewer_hint(logger, log_dir)
            if hint:
                console.print(hint, soft_wrap=True)  # one line, to copy as it is
