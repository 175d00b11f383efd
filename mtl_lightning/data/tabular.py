"""Users' own tables: CSV or Parquet files with one row per sample, feature columns and target columns.

Features are encoded with statistics of the *training* split only, so nothing about validation or test rows
leaks into training: numeric columns are standardised (a missing value becomes the train mean, i.e. 0) and
categorical columns are one-hot encoded over the categories seen in training (an unseen or missing category
gives an all-zero row). Missing target cells become missing labels (NaN, or -100 for class indices) rather
than dropped rows, so every task keeps every row that is labelled for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities import rank_zero_warn
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from torch.utils.data import Dataset

from mtl_lightning.data.base import DataError, MultiTaskDataModule, split_indices
from mtl_lightning.data.datasets import MultiTaskTensorDataset
from mtl_lightning.input_schema import InputSchema
from mtl_lightning.tasks import IGNORE_INDEX, TaskSpec

PARQUET_SUFFIXES = (".parquet", ".pq")
_MAX_SHOWN = 10  # values/columns quoted in an error message
_MAX_CELLS = 5  # offending cells (place and value) quoted in an error message


def _shown(values: Sequence[Any]) -> str:
    values = list(values)
    more = f" … ({len(values)} in all)" if len(values) > _MAX_SHOWN else ""
    return f"{values[:_MAX_SHOWN]}{more}"


def check_file(path: str) -> Path:
    """The path of an existing file, or a DataError that names it and the working directory."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise DataError(
            f"data file {path!r} {what} (looked for {file.resolve()}); relative paths are read from the "
            f"current working directory, which is {Path.cwd()}. Fix the path or run from the directory it is "
            "relative to"
        )
    return file


def read_table(path: str) -> pd.DataFrame:
    """Read a CSV (``.tsv``: tab-separated) or Parquet (``.parquet``/``.pq``) file, with clear errors."""
    file = check_file(path)
    if file.suffix.lower() in PARQUET_SUFFIXES:
        try:
            frame = pd.read_parquet(file)
        except ImportError as err:
            raise DataError(
                f'reading the Parquet file {path!r} needs pyarrow: pip install "mtl_lightning[parquet]" '
                "(or save the table as CSV)"
            ) from err
        except Exception as err:
            raise DataError(f"could not read {path!r} as Parquet: {err}") from err
    else:
        try:
            frame = pd.read_csv(file, sep="\t" if file.suffix.lower() == ".tsv" else ",")
        except pd.errors.EmptyDataError as err:
            raise DataError(
                f"data file {path!r} is empty; it needs a header line with the column names and one row per sample"
            ) from err
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            raise DataError(f"could not read {path!r} as CSV: {err}") from err
    frame.columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise DataError(
            f"data file {path!r} has no rows (only the columns {_shown(list(frame.columns))}); it needs one "
            "row per sample"
        )
    return frame


def _as_strings(column: pd.Series) -> list[str | None]:
    """Values as strings (``None`` where missing), with ``3.0`` written ``3`` so that an integer column read
    as float (because of a missing cell) matches the same column read as integers in another file."""
    return [
        None if pd.isna(v) else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
        for v in column.tolist()
    ]


def _as_numbers(column: pd.Series, what: str, fix: str) -> np.ndarray:
    """Float64 values (NaN where missing); strings that are not numbers raise a DataError."""
    if is_bool_dtype(column):
        return column.to_numpy(dtype="float64", na_value=np.nan)
    numbers = pd.to_numeric(column, errors="coerce")
    bad = column[numbers.isna() & column.notna()]
    if len(bad):
        raise DataError(f"{what} holds non-numeric values {_shown(bad.unique().tolist())}; {fix}")
    values = numbers.to_numpy(dtype="float64", na_value=np.nan)
    if np.isinf(values).any():
        raise DataError(f"{what} holds infinite values; use an empty cell for a missing value")
    return values


def _numeric_like(column: pd.Series) -> bool:
    """Whether every value is a number, a bool or a string that parses as one (an empty column counts)."""
    return is_numeric_dtype(column) or bool(pd.to_numeric(column.dropna(), errors="coerce").notna().all())


