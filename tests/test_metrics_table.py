"""MetricsTable's end-of-fit report: the per-task table and the checkpoint lines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mtl_lightning.callbacks import MetricsTable


def _trainer(*checkpoints: ModelCheckpoint) -> SimpleNamespace:
    """The attributes of a Trainer that MetricsTable reads at the end of fit."""
    return SimpleNamespace(
        sanity_checking=False,
        fast_dev_run=False,
        log_dir=None,
        loggers=[],
        is_global_zero=True,
        callback_metrics={"val/loss": torch.tensor(0.5), "val/a/loss": torch.tensor(0.25)},
        checkpoint_callbacks=list(checkpoints),
    )


def test_checkpoint_without_monitor_is_reported_without_a_score(capsys: pytest.CaptureFixture[str]) -> None:
    # A ModelCheckpoint with no monitor has a best path (its latest save) but no best score.
    unmonitored = ModelCheckpoint()
    unmonitored.best_model_path = "runs/x/checkpoints/epoch=0-step=2.ckpt"
    monitored = ModelCheckpoint(monitor="val/loss")
    monitored.best_model_path = "runs/x/checkpoints/best.ckpt"
    monitored.best_model_score = torch.tensor(0.125)

    MetricsTable().on_fit_end(_trainer(unmonitored, monitored), None)  # type: ignore[arg-type]

    out = capsys.readouterr().out
    assert "best checkpoint: runs/x/checkpoints/epoch=0-step=2.ckpt" in out
    assert "best checkpoint (val/loss=0.1250): runs/x/checkpoints/best.ckpt" in out
    assert "0.2500" in out  # the task table
