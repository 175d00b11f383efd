"""A run that fails before its first training step leaves no run folder behind.

Lightning's loggers create the run's folder (``runs/<name>/version_N``, with an event file and the saved config)
while the trainer sets up, before the data and the model are checked, so a typo in a data path used to leave an
empty-looking ``version_N`` that the next run's numbering skips and that ``--ckpt_path last`` has to step over.
The CLI adds this callback with the folder the run is about to create; on an exception before any training step,
with no checkpoint written, the folder is removed; a run that trained some steps and then failed without a checkpoint
(a loss that became NaN) keeps its folder, for its curves, marked with a ``FAILED.txt`` that holds the error. A folder
that existed before (a resumed run) is never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

# Written into a run folder that is kept after a failure: the run trained some steps but wrote no checkpoint.
FAILED = "FAILED.txt"


class RemoveFailedRunFolder(Callback):
    """Removes the folders of ``log_dir`` this run creates when it fails before training (see module)."""

    def __init__(self, log_dir: str | Path | None) -> None:
        # The outermost folder of log_dir that does not exist yet (runs/ and runs/<name>/ too on a first run).
        self.created: Path | None = None
        if log_dir is not None:
            for folder in [Path(log_dir), *Path(log_dir).parents]:
                if folder.exists():
                    break
                self.created = folder

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        folder = self.created
        if folder is None or not trainer.is_global_zero or not folder.is_dir() or any(folder.rglob("*.ckpt")):
            return
        if trainer.global_step == 0:
            shutil.rmtree(folder, ignore_errors=True)
            return
        # It trained (its TensorBoard curves may show what went wrong) but wrote no checkpoint: keep it, marked.
        log_dir = Path(trainer.log_dir or folder)
        if log_dir.is_dir():
            (log_dir / FAILED).write_text(f"{type(exception).__name__}: {exception}\n", encoding="utf-8")