class TabularDataModule(MultiTaskDataModule):
    """Multi-task data from your own CSV or Parquet table(s).

    Give either one file (``path``, split at random into train/val/test by ``val_fraction``/``test_fraction``
    and ``seed``) or one file per split (``train_path`` plus ``val_path`` and/or ``test_path``). Feature
    columns are encoded with train-split statistics only: numeric columns standardised (missing -> 0, the
    train mean), categorical columns one-hot over the sorted train categories (unseen or missing -> all
    zeros). Without ``categorical``, a column whose filled cells are mostly numbers but not all (a typo or a
    missing-value marker such as ``?``) is refused, naming the cells, rather than one-hot encoded: fix the
    cells, or list the column in ``categorical`` if it really is a category. Targets follow each task's kind:
    binary 0/1 (or two distinct strings, mapped in sorted order), multiclass class indices (or strings, mapped
    by the sorted train labels; see :attr:`class_names`), multilabel one 0/1 column per label, regression one
    numeric column per output. Empty target cells are missing labels (NaN, or -100 for multiclass).

    After loading, :attr:`feature_names` names the input columns, :attr:`feature_stats` holds the train
    mean/std of each numeric column, :attr:`categories` the train categories of each categorical column,
    :attr:`class_names` the label strings of string-valued binary/multiclass targets, and :attr:`split_rows`
    the positions (0-based, in the source file) of each split's rows, to join predictions back to the table.

    Args:
        tasks: The task specs.
        path: One table, split into train/val/test.
        train_path: The training table, when the splits come as separate files (not together with ``path``).
        val_path: The validation table (with ``train_path``).
        test_path: The test table (with ``train_path``); also used for ``predict``.
        features: Input columns; ``None`` takes every column that is neither a target nor in ``drop``.
        categorical: Columns to one-hot encode (every other feature must be numeric); ``None`` takes the
            non-numeric ones (string, object, category and bool columns), except that a column with more than
            half of its filled cells numbers and some text is an error (see above).
        drop: Columns to ignore, such as identifiers (used when ``features`` is ``None``).
        target_columns: Task name -> target column, or list of columns for a multilabel or multi-output
            regression task (one per output); a task not listed uses the column named like the task.
        val_fraction: Fraction of the rows of ``path`` for validation.
        test_fraction: Fraction of the rows of ``path`` for testing.
        **kwargs: Loader settings (``batch_size``, ``num_workers``, ...) and the split ``seed`` of
            :class:`MultiTaskDataModule`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        path: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        features: list[str] | None = None,
        categorical: list[str] | None = None,
        drop: list[str] | None = None,
        target_columns: dict[str, str | list[str]] | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        **kwargs: Any,
    ):
        # jsonargparse follows **kwargs into the base class, so the CLI still shows the loader settings.
        super().__init__(tasks, **kwargs)
        self.paths = self._checked_paths(path, train_path, val_path, test_path)
        self.single_file = path is not None
        self.fractions = (val_fraction, test_fraction)
        if self.single_file:
            split_indices(1, self.fractions, 0)  # fail now, not at setup, on impossible fractions
        self.target_columns = self._checked_target_columns(target_columns or {})
        self.drop = list(drop or [])
        self.features = None if features is None else list(features)
        self.categorical = None if categorical is None else list(categorical)
        targets = {c for cols in self.target_columns.values() for c in cols}
        for setting, cols in (("features", self.features or []), ("drop", self.drop)):
            clash = sorted(targets.intersection(cols))
            if clash:
                raise DataError(
                    f"columns {clash} are targets but are also listed in {setting}; a target column is never "
                    f"an input (it would leak the label): remove them from {setting}"
                )
        # Filled by _load on first use of input_shape, datasets or the properties below (the CLI reads
        # input_shape to build the model before setup, so loading cannot wait for setup).
        self._feature_names: list[str] = []
        self._feature_columns: list[str] = []
        self._feature_stats: dict[str, tuple[float, float]] = {}
        self._categories: dict[str, list[str]] = {}
        self._class_names: dict[str, list[str]] = {}
        self._split_rows: dict[str, np.ndarray] = {}
        self._loaded: dict[str, MultiTaskTensorDataset] | None = None

    # ---------------------------------------------------------------------------------------- settings
    @staticmethod
    def _checked_paths(
        path: str | None, train_path: str | None, val_path: str | None, test_path: str | None
    ) -> dict[str, str]:
        trio = {"train": train_path, "val": val_path, "test": test_path}
        given = [f"{split}_path" for split, p in trio.items() if p is not None]
        if path is not None and given:
            raise DataError(
                f"give either path (one file, split by val_fraction/test_fraction) or train_path/val_path/"
                f"test_path (one file per split), not both: got path and {', '.join(given)}"
            )
        if path is None and train_path is None:
            if given:
                raise DataError(f"{', '.join(given)} given without train_path: add train_path (the training table)")
            raise DataError(
                "no data file given: set path (one file, split into train/val/test) or train_path (with "
                "val_path/test_path)"
            )
        paths = {"all": path} if path is not None else {k: v for k, v in trio.items() if v is not None}
        for p in paths.values():
            check_file(p)
        return paths

    def _checked_target_columns(self, mapping: dict[str, str | list[str]]) -> dict[str, list[str]]:
        names = [t.name for t in self.tasks]
        unknown = sorted(set(mapping) - set(names))
        if unknown:
            raise DataError(f"target_columns names tasks that are not declared: {unknown}; declared tasks are {names}")
        columns: dict[str, list[str]] = {}
        for spec in self.tasks:
            cols = mapping.get(spec.name, spec.name)
            cols = [cols] if isinstance(cols, str) else list(cols)
            # One column per value of the task's target (its kind says: one per output, one class index, ...).
            want = spec.task_kind.target_width(spec)
            if len(cols) != want or len(set(cols)) != len(cols):
                example = f"[col_1, ..., col_{want}] (distinct)" if want > 1 else "column"
                hint = f"set target_columns: {{{spec.name}: {example}}}"
                what = f"{want} target columns, one per output" if want > 1 else "one target column"
                if want > 1:
                    hint += " (or fix num_outputs)"
                raise DataError(
                    f"task {spec.name!r} ({spec.kind}, num_outputs={spec.num_outputs}) needs {what}, got "
                    f"{len(cols)}: {cols}; {hint}"
                )
            columns[spec.name] = cols
        return columns

    # ------------------------------------------------------------------------------------------ loading
    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(F,)``: numeric columns plus one column per train category of each categorical column."""
        return (len(self.feature_names),)

    @property
    def feature_names(self) -> list[str]:
        """Names of the input columns: ``col`` for a numeric column, ``col=category`` for a one-hot column."""
        self._load()
        return self._feature_names

    @property
    def feature_stats(self) -> dict[str, tuple[float, float]]:
        """Train-split ``(mean, std)`` of each numeric feature column (std 0 is replaced by 1)."""
        self._load()
        return self._feature_stats

    @property
    def categories(self) -> dict[str, list[str]]:
        """Sorted train-split categories of each categorical feature column (in the one-hot order)."""
        self._load()
        return self._categories

    @property
    def class_names(self) -> dict[str, list[str]]:
        """Label strings of string-valued binary and multiclass targets (class ``i`` is ``names[i]``)."""
        self._load()
        return self._class_names

    @property
    def input_schema(self) -> InputSchema | None:
        """The fitted encoding as data (saved in checkpoints, so ``mtl serve`` encodes records as training did)."""
        self._load()
        return InputSchema.from_encoding(
            self._feature_columns, self._feature_stats, self._categories, self._class_names
        )

    @property
    def split_rows(self) -> dict[str, np.ndarray]:
        """Positions (0-based) of each split's rows in its source file, to join predictions back to rows."""
        self._load()
        return self._split_rows

    def build_datasets(self) -> dict[str, Dataset]:
        return dict(self._load())

    def _load(self) -> dict[str, MultiTaskTensorDataset]:
        """Read the file(s) once, fit the encoding on the train split and encode every split (cached)."""
        if self._loaded is not None:
            return self._loaded
        frames, sources = self._read_splits()
        features = self._resolve_columns(frames, sources)
        self._feature_columns = list(features)
        train = frames["train"]
        if self.categorical is None:  # an explicit list is the user's decision; only the automatic one guesses
            self._check_text_in_numbers(frames, features, sources)
        categorical = self._fit_features(train, features, sources["train"])
        self._fit_targets(frames, sources)
        self._loaded = {
            split: MultiTaskTensorDataset(
                self._encode_features(frame, features, categorical, sources[split]),
                self._encode_targets(frame, sources[split]),
            )
            for split, frame in frames.items()
        }
        return self._loaded

    def _read_splits(self) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
        if not self.single_file:
            frames = {split: read_table(p) for split, p in self.paths.items()}
            self._split_rows = {split: np.arange(len(f)) for split, f in frames.items()}
            return frames, {split: repr(p) for split, p in self.paths.items()}
        path = self.paths["all"]
        table = read_table(path)
        parts = split_indices(len(table), self.fractions, self.seed)
        if len(parts[0]) == 0:
            # Checked here, not only by _validate: fitting the encoding on no rows fails with misleading errors.
            raise DataError(
                f"the 'train' split is empty: {path!r} has {len(table)} row(s), and val_fraction="
                f"{self.fractions[0]}, test_fraction={self.fractions[1]} take them all; give more rows or change "
                f"the split fractions of {type(self).__name__}"
            )
        frames, sources = {}, {}
        for split, rows in zip(("train", "val", "test"), parts, strict=True):
            kept = np.sort(rows.numpy())  # file order inside a split: easier to read and to join back
            self._split_rows[split] = kept
            frames[split] = table.iloc[kept].reset_index(drop=True)
            sources[split] = f"{path!r} ({split} split)"
        return frames, sources

    def _resolve_columns(self, frames: dict[str, pd.DataFrame], sources: dict[str, str]) -> list[str]:
        """The feature columns, after checking that every file has the features, targets and drop columns."""
        targets = list(dict.fromkeys(c for cols in self.target_columns.values() for c in cols))
        train_columns = list(frames["train"].columns)
        if self.features is None:
            features = [c for c in train_columns if c not in targets and c not in self.drop]
        else:
            features = self.features
        for split, frame in frames.items():
            columns = set(frame.columns)
            missing = {
                "feature": [c for c in features if c not in columns],
                "target": [c for c in targets if c not in columns],
                "drop": [c for c in self.drop if c not in columns] if split == "train" else [],
            }
            if any(missing.values()):
                what = "; ".join(f"{kind} columns {cols}" for kind, cols in missing.items() if cols)
                raise DataError(
                    f"{sources[split]} lacks {what}. Available columns: {_shown(list(frame.columns))}. Fix "
                    "the column names in features/drop/target_columns (targets default to the task names) or "
                    "the file"
                )
        if not features:
            raise DataError(
                f"no feature columns left in {sources['train']}: every column is a target or dropped; "
                f"columns: {_shown(train_columns)}"
            )
        return features

    # ------------------------------------------------------------------------------------------ features
    def _check_text_in_numbers(
        self, frames: dict[str, pd.DataFrame], features: list[str], sources: dict[str, str]
    ) -> None:
        """Refuse feature columns whose filled cells, over all splits, are mostly numbers but partly text.

        Read with a stray ``?`` or ``abc``, such a column has text dtype and would be silently one-hot encoded
        over its distinct numbers; a column that is mostly text stays categorical.
        """
        flagged: dict[str, tuple[int, int, dict[str, np.ndarray]]] = {}  # column -> (text, filled, split -> mask)
        for col in features:
            if is_bool_dtype(frames["train"][col]):
                continue  # bool columns are categorical by design
            masks: dict[str, np.ndarray] = {}
            filled = 0
            for split, frame in frames.items():
                column = frame[col]
                present = column.notna().to_numpy()
                filled += int(present.sum())
                if not is_numeric_dtype(column) or is_bool_dtype(column):
                    masks[split] = present & pd.to_numeric(column, errors="coerce").isna().to_numpy()
            text = sum(int(m.sum()) for m in masks.values())
            if 0 < text < filled - text:  # more number cells than text cells: the column is meant to be numeric
                flagged[col] = (text, filled, masks)
        if not flagged:
            return
        col, (text, filled, masks) = next(iter(flagged.items()))
        cells = []  # (file key, position in the file, split, value), sorted into the order the user reads them
        for order, (split, mask) in enumerate(masks.items()):
            where = np.flatnonzero(mask)
            positions = self._split_rows.get(split, np.arange(len(mask)))[where]
            values = frames[split][col].to_numpy()[where]
            key = 0 if self.single_file else order  # one file: its order; several: file by file
            cells += [(key, int(p), split, v) for p, v in zip(positions, values, strict=True)]
        cells.sort(key=lambda cell: cell[:2])
        places = self._cell_places([(split, p, v) for _, p, split, v in cells[:_MAX_CELLS]], sources)
        more = f" … ({text} in all)" if text > _MAX_CELLS else ""
        train = frames["train"]
        # The columns the automatic choice one-hot encodes (as _fit_features), plus this one.
        suggest = [
            c
            for c in features
            if c == col or (c not in flagged and (not is_numeric_dtype(train[c]) or is_bool_dtype(train[c])))
        ]
        others = f" (columns {sorted(set(flagged) - {col})} have the same problem)" if len(flagged) > 1 else ""
        raise DataError(
            f"feature column {col!r} is mostly numbers but {text} of its {filled} filled cells "
            f"{'is' if text == 1 else 'are'} text: {places}{more}{others}. Fix those cells (leave a cell empty "
            f"for a missing value), or, if {col!r} really is a category, set categorical: {suggest} (that list "
            "replaces the automatic choice, so it names every column to one-hot encode)"
        )

    def _cell_places(self, cells: list[tuple[str, int, Any]], sources: dict[str, str]) -> str:
        """``'f.csv' line 5 'abc', line 9 '?'``: cells as the user finds them (CSV lines count the header)."""
        groups: dict[str, list[str]] = {}
        for split, position, value in cells:
            file = self.paths["all"] if self.single_file else self.paths.get(split)
            if file is None:  # a subclass reading other files: name the source, count its rows from 0
                groups.setdefault(sources[split], []).append(f"row {position} {value!r}")
            elif Path(file).suffix.lower() in PARQUET_SUFFIXES:
                groups.setdefault(repr(file), []).append(f"row {position} (from 0) {value!r}")
            else:
                groups.setdefault(repr(file), []).append(f"line {position + 2} {value!r}")  # line 1 is the header
        return "; ".join(f"{file} {', '.join(places)}" for file, places in groups.items())

    def _fit_features(self, train: pd.DataFrame, features: list[str], source: str) -> set[str]:
        if self.categorical is None:
            categorical = {c for c in features if not is_numeric_dtype(train[c]) or is_bool_dtype(train[c])}
        else:
            stray = [c for c in self.categorical if c not in features]
            if stray:
                raise DataError(
                    f"categorical lists columns that are not features: {stray}; features are {_shown(features)}"
                )
            categorical = set(self.categorical)
        self._feature_names, self._feature_stats, self._categories = [], {}, {}
        for col in features:
            if col in categorical:
                cats = sorted({s for s in _as_strings(train[col]) if s is not None})
                if len(cats) > max(50, len(train) // 2):
                    rank_zero_warn(
                        f"categorical column {col!r} has {len(cats)} distinct values in the train split, "
                        "giving as many one-hot inputs; if it is an identifier, add it to drop"
                    )
                self._categories[col] = cats
                self._feature_names.extend(f"{col}={c}" for c in cats)
            else:
                self._fit_numeric(train[col], col, source)
        return categorical

    def _fit_numeric(self, column: pd.Series, col: str, source: str) -> None:
        """Standardisation statistics of a numeric feature column from the train split (NaN cells left out)."""
        values = _as_numbers(column, f"feature column {col!r} of {source}", self._numeric_fix(col))
        seen = values[~np.isnan(values)]
        mean = float(seen.mean()) if seen.size else 0.0
        std = float(seen.std()) if seen.size else 1.0
        self._feature_stats[col] = (mean, std if std > 0 else 1.0)
        self._feature_names.append(col)

    def _numeric_fix(self, col: str) -> str:
        return f"list {col!r} in categorical to one-hot encode it, add it to drop, or fix the cells"

    def _encode_features(
        self, frame: pd.DataFrame, features: list[str], categorical: set[str], source: str
    ) -> torch.Tensor:
        blocks = []
        for col in features:
            if col in categorical:
                index = {c: i for i, c in enumerate(self._categories[col])}
                # int64 even when the split has no rows: an empty float array cannot index the block.
                codes = np.array(
                    [index.get(s, -1) if s is not None else -1 for s in _as_strings(frame[col])], dtype=np.int64
                )
                block = np.zeros((len(frame), len(index)), dtype=np.float32)
                known = codes >= 0
                block[np.flatnonzero(known), codes[known]] = 1.0
            else:
                values = _as_numbers(frame[col], f"feature column {col!r} of {source}", self._numeric_fix(col))
                mean, std = self._feature_stats[col]
                block = np.nan_to_num((values - mean) / std, nan=0.0)[:, None].astype(np.float32)
            blocks.append(block)
        return torch.from_numpy(np.concatenate(blocks, axis=1))

    # ------------------------------------------------------------------------------------------- targets
    def _fit_targets(self, frames: dict[str, pd.DataFrame], sources: dict[str, str]) -> None:
        """String label vocabularies: binary from all splits (exactly two values), multiclass from train."""
        self._class_names = {}
        for spec in self.tasks:
            if spec.kind not in ("binary", "multiclass"):
                continue
            col = self.target_columns[spec.name][0]
            train = frames["train"][col]
            if _numeric_like(train):
                continue  # 0/1 or class indices (also as true/false or "1"), checked when encoded
            if spec.kind == "binary":
                values = sorted({s for f in frames.values() for s in _as_strings(f[col]) if s is not None})
                if len(values) != 2:
                    raise DataError(
                        f"task {spec.name!r} (binary): column {col!r} holds {len(values)} distinct value(s) "
                        f"{_shown(values)}; a binary target needs 0/1, true/false or exactly two distinct "
                        "strings (mapped in sorted order). Fix the column, or use kind multiclass for more "
                        "classes"
                    )
            else:
                values = sorted({s for s in _as_strings(train) if s is not None})
                if len(values) > int(spec.num_outputs or 0):
                    raise DataError(
                        f"task {spec.name!r} (multiclass): column {col!r} holds {len(values)} distinct "
                        f"classes in {sources['train']} ({_shown(values)}) but num_outputs is "
                        f"{spec.num_outputs}; set num_outputs: {len(values)} or fix the labels"
                    )
            self._class_names[spec.name] = values

    def _encode_targets(self, frame: pd.DataFrame, source: str) -> dict[str, torch.Tensor]:
        return {spec.name: self._encode_target(spec, frame, source) for spec in self.tasks}

    def _encode_target(self, spec: TaskSpec, frame: pd.DataFrame, source: str) -> torch.Tensor:
        cols = self.target_columns[spec.name]
        where = f"task {spec.name!r} ({spec.kind}): column {cols[0]!r} of {source}"
        if spec.name in self._class_names:
            names = self._class_names[spec.name]
            index = {c: i for i, c in enumerate(names)}
            labels = _as_strings(frame[cols[0]])
            unseen = sorted({s for s in labels if s is not None and s not in index})
            if unseen:
                raise DataError(
                    f"{where} holds labels {_shown(unseen)} that the train split lacks; string classes are "
                    f"numbered by the sorted train labels {names}, so every class must appear in the "
                    "training data. Add rows of those classes to it (or change seed/the split fractions)"
                )
            codes = np.array([IGNORE_INDEX if s is None else index[s] for s in labels], dtype=np.int64)
            if spec.kind == "multiclass":
                return torch.from_numpy(codes)
            return torch.from_numpy(np.where(codes == IGNORE_INDEX, np.nan, codes).astype(np.float32))
        fix = f"fix the cells (leave a cell empty for a missing label) or the task's kind (now {spec.kind})"
        values = np.stack(
            [_as_numbers(frame[c], f"task {spec.name!r} ({spec.kind}): column {c!r} of {source}", fix) for c in cols],
            axis=1,
        )
        seen = values[~np.isnan(values)]
        if spec.kind in ("binary", "multilabel"):
            bad = sorted(set(seen[(seen != 0) & (seen != 1)].tolist()))
            if bad:
                holder = where if len(cols) == 1 else f"task {spec.name!r} ({spec.kind}) in {source}"
                raise DataError(
                    f"{holder} holds values {_shown(bad)}; {spec.kind} targets must be 0/1 or true/false "
                    "(empty cell = missing). Map them to 0/1, or use kind multiclass for class indices"
                )
        if spec.kind == "multiclass":
            k = int(spec.num_outputs or 0)
            bad = sorted(set(seen[(seen != np.round(seen)) | (seen < 0) | (seen >= k)].tolist()))
            if bad:
                raise DataError(
                    f"{where} holds values {_shown(bad)}; multiclass labels must be integers in [0, {k}) "
                    f"(num_outputs={k}) or strings (empty cell = missing). Fix the labels or num_outputs"
                )
            return torch.from_numpy(np.where(np.isnan(values[:, 0]), IGNORE_INDEX, values[:, 0]).astype(np.int64))
        values = values.astype(np.float32)
        if len(spec.task_kind.target_shape(spec, 1)) == 1:  # one value per sample: (N,), not (N, 1)
            values = values[:, 0]
        return torch.from_numpy(np.ascontiguousarray(values))
