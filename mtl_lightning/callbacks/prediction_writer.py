"""Write the per-task predictions of ``mtl predict`` to one CSV or Parquet file, one row per predicted sample.

Columns: the row's key (``id``: its position in the predict dataset; see :func:`batch_keys`), then per task, in task
order, the columns its kind writes (:meth:`~mtl_lightning.kinds.TaskKind.columns`): ``binary`` -> ``{task}_prob`` and
``{task}_pred`` (1 above ``threshold``, as torchmetrics decides); ``multiclass`` -> ``{task}_prob_{k}`` per class and
``{task}_pred`` (the argmax); ``multilabel`` -> ``{task}_prob_{i}`` and ``{task}_pred_{i}`` per label;
``regression`` and ``count`` -> ``{task}`` (one output) or ``{task}_{i}``. Where the data module knows the class
names of a task (``TabularDataModule.class_names``), ``{task}_label`` holds the predicted name.

Under DDP every rank writes its own rows to a part file next to the output; after a barrier rank 0 merges the
parts, drops rows predicted twice (a distributed sampler may repeat samples to even out the ranks), sorts by the
key and writes the file.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mtl_lightning.contracts import BatchPartsSampler, HasClassNames, HasSplitRows
from mtl_lightning.errors import ConfigError
from mtl_lightning.tasks import TaskSpec

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class PredictionWriterError(ConfigError):
    """The prediction writer's output settings are unusable."""


class OutputPathError(ConfigError):
    """An output file cannot be written where asked (shared with ``mtl export``)."""


def infer_format(path: Path, format: str | None) -> str:
    """``csv`` or ``parquet``, from ``format`` when given, else from the file suffix."""
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in ("csv", "parquet"):
            raise PredictionWriterError(f"unknown prediction format {format!r}; use 'csv' or 'parquet'")
        return fmt
    inferred = FORMATS.get(path.suffix.lower())
    if inferred is None:
        raise PredictionWriterError(
            f"cannot tell the format of {str(path)!r} from its suffix {path.suffix!r}: name the file *.csv or "
            "*.parquet, or set the writer's format: csv | parquet"
        )
    return inferred


def check_parquet() -> None:
    if importlib.util.find_spec("pyarrow") is None:
        raise PredictionWriterError(
            'writing predictions as Parquet needs pyarrow: pip install "mtl_lightning[parquet]" (or write CSV)'
        )


def check_writable(
    path: Path, overwrite: bool, what: str = "prediction file", replace_hint: str = "set the writer's overwrite: true"
) -> None:
    """Create ``path``'s folder and make sure a file can be written there; refuse to replace a file unless asked."""
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"{what} {str(path)!r} already exists; choose another path or {replace_hint} to replace it"
        )
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputPathError(f"cannot write the {what} {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A real write: permission bits alone say nothing when running as root or on some network filesystems.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise OutputPathError(
            f"cannot write the {what} {str(path)!r}: {err.strerror or err}. Choose a path in a writable folder"
        ) from None


