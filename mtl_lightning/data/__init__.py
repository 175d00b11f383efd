"""Multi-task data modules: the base class, in-memory datasets and the built-in data sources."""

from mtl_lightning.data.base import DataError, MultiTaskDataModule, split_indices
from mtl_lightning.data.census import CensusIncomeDataModule
from mtl_lightning.data.datasets import MultiTaskTensorDataset, collate_batch
from mtl_lightning.data.images import SyntheticImageDataModule
from mtl_lightning.data.multimnist import MultiMNISTDataModule
from mtl_lightning.data.per_task import PerTaskDataModule, PerTaskDataset
from mtl_lightning.data.sampling import EvalBatchSampler, TaskBatchSampler, task_probabilities
from mtl_lightning.data.sequences import SequenceDataModule
from mtl_lightning.data.synthetic import SyntheticDataModule
from mtl_lightning.data.tabular import TabularDataModule
from mtl_lightning.data.text import TextDataModule, TokenDataset

__all__ = [
    "CensusIncomeDataModule",
    "DataError",
    "EvalBatchSampler",
    "MultiMNISTDataModule",
    "MultiTaskDataModule",
    "MultiTaskTensorDataset",
    "PerTaskDataModule",
    "PerTaskDataset",
    "SequenceDataModule",
    "SyntheticDataModule",
    "SyntheticImageDataModule",
    "TabularDataModule",
    "TaskBatchSampler",
    "TextDataModule",
    "TokenDataset",
    "collate_batch",
    "split_indices",
    "task_probabilities",
]
