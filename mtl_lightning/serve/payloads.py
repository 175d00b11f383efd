"""Requests to ``POST /predict`` and their answers.

A request is a JSON object with one of:

- ``"inputs": [record, ...]``: records ``{column: value}`` for a model trained on a table (its schema is in the
  checkpoint or the ONNX file); null is a missing value, encoded as in training;
- ``"inputs": [[...], ...]``: tensors as nested lists, ``(N, *input_shape)``, for image and sequence models;
- ``"inputs_npy": "<base64>"``: the same tensor as a base64-encoded ``.npy`` file.

The answer maps each task name to one entry per input row, with the fields of the task's columns in
``mtl predict``'s output (the same function makes both): ``prob`` and ``pred`` (and ``label`` where the classes have
names) for classification, ``value`` for regression and counts.

A bad request is answered with a 4xx status and ``{"error": message}`` naming what is wrong; it never fails the
other requests batched with it (see :mod:`mtl_lightning.serve.api`).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtl_lightning.callbacks.prediction_writer import task_columns
from mtl_lightning.input_schema import RecordError
from mtl_lightning.serve.models import ServedModel

_INDEXED = re.compile(r"^(.*?)_?(\d+)$")


@dataclass(frozen=True)
class Invalid:
    """A request refused before it reached the model: the HTTP status and the message."""

    status: int
    message: str


@dataclass(frozen=True)
class Rows:
    """A valid request's inputs, encoded: ``(N, *input_shape)`` in the model's dtype."""

    inputs: np.ndarray


def decode(payload: Any, model: ServedModel, max_rows: int, strict_categories: bool = False) -> Rows | Invalid:
    """A request body (parsed JSON) as model inputs, or the reason it is refused."""
    if not isinstance(payload, Mapping):
        return Invalid(400, f'the body is a JSON {_json_type(payload)}; send an object {{"inputs": [...]}}')
    keys = set(payload)
    if keys not in ({"inputs"}, {"inputs_npy"}):
        extra = sorted(keys - {"inputs", "inputs_npy"})
        hint = f"unknown key(s) {extra}; " if extra else ""
        return Invalid(400, f'{hint}the body must hold exactly one of "inputs" (a list) or "inputs_npy" (base64 .npy)')
    try:
        if "inputs_npy" in payload:
            inputs = _npy(payload["inputs_npy"])
        else:
            rows = payload["inputs"]
            if not isinstance(rows, list):
                return Invalid(422, f'"inputs" is a JSON {_json_type(rows)}; give a list with one entry per row')
            if not rows:
                return Invalid(422, '"inputs" is empty; give at least one row')
            if len(rows) > max_rows:
                return Invalid(413, f"{len(rows)} rows in one request; the server takes at most {max_rows} per request")
            if isinstance(rows[0], Mapping):
                if model.schema is None:
                    return Invalid(
                        422,
                        "this model was not trained on a table with named columns; send tensors: "
                        f'"inputs" as nested lists of shape (N, {", ".join(map(str, model.input_shape))})',
                    )
                return Rows(model.schema.encode(rows, strict_categories=strict_categories))
            inputs = _tensor(rows, model)
    except RecordError as err:
        return Invalid(422, str(err))
    return _checked_tensor(inputs, model, max_rows)


def _npy(text: Any) -> np.ndarray:
    if not isinstance(text, str):
        raise RecordError(f'"inputs_npy" is a JSON {_json_type(text)}; give a base64 string of a .npy file')
    try:
        return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (binascii.Error, ValueError, OSError) as err:
        raise RecordError(f'"inputs_npy" is not a base64-encoded .npy file: {err}') from None


def _tensor(rows: list[Any], model: ServedModel) -> np.ndarray:
    try:
        return np.asarray(rows, dtype=np.float64)
    except (ValueError, TypeError):
        raise RecordError(
            f'"inputs" is not a rectangular list of numbers of shape (N, {", ".join(map(str, model.input_shape))})'
        ) from None


def _checked_tensor(inputs: np.ndarray, model: ServedModel, max_rows: int) -> Rows | Invalid:
    want = ("N", *model.input_shape)
    if inputs.ndim != len(want) or tuple(inputs.shape[1:]) != model.input_shape:
        return Invalid(422, f"the inputs have shape {tuple(inputs.shape)}; the model takes {want}")
    if inputs.shape[0] == 0:
        return Invalid(422, "the inputs have no rows; give at least one")
    if inputs.shape[0] > max_rows:
        return Invalid(413, f"{inputs.shape[0]} rows in one request; the server takes at most {max_rows} per request")
    if not np.issubdtype(inputs.dtype, np.number) and inputs.dtype != np.bool_:
        return Invalid(422, f"the inputs are of type {inputs.dtype}; give numbers")
    if model.input_dtype == np.int64:
        if not np.all(np.isfinite(inputs)) or not np.all(inputs == np.round(inputs)):
            return Invalid(422, "this model takes integer ids (int64); the inputs hold non-integer values")
        vocab = model.vocab_size
        if vocab is not None and (inputs.min() < 0 or inputs.max() >= vocab):
            bad = inputs[(inputs < 0) | (inputs >= vocab)].flat[0]
            return Invalid(422, f"token id {int(bad)} is out of the vocabulary: ids must lie in [0, {vocab})")
    elif not np.all(np.isfinite(inputs)):
        return Invalid(422, "the inputs hold NaN or infinite values; give finite numbers")
    return Rows(np.ascontiguousarray(inputs, dtype=model.input_dtype))


def answer(model: ServedModel, predictions: Mapping[str, np.ndarray], threshold: float) -> dict[str, list[Any]]:
    """``{task: [entry per row]}``: each entry holds the task's ``mtl predict`` columns, without the task prefix."""
    class_names = model.schema.class_names if model.schema is not None else {}
    out: dict[str, list[Any]] = {}
    for name, spec in model.tasks.items():
        columns = task_columns(spec, np.asarray(predictions[name]), threshold)
        fields = _fields(name, columns)
        class_column = spec.task_kind.class_column(spec)
        names = class_names.get(name)
        if names and class_column is not None:
            fields["label"] = np.asarray(list(names), dtype=object)[columns[class_column]]
        keys = list(fields)
        values = [v.tolist() if isinstance(v, np.ndarray) else v for v in fields.values()]
        out[name] = [dict(zip(keys, row, strict=True)) for row in zip(*values, strict=True)]
    return out


def _fields(task: str, columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Writer columns ``{task}_prob``, ``{task}_prob_3``, ``{task}`` or ``{task}_2`` as fields ``prob`` (a value or
    a per-row list over the indexed columns) and ``value``."""
    groups: dict[str, list[tuple[int, np.ndarray]]] = {}
    fields: dict[str, Any] = {}
    for column, values in columns.items():
        rest = column[len(task) :].lstrip("_") if column.startswith(task) else column
        indexed = _INDEXED.match(rest)
        if rest == "":
            fields["value"] = values
        elif indexed is not None:
            groups.setdefault(indexed.group(1) or "value", []).append((int(indexed.group(2)), values))
        else:
            fields[rest] = values
    for field, parts in groups.items():
        fields[field] = np.stack([v for _, v in sorted(parts, key=lambda p: p[0])], axis=1)
    return fields


def _json_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def split_rows(outputs: Mapping[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """One batch's predictions cut back into the requests' rows (``counts[i]`` rows for request ``i``)."""
    bounds = np.cumsum([0, *counts])
    return [{k: v[bounds[i] : bounds[i + 1]] for k, v in outputs.items()} for i in range(len(counts))]