def task_columns(spec: TaskSpec, values: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """The output columns of one task from its predictions, as its kind writes them."""
    return spec.task_kind.columns(spec, values, threshold)


def _predict_loader(trainer: Trainer, dataloader_idx: int) -> Any:
    loaders = trainer.predict_dataloaders
    if isinstance(loaders, Sequence):
        return loaders[dataloader_idx]
    if isinstance(loaders, Mapping):
        return list(loaders.values())[dataloader_idx]
    return loaders


def _datamodule(trainer: Trainer) -> Any:
    # Lightning's data connector sets `trainer.datamodule` (None without one); the Trainer class does not declare it.
    return getattr(trainer, "datamodule", None)


def _task_specs(pl_module: LightningModule) -> Mapping[str, TaskSpec]:
    # MultiTaskModule.tasks: LightningModule does not declare it, so nn.Module's __getattr__ types it Tensor | Module.
    return cast("Mapping[str, TaskSpec]", pl_module.tasks)


def batch_keys(trainer: Trainer, batch_indices: Sequence[Any] | None, batch_idx: int, dataloader_idx: int) -> dict:
    """Key columns of one batch's rows, which identify each row across ranks.

    - Map-style data with a batch sampler (every built-in data module except the per-task one): ``id``, the row's
      position in the predict dataset, from the indices Lightning records for prediction writers. A data module
      with ``split_rows`` (:class:`~mtl_lightning.data.TabularDataModule`) adds ``source_row``, the row's position
      in the file it was read from.
    - Samplers that yield whole batches as parts ``((source, rows), ...)``
      (:class:`~mtl_lightning.data.PerTaskDataModule`: Lightning sees no batch sampler there, so it records no
      indices): ``task``, the dataset the rows come from, and ``id``, their position in that task's predict data.
    """
    if (
        batch_indices is not None
        and len(batch_indices)
        and all(isinstance(i, (int, np.integer)) for i in batch_indices)
    ):
        ids = np.asarray(batch_indices, dtype=np.int64)
        keys: dict[str, np.ndarray] = {"id": ids}
        datamodule = _datamodule(trainer)
        split_rows = datamodule.split_rows if isinstance(datamodule, HasSplitRows) else None
        rows = split_rows.get("predict", split_rows.get("test")) if isinstance(split_rows, Mapping) else None
        if rows is not None and len(rows) == len(_predict_loader(trainer, dataloader_idx).dataset):
            keys["source_row"] = np.asarray(rows)[ids].astype(np.int64)
        return keys
    sampler = getattr(_predict_loader(trainer, dataloader_idx), "sampler", None)
    if isinstance(sampler, BatchPartsSampler) and batch_idx < len(sampler.batches):
        parts = sampler.batches[batch_idx]
        sources = [np.full(len(p[1]), str(p[0]), dtype=object) for p in parts]
        part_rows = [np.asarray(p[1], dtype=np.int64).reshape(-1) for p in parts]
        return {"task": np.concatenate(sources), "id": np.concatenate(part_rows)}
    raise PredictionWriterError(
        f"PredictionWriter cannot tell which rows batch {batch_idx} holds: the predict DataLoader of "
        f"{type(_datamodule(trainer)).__name__} has neither a batch sampler (Lightning records its indices) nor a "
        "sampler with `batches` of (source, rows) parts. Give the predict DataLoader a batch_size (map-style dataset)"
    )


class PredictionWriter(BasePredictionWriter):
    """Write ``mtl predict``'s per-task predictions to a CSV or Parquet file (one row per sample).

    Args:
        output_path: The file to write; ``None``: ``predictions.<format>`` in ``trainer.default_root_dir`` (the
            working directory unless set). Its folder is created.
        format: ``csv`` or ``parquet``; ``None`` takes it from the suffix (``.csv``, ``.parquet``, ``.pq``).
            Parquet needs pyarrow (``pip install "mtl_lightning[parquet]"``).
        overwrite: Replace an existing file (otherwise an existing file is an error, raised before predicting).
        threshold: Probability above which a binary or multilabel prediction is 1 (torchmetrics' rule: p = 0.5
            is 0 at the default threshold, as in the logged accuracy and F1).
    """

    def __init__(
        self,
        output_path: str | None = None,
        format: str | None = None,
        overwrite: bool = False,
        threshold: float = 0.5,
    ):
        super().__init__(write_interval="batch")
        if not 0.0 <= threshold <= 1.0:
            raise PredictionWriterError(f"threshold must be a probability in [0, 1], got {threshold}")
        self.output_path = output_path
        self.format = format
        self.overwrite = overwrite
        self.threshold = threshold
        if output_path is not None or format is not None:  # settings errors at construction, paths in setup
            infer_format(Path(output_path or "predictions.csv"), format)
        self._chunks: list[dict[str, np.ndarray]] = []
        self._path: Path | None = None
        self._format = "csv"

    # ------------------------------------------------------------------------------------------- set-up
    def resolve(self, trainer: Trainer) -> tuple[Path, str]:
        """The output path and format of this run."""
        if self.output_path is None:
            fmt = infer_format(Path("x.csv"), self.format)
            return Path(trainer.default_root_dir) / f"predictions.{fmt}", fmt
        path = Path(self.output_path).expanduser()
        return path, infer_format(path, self.format)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # Every check before the first batch is predicted: a long run must not fail at the end on its output.
        self._path, self._format = self.resolve(trainer)
        if self._format == "parquet":
            check_parquet()
        check_writable(self._path, self.overwrite)
        self._chunks = []

    # ------------------------------------------------------------------------------------------ writing
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[Any] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, Mapping):
            raise PredictionWriterError(
                f"PredictionWriter expects predict_step to return {{task: tensor}}, got {type(prediction).__name__}"
            )
        tasks = _task_specs(pl_module)
        columns = dict(batch_keys(trainer, batch_indices, batch_idx, dataloader_idx))
        n = len(columns["id"])
        if dataloader_idx:
            columns = {"dataloader": np.full(n, dataloader_idx, dtype=np.int64), **columns}
        datamodule = _datamodule(trainer)
        class_names = datamodule.class_names if isinstance(datamodule, HasClassNames) else None
        for name, spec in tasks.items():
            if name not in prediction:
                continue
            values = _numpy(prediction[name])
            if values.shape[0] != n:
                raise PredictionWriterError(
                    f"task {name!r}: predict_step gave {values.shape[0]} rows for a batch of {n} samples"
                )
            new = task_columns(spec, values, self.threshold)
            names = class_names.get(name) if isinstance(class_names, Mapping) else None
            class_column = spec.task_kind.class_column(spec)
            if names and class_column is not None:
                new[f"{name}_label"] = np.asarray(list(names), dtype=object)[new[class_column]]
            clash = sorted(set(new) & set(columns))
            if clash:
                raise PredictionWriterError(f"prediction columns {clash} of task {name!r} clash with other columns")
            columns.update(new)
        self._chunks.append(columns)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._path is not None
        frame = _concat(self._chunks)
        self._chunks = []
        world = trainer.world_size
        if world == 1:
            self._write(_finish(frame, pl_module), trainer)
            return
        # Part files (npz, no pickling) next to the output, whose folder was checked to be writable.
        parts = [self._path.with_name(f".{self._path.name}.rank{r}.npz") for r in range(world)]
        arrays = {k: _savable(frame[k].to_numpy()) for k in frame.columns}
        # Ignored below: mypy also matches **arrays against savez's allow_pickle: bool (numpy's stub signature).
        np.savez(parts[trainer.global_rank], **arrays)  # type: ignore[arg-type]
        trainer.strategy.barrier("prediction_writer_parts")
        if trainer.global_rank == 0:
            missing = [str(p) for p in parts if not p.exists()]
            if missing:
                raise PredictionWriterError(
                    f"rank 0 cannot see the prediction parts {missing} of the other ranks: on several nodes, "
                    "output_path must be on a filesystem every node shares"
                )
            frames = []
            for part in parts:
                with np.load(part, allow_pickle=False) as data:
                    frames.append(pd.DataFrame({k: data[k] for k in data.files}))
            self._write(_finish(pd.concat(frames, ignore_index=True), pl_module), trainer)
            for part in parts:
                part.unlink()
        trainer.strategy.barrier("prediction_writer_done")  # every rank returns with the file in place

    def _write(self, frame: pd.DataFrame, trainer: Trainer) -> None:
        assert self._path is not None
        if self._format == "parquet":
            frame.to_parquet(self._path, index=False)
        else:
            frame.to_csv(self._path, index=False)
        rank_zero_info(f"predictions of {len(frame)} rows written to {self._path}")


def _numpy(value: Tensor) -> np.ndarray:
    return value.detach().float().cpu().numpy()


def _savable(values: Any) -> np.ndarray:
    # Object arrays (task names) would need pickling in an npz; fixed-width unicode does not.
    array = np.asarray(values)
    return array.astype(str) if array.dtype.kind in "OT" else array


def _concat(chunks: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    if not chunks:
        return pd.DataFrame()
    return pd.concat([pd.DataFrame(c) for c in chunks], ignore_index=True)


def _finish(frame: pd.DataFrame, pl_module: LightningModule) -> pd.DataFrame:
    """Drop rows predicted twice (same key) and sort by the key: the same file for any number of ranks."""
    if frame.empty:
        return frame
    keys = [k for k in ("dataloader", "task", "id") if k in frame.columns]
    if "task" in keys:  # sort tasks in the model's order, not alphabetically
        order = [t for t in _task_specs(pl_module) if t in set(frame["task"])]
        frame["task"] = pd.Categorical(frame["task"].astype(str), categories=order)
    frame = frame.drop_duplicates(subset=keys).sort_values(keys, kind="stable").reset_index(drop=True)
    if "task" in keys:
        frame["task"] = frame["task"].astype(str)
    return frame
