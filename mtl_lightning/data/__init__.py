"""Multi-task data modules: the base class, in-memory datasets and the built-in data sources."""

from mtl_lightning.data.base import DataError, MultiTaskDataModule, split_indices
from mtl_lightning.data.datasets import MultiTaskTensorDataset, collate_batch
from mtl_lightning.data.sequences import SequenceDataModule
from mtl_lightning.data.synthetic import SyntheticDataModule
from mtl_lightning.data.tabular import TabularDataModule

__all__ = [
    "DataError",
    "MultiTaskDataModule",
    "MultiTaskTensorDataset",
    "SequenceDataModule",
    "SyntheticDataModule",
    "TabularDataModule",
    "collate_batch",
    "split_indices",
]
