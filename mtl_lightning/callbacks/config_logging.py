"""The run's resolved config, saved in the run's own folder and given to the experiment trackers.

LightningCLI's ``SaveConfigCallback`` writes ``config.yaml`` into ``trainer.log_dir``. That is the run's folder for
TensorBoard and CSV, but for MLflow it is the store's root and for W&B the ``save_dir`` that every run shares: the
second run there would stop with "config.yaml exists", and no tracker would see the config (Lightning logs only the
model's hyper-parameters; for MLflow see Lightning issue #18396). :class:`LoggedConfig`, the CLI's config callback:

- TensorBoard, CSV and no first logger: the file goes where Lightning puts it, unchanged;
- MLflow, W&B (first logger): the file goes to the run's own folder, beside its ``checkpoints/``;
- every MLflow logger gets the file as an artifact and every W&B logger as the run's ``config``
  (:func:`mtl_lightning.trackers.log_config`).

A resumed run saves ``config.resumeN.yaml`` beside the first run's file (the CLI sets ``config_filename``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from mtl_lightning import trackers
from mtl_lightning.errors import ConfigError


class LoggedConfig(SaveConfigCallback):
    """``SaveConfigCallback`` that puts the file in the run's folder and logs it to MLflow and W&B (see module)."""

    _log_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # Decided on every rank (log_dir is a collective); Lightning's own saving is kept for folder loggers.
        self._log_dir = trainer.log_dir
        self.save_to_log_dir = not trainer.loggers or isinstance(trainer.loggers[0], trackers.FOLDER_LOGGERS)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Rank zero: write the file to the run folder where Lightning did not, then hand it to the trackers."""
        folder = Path(str(self._log_dir)) if self.save_to_log_dir else trackers.run_folder(trainer)
        if folder is None:
            return
        path = folder / self.config_filename
        if not self.save_to_log_dir:
            if path.exists() and not self.overwrite:  # Lightning's rule for its own file
                raise ConfigError(
                    f"{path} exists: the run id given to the logger is an earlier run's; resume it with --ckpt_path "
                    "last (its config is then saved beside that one), or leave the run id out for a new run"
                )
            folder.mkdir(parents=True, exist_ok=True)
            # Lightning's own call for its file, so both files are alike.
            self.parser.save(
                self.config, str(path), skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
        if not path.is_file():  # a remote log_dir (fsspec): no tracker here takes it from there
            return
        text = path.read_text(encoding="utf-8")
        config = yaml.safe_load(text) or {}
        for logger in trainer.loggers:
            trackers.log_config(logger, path, text, config)
