"""What differs between the experiment trackers (TensorBoard, CSV, MLflow, W&B), kept in one place.

Lightning's loggers share ``log_metrics`` and ``log_hyperparams`` but not the rest: where a run's own folder is
(``trainer.log_dir`` is the run's folder for TensorBoard and CSV, but the store's or ``save_dir`` shared by every run
for MLflow and W&B), how a file or an image reaches them, and how one looks at a run. The config-saving callback,
the conflict heatmap, the end-of-fit table and ``--ckpt_path last`` ask here instead of testing logger classes
themselves. The presets are ``configs/logger/*.yaml``; docs/trackers.md says where each writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

# Loggers whose log_dir is the run's own folder (<save_dir>/<name>/version_N): Lightning writes config.yaml there.
FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)
# MLflow 3 refuses its file store unless this is set; the presets' local store is one (see allow_local_mlflow_store).
MLFLOW_FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


def run_folder(trainer: Trainer) -> Path | None:
    """The folder of this run's own files (``checkpoints/``, ``config.yaml``), from the first logger.

    It is ModelCheckpoint's rule without ``checkpoints``: ``<save_dir or default_root_dir>/<name>/<version>``, which
    is ``log_dir`` for TensorBoard and CSV, ``<store>/<experiment id>/<run id>`` for MLflow's local store and
    ``<save_dir>/<project>/<run id>`` for W&B. Rank zero only: MLflow and W&B know their run there alone.
    """
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    if isinstance(logger, FOLDER_LOGGERS):
        return Path(logger.log_dir)
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


def log_config(logger: Logger, path: Path, text: str, config: Mapping[str, Any]) -> None:
    """Give ``logger`` the run's resolved config (``text``, saved at ``path``; ``config`` parsed) if it keeps one.

    MLflow: the file as an artifact (Lightning logs only the model's hyper-parameters, as params: Lightning issue
    #18396). W&B: the config as the run's ``config`` entry and the file in the run's files. TensorBoard and CSV
    have the file in their run folder already.
    """
    if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
        logger.experiment.log_text(logger.run_id, text, path.name)
    elif isinstance(logger, WandbLogger):
        run = logger.experiment
        run.config.update({"config": dict(config)}, allow_val_change=True)  # a resume's config replaces the first's
        if path.is_file():
            run.save(str(path), base_path=str(path.parent), policy="now")


def log_image(logger: Logger, tag: str, image: Tensor, step: int, caption: str | None = None) -> bool:
    """Add an ``(H, W, 3)`` uint8 image to ``logger`` at ``step``; False for a logger that takes no images (CSV).

    ``caption`` is written with the image where the tracker has captions (W&B); the others get it as text once by
    :func:`log_text`.
    """
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, step, dataformats="HWC")
        return True
    if not isinstance(logger, (MLFlowLogger, WandbLogger)):
        return False
    try:
        import PIL  # noqa: F401  (both trackers turn arrays into images with Pillow)
    except ModuleNotFoundError:
        rank_zero_warn(f"{tag}: {type(logger).__name__} needs Pillow to log images (pip install pillow); skipped")
        return False
    array = image.cpu().numpy()
    if isinstance(logger, MLFlowLogger):
        if logger.run_id is None:
            return False
        logger.experiment.log_image(logger.run_id, array, key=tag, step=step)
    else:
        logger.log_image(key=tag, images=[array], step=step, **({"caption": [caption]} if caption else {}))
    return True


def log_text(logger: Logger, tag: str, text: str, step: int) -> None:
    """A text note next to the images of ``tag`` (the heatmap's task order) in TensorBoard and MLflow."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, text, step)
    elif isinstance(logger, MLFlowLogger) and logger.run_id is not None:
        logger.experiment.log_text(logger.run_id, text, f"{tag}.txt")


def viewer_hint(logger: Logger, log_dir: str | None) -> str | None:
    """How to look at the run (printed at the end of ``fit``), or None."""
    if isinstance(logger, TensorBoardLogger) and log_dir:
        return f"TensorBoard: tensorboard --logdir {log_dir}"
    if isinstance(logger, CSVLogger):
        return f"CSV: {Path(logger.log_dir) / 'metrics.csv'}"
    if isinstance(logger, MLFlowLogger):
        store = logger.save_dir
        if store is None:  # a tracking server or database: its own UI
            return f"MLflow: run {logger.run_id} at {logger.experiment.tracking_uri}"
        return f"MLflow: {MLFLOW_FILE_STORE_OPT_IN}=true mlflow ui --backend-store-uri {store}"
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        if getattr(run, "offline", False):  # run.dir is <save_dir>/wandb/offline-run-<time>-<id>/files
            return f"W&B (offline): wandb sync {Path(run.dir).parent}"
        return f"W&B: {getattr(run, 'url', None) or logger.name}"
    return None


def end_runs(trainer: Trainer) -> None:
    """Finish the W&B runs of a trainer that is done: Lightning never does, and the next ``WandbLogger`` of this
    process would log into the same run (``mtl-bench`` runs every benchmark run in one process)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def _logger_entries(loggers: Any) -> list[tuple[str, MutableMapping[str, Any]]]:
    """(class name, init_args) of each logger in a trainer config (a list, one entry, None or False)."""
    found = []
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        path = getattr(entry, "class_path", None) or (entry.get("class_path") if isinstance(entry, dict) else None)
        if not path:
            continue
        args = entry["init_args"] if isinstance(entry, dict) else entry.init_args
        found.append((str(path).rsplit(".", 1)[-1], args if args is not None else {}))
    return found


def logger_entries(trainer: Mapping[str, Any]) -> list[tuple[str, MutableMapping[str, Any]]]:
    """:func:`_logger_entries` of ``trainer.logger`` in a parsed trainer config."""
    return _logger_entries(trainer.get("logger"))


def mlflow_tracking_uri(args: Mapping[str, Any]) -> str:
    """The tracking URI an ``MLFlowLogger`` with these init args uses (its own rule: uri, environment, save_dir)."""
    uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return str(uri) if uri else f"file:{args.get('save_dir') or './mlruns'}"


def _is_local_path(uri: str) -> bool:
    """Whether a tracking URI is a folder (``file:…`` or a bare path), not a server, database or Databricks."""
    return urlparse(uri).scheme in ("", "file") and uri not in ("databricks", "databricks-uc")


def allow_local_mlflow_store(trainer: Mapping[str, Any]) -> None:
    """Let MLflow 3 open the local file store that an MLflow logger of the config names (the presets' default).

    MLflow 3 keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true;
    its replacement, a SQLite database, needs SQLAlchemy and Alembic, which ``mlflow-skinny`` lacks. A config that
    names a local folder has chosen that store, so the opt-in is set for it, unless the environment already says
    otherwise (then MLflow's own message applies).
    """
    for name, args in logger_entries(trainer):
        if name == "MLFlowLogger" and _is_local_path(mlflow_tracking_uri(args)):
            os.environ.setdefault(MLFLOW_FILE_STORE_OPT_IN, "true")


def mlflow_experiment_id(args: Mapping[str, Any]) -> str | None:
    """The id of the experiment an ``MLFlowLogger`` with these init args logs to, or None if it has none yet."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(mlflow_tracking_uri(args)).get_experiment_by_name(
        str(args.get("experiment_name") or "lightning_logs")
    )
    return None if experiment is None else str(experiment.experiment_id)
