"""The input encoding of a table-fed model, saved with it, so that a server can encode records as training did.

A tabular data module fits its encoding on the training split (:class:`~mtl_lightning.data.TabularDataModule`):
numeric columns standardised with the train mean and std (a missing value becomes 0, the mean), categorical columns
one-hot over the sorted train categories (an unseen or missing value gives an all-zero row). :class:`InputSchema` is
that encoding as data: written into every checkpoint by
:class:`~mtl_lightning.callbacks.input_schema.InputSchemaCheckpoint` (and into ONNX files by ``mtl export``), read
back by ``mtl serve``. :meth:`InputSchema.encode` turns records (``{column: value}``) into the rows the data module
would have given for the same cells; tests check the two against each other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CHECKPOINT_KEY = "mtl_data_schema"
"""Top-level checkpoint key (and ONNX metadata key) of the data's schema: input columns and class names."""
_MAX_SHOWN = 10


class RecordError(ValueError):
    """A record does not fit the schema: a missing or extra column, or a value of the wrong type."""


@dataclass(frozen=True)
class Column:
    """One input column: ``numeric`` (``mean``, ``std``) or ``categorical`` (``categories`` in one-hot order)."""

    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    categories: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """How many encoded inputs the column gives."""
        return len(self.categories) if self.kind == "categorical" else 1


def category_string(value: Any) -> str | None:
    """A cell as the category string training used: ``None`` when missing, ``3.0`` written ``3``.

    The record-by-record twin of the tabular module's column conversion (its tests compare the two)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class InputSchema:
    """Input columns in encoding order, the class names of string-labelled tasks, and the unseen-category rule."""

    columns: tuple[Column, ...]
    class_names: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @property
    def num_inputs(self) -> int:
        """Width of an encoded row (the encoder's ``input_shape[0]``)."""
        return sum(c.width for c in self.columns)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    # ------------------------------------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only: it goes into checkpoints (loaded with ``weights_only``) and ONNX metadata."""
        return {
            "columns": [
                {"name": c.name, "kind": c.kind, "mean": c.mean, "std": c.std}
                if c.kind == "numeric"
                else {"name": c.name, "kind": c.kind, "categories": list(c.categories)}
                for c in self.columns
            ],
            "unseen_category": "all-zero one-hot",
            "missing_value": "numeric: the train mean; categorical: all-zero one-hot",
            "class_names": {task: list(names) for task, names in self.class_names.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSchema:
        columns = tuple(
            Column(
                name=str(c["name"]),
                kind=str(c["kind"]),
                mean=float(c.get("mean", 0.0)),
                std=float(c.get("std", 1.0)),
                categories=tuple(str(v) for v in c.get("categories", ())),
            )
            for c in data["columns"]
        )
        names = {str(t): [str(n) for n in v] for t, v in dict(data.get("class_names") or {}).items()}
        return cls(columns=columns, class_names=names)

    @classmethod
    def from_encoding(
        cls,
        feature_columns: Sequence[str],
        feature_stats: Mapping[str, tuple[float, float]],
        categories: Mapping[str, Sequence[str]],
        class_names: Mapping[str, Sequence[str]] | None = None,
    ) -> InputSchema:
        """The schema of a tabular data module's fitted encoding (its columns in order, stats and categories)."""
        columns = []
        for col in feature_columns:
            if col in categories:
                columns.append(Column(col, "categorical", categories=tuple(categories[col])))
            elif col in feature_stats:
                mean, std = feature_stats[col]
                columns.append(Column(col, "numeric", mean=float(mean), std=float(std)))
            else:
                raise ValueError(f"feature column {col!r} has neither statistics nor categories")
        return cls(columns=tuple(columns), class_names=dict(class_names or {}))

    # --------------------------------------------------------------------------------------------------- encoding
    def check_columns(self, record: Mapping[str, Any], where: str) -> None:
        """A record must name every column and no other (a value may be null: a missing cell)."""
        missing = [c for c in self.column_names if c not in record]
        extra = [k for k in record if k not in set(self.column_names)]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks the column(s) {_shown(missing)}")
            if extra:
                parts.append(f"has unknown column(s) {_shown(extra)}")
            raise RecordError(
                f"{where} {' and '.join(parts)}; the model's input columns are {_shown(self.column_names)} "
                "(null for a missing value)"
            )

    def encode(self, records: Sequence[Mapping[str, Any]], strict_categories: bool = False) -> np.ndarray:
        """``(N, num_inputs)`` float32 rows, encoded exactly as the data module encoded its table.

        ``strict_categories``: refuse a category not seen in training (the default encodes it as all zeros, as
        training did for an unseen value in the validation or test split)."""
        out = np.zeros((len(records), self.num_inputs), dtype=np.float32)
        for i, record in enumerate(records):
            where = f"record {i}"
            if not isinstance(record, Mapping):
                raise RecordError(f"{where} is {type(record).__name__!r}, not an object {{column: value}}")
            self.check_columns(record, where)
            offset = 0
            for col in self.columns:
                value = record[col.name]
                if col.kind == "numeric":
                    number = _number(value, f"{where}, column {col.name!r}")
                    # a missing value is the train mean, 0 once standardised (training's nan_to_num)
                    out[i, offset] = 0.0 if math.isnan(number) else (number - col.mean) / col.std
                else:
                    self._one_hot(out[i, offset : offset + col.width], col, value, where, strict_categories)
                offset += col.width
        return out

    @staticmethod
    def _one_hot(row: np.ndarray, col: Column, value: Any, where: str, strict: bool) -> None:
        if isinstance(value, (Mapping, list, tuple)):
            raise RecordError(
                f"{where}, column {col.name!r}: {type(value).__name__} is not a category; give a string or number"
            )
        text = category_string(value)
        if text is None:
            return
        try:
            row[col.categories.index(text)] = 1.0
        except ValueError:
            if strict:
                raise RecordError(
                    f"{where}, column {col.name!r}: {text!r} is not a category seen in training; the known ones "
                    f"are {_shown(list(col.categories))}"
                ) from None


def _number(value: Any, where: str) -> float:
    """A numeric cell (NaN for a missing one, then 0 after standardising: nan_to_num as in training)."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise RecordError(f"{where}: {value!r} is not a number; give a number or null") from None
    else:
        raise RecordError(f"{where}: {type(value).__name__} is not a number; give a number or null")
    if math.isinf(number):
        raise RecordError(f"{where}: {value!r} is infinite; give a finite number or null")
    return number


def _shown(values: Sequence[Any]) -> str:
    values = list(values)
    more = f" … ({len(values)} in all)" if len(values) > _MAX_SHOWN else ""
    return f"{values[:_MAX_SHOWN]}{more}"
