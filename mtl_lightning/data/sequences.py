"""Synthetic multi-task token sequences: random token ids whose labels count task-specific "marker" tokens.

Each label source (one per task; one per label or output of a multilabel or multi-output regression task) owns a random subset of the vocabulary, its
markers. A sequence's signal for that source is how many of its tokens are markers, so every label is an exact
function of the tokens that a bag-of-tokens model can learn (a Transformer with mean pooling only has to give
the markers a common direction in its embedding). The task's kind turns the count into a label: binary is the
count above its median, multiclass equal-frequency bins of it, regression the standardised count (one per
output), multilabel one count above its median per label. Tasks overlap only by chance (their marker sets are drawn independently).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Generator, Tensor
from torch.utils.data import Dataset

from mtl_lightning.data.base import DataError, MultiTaskDataModule, split_generated, split_indices
from mtl_lightning.data.datasets import MultiTaskTensorDataset
from mtl_lightning.data.synthetic import _drop_labels
from mtl_lightning.tasks import TaskSpec

PAD_ID = 0  # the padding token when sequences have variable lengths; never drawn as a real token then


def marker_counts(tokens: Tensor, markers: Tensor) -> Tensor:
    """``(N, M)`` counts: for each sequence, how many of its tokens are markers of each source.

    ``markers`` is a ``(M, vocab_size)`` boolean table. One gather of a small-int table per source keeps memory
    at one ``(N, S)`` temporary and takes about 0.4 s per source for 100k x 512 tokens on 2 CPU cores
    (``index_select`` on the flat ids: faster than advanced indexing).
    """
    table, flat = markers.to(torch.int16), tokens.reshape(-1)
    counts = [
        table[m].index_select(0, flat).view(tokens.shape).sum(dim=1, dtype=torch.int32) for m in range(len(table))
    ]
    return torch.stack(counts, dim=1)


def _label(spec: TaskSpec, counts: Tensor, gen: Generator) -> Tensor:
    """Label of one task from its sources' counts ``(N, k)``, made by the task's kind (k = 1 for one output)."""
    return spec.task_kind.label_from_signal(spec, counts.double(), gen)


class SequenceDataModule(MultiTaskDataModule):
    """Generated token sequences ``(N, seq_len)`` (int64 ids) with labels counting each task's marker tokens.

    Args:
        tasks: Task specs; each task (each label or output of a multilabel or regression task) gets its own
            random marker tokens.
        num_samples: Sequences in total, split into train/val/test.
        seq_len: Tokens per sequence (the encoder's ``input_shape`` is ``(seq_len,)``).
        vocab_size: Token ids are drawn uniformly from ``[0, vocab_size)`` (``[1, vocab_size)`` with padding).
        marker_fraction: Fraction of the vocabulary that marks each label source (at least one token).
        min_length: None: every sequence is full length. Otherwise lengths are uniform in
            ``[min_length, seq_len]`` and the rest is padded with token 0 (give the encoder ``pad_id: 0``).
        missing_rate: Fraction of rows whose label is missing, per task (NaN or -100).
        val_fraction: Fraction of rows for validation.
        test_fraction: Fraction of rows for testing.
        **kwargs: Loader settings and the split/generation ``seed`` of :class:`MultiTaskDataModule`.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        num_samples: int = 10000,
        seq_len: int = 64,
        vocab_size: int = 1000,
        marker_fraction: float = 0.05,
        min_length: int | None = None,
        missing_rate: float = 0.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs: Any,
    ):
        # jsonargparse follows **kwargs into the base class, so the CLI still shows the loader settings.
        super().__init__(tasks, **kwargs)
        if num_samples < 1 or seq_len < 1:
            raise DataError(f"num_samples and seq_len must be >= 1, got {num_samples} and {seq_len}")
        if vocab_size < 2 + (min_length is not None):
            raise DataError(f"vocab_size must be >= 2 (3 with padding), got {vocab_size}")
        if not 0.0 < marker_fraction < 1.0:
            raise DataError(f"marker_fraction must be in (0, 1), got {marker_fraction}")
        if min_length is not None and not 1 <= min_length <= seq_len:
            raise DataError(f"min_length must be in [1, seq_len={seq_len}] or null, got {min_length}")
        if not 0.0 <= missing_rate < 1.0:
            raise DataError(f"missing_rate must be in [0, 1), got {missing_rate}")
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.marker_fraction = marker_fraction
        self.min_length = min_length
        self.missing_rate = missing_rate
        self.fractions = (val_fraction, test_fraction)
        split_indices(1, self.fractions, 0)  # fail at construction, not at setup, on impossible fractions

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def _sources(self) -> list[int]:
        """Number of label sources (marker sets) per task."""
        return [s.task_kind.target_width(s) for s in self.tasks]

    def generate_tokens(self, gen: Generator) -> Tensor:
        """``(num_samples, seq_len)`` int64 token ids, padded with :data:`PAD_ID` when ``min_length`` is set."""
        low = 0 if self.min_length is None else PAD_ID + 1
        tokens = torch.randint(low, self.vocab_size, (self.num_samples, self.seq_len), generator=gen)
        if self.min_length is not None:
            lengths = torch.randint(self.min_length, self.seq_len + 1, (self.num_samples, 1), generator=gen)
            tokens.masked_fill_(torch.arange(self.seq_len) >= lengths, PAD_ID)
        return tokens

    def markers(self, gen: Generator) -> Tensor:
        """``(M, vocab_size)`` boolean table: the marker tokens of each of the M label sources."""
        low = 0 if self.min_length is None else PAD_ID + 1  # padding never marks anything
        real = self.vocab_size - low
        size = max(1, round(self.marker_fraction * real))
        table = torch.zeros(sum(self._sources()), self.vocab_size, dtype=torch.bool)
        for row in table:
            row[low + torch.randperm(real, generator=gen)[:size]] = True
        return table

    def generate(self) -> MultiTaskTensorDataset:
        """All rows, deterministic in ``seed``."""
        gen = torch.Generator().manual_seed(self.seed)
        tokens = self.generate_tokens(gen)
        counts = marker_counts(tokens, self.markers(gen))
        targets, start = {}, 0
        for spec, k in zip(self.tasks, self._sources(), strict=True):
            target = _label(spec, counts[:, start : start + k], gen)
            start += k
            targets[spec.name] = _drop_labels(target, self.missing_rate, gen) if self.missing_rate else target
        return MultiTaskTensorDataset(tokens, targets)

    def build_datasets(self) -> dict[str, Dataset]:
        return split_generated(self.generate(), self.fractions, self.seed)
