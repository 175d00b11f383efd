"""Users' own text: a CSV or Parquet table with one or two text columns and per-task target columns.

The text is tokenised once, at load, by a Hugging Face tokenizer (the encoder's: a hub name or a local folder);
targets, splits and their errors are the tabular module's. Each batch is padded to its own longest sequence, not
to ``max_length``: rows are stored right-padded and a batch keeps only the columns one of its rows fills.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.base import DataError
from mtl_lightning.data.datasets import Inputs, MultiTaskTensorDataset
from mtl_lightning.data.tabular import TabularDataModule, _as_strings, _shown
from mtl_lightning.hf_loading import load, transformers_module
from mtl_lightning.tasks import TaskSpec


class TokenDataset(MultiTaskTensorDataset):
    """Right-padded token ids ``(N, max_length)``; a batch is cut to its longest row (dynamic padding)."""

    def __init__(self, inputs: Inputs, targets: dict[str, Tensor], pad_id: int):
        super().__init__(inputs, targets)
        self.pad_id = pad_id

    def _take(self, index: Any) -> dict[str, Any]:
        batch = super()._take(index)
        ids = batch["inputs"]
        if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[1]:
            filled = (ids != self.pad_id).any(dim=0).nonzero()
            width = int(filled[-1]) + 1 if len(filled) else 1
            batch["inputs"] = ids[:, :width]
        return batch

    def subset(self, indices: Tensor) -> TokenDataset:
        batch = MultiTaskTensorDataset._take(self, indices)
        return TokenDataset(batch["inputs"], batch["targets"], self.pad_id)


class TextDataModule(TabularDataModule):
    """Multi-task text classification and regression from a table (GLUE-, review- or ticket-like data).

    Files, splits and targets work as in :class:`TabularDataModule` (``path`` split by ``val_fraction`` and
    ``test_fraction``, or ``train_path``/``val_path``/``test_path``; a task's target is the column named like it
    unless ``target_columns`` maps it). The inputs are the token ids of ``text_column`` (and ``text_pair_column``
    for sentence pairs, joined by the tokenizer's separator); empty cells are empty texts. The CLI links
    :attr:`vocab_size` and :attr:`pad_id` into the encoder.

    Args:
        tasks: The task specs.
        tokenizer: A Hugging Face hub name or a folder written by ``save_pretrained``: the encoder's tokenizer.
        text_column: The column holding the text.
        text_pair_column: A second text column (premise/hypothesis, question/answer), or None.
        max_length: Tokens per sequence at most, special tokens included (the encoder's ``input_shape``).
        truncation: Cut longer texts to ``max_length``; ``False`` refuses them, naming the rows.
        local_files_only: Never contact the hub for the tokenizer.
        **kwargs: ``path``/``train_path``/``val_path``/``test_path``, ``target_columns``, the split fractions,
            loader settings and ``seed`` of :class:`TabularDataModule`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        tokenizer: str,
        text_column: str = "text",
        text_pair_column: str | None = None,
        max_length: int = 128,
        truncation: bool = True,
        local_files_only: bool = False,
        **kwargs: Any,
    ):
        for key in ("features", "categorical", "drop"):
            if kwargs.get(key) is not None:
                raise DataError(
                    f"TextDataModule takes its inputs from text_column/text_pair_column, not {key}: remove {key}"
                )
        if max_length < 2:
            raise DataError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        columns = [text_column] if text_pair_column is None else [text_column, text_pair_column]
        # The text columns as the tabular module's only features, "categorical" so it never reads them as numbers.
        super().__init__(tasks, features=columns, categorical=columns, **kwargs)
        self.tokenizer_name = tokenizer
        self.text_columns = columns
        self.max_length = max_length
        self.truncation = truncation
        self.local_files_only = local_files_only
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            auto = transformers_module("TextDataModule").AutoTokenizer
            tokenizer = load(auto, self.tokenizer_name, "TextDataModule", "tokenizer", self.local_files_only)
            if tokenizer.pad_token_id is None:
                raise DataError(
                    f"TextDataModule: the tokenizer {self.tokenizer_name!r} has no padding token; give one "
                    "(tokenizer.pad_token = tokenizer.eos_token, then save_pretrained) or another tokenizer"
                )
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (its vocabulary and added tokens): the encoder must embed as many."""
        return len(self.tokenizer)

    @property
    def input_schema(self) -> None:
        """None: text is tokenised, not encoded by columns (a server takes token ids as tensors)."""
        return None

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def build_datasets(self) -> dict[str, Dataset]:
        return {split: TokenDataset(ds.inputs, ds.targets, self.pad_id) for split, ds in self._load().items()}

    def _fit_features(self, train: pd.DataFrame, features: list[str], source: str) -> set[str]:
        for col in self.text_columns:
            if not any(_as_strings(train[col])):
                raise DataError(
                    f"text column {col!r} of {source} is empty in every row; point text_column at the column "
                    "that holds the text"
                )
        self._feature_names = list(self.text_columns)
        self._feature_stats, self._categories = {}, {}
        return set(self.text_columns)

    def _encode_features(self, frame: pd.DataFrame, features: list[str], categorical: set[str], source: str) -> Tensor:
        texts = [[s or "" for s in _as_strings(frame[col])] for col in self.text_columns]
        encoded = self.tokenizer(
            *texts, truncation=self.truncation, max_length=self.max_length if self.truncation else None
        )["input_ids"]
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        too_long = np.flatnonzero(lengths > self.max_length)
        if len(too_long):
            raise DataError(
                f"{len(too_long)} row(s) of {source} tokenise to more than max_length={self.max_length} tokens "
                f"(rows {_shown(too_long.tolist())}, up to {int(lengths.max())} tokens); set truncation: true or "
                "a larger max_length"
            )
        # Padded here, not by the tokenizer: some tokenizers pad on the left (padding_side), and TokenDataset's cut
        # to a batch's longest row needs the padding on the right.
        ids = np.full((len(encoded), self.max_length), self.pad_id, dtype=np.int64)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = seq
        return torch.from_numpy(ids)
